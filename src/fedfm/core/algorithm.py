"""The two halves of a federated algorithm and what each half is given.

* ``ClientProcedure`` runs where the data is: given a ``ClientContext`` (the model with the
  global State loaded, the client's examples, its persisted state) and the server's
  ``Broadcast``, it returns a ``ClientResult`` (a ``ClientUpdate`` plus the client's new state).
* ``ServerRule`` runs at the coordinator: it names the extras to broadcast, turns the round's
  updates into the next global State, and exposes its own state (optimizer moments, control
  variates) for checkpoints.

Both halves are built by name from the algorithm registry, so the simulator and a real client
agent run the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from fedfm.core.state import State
from fedfm.core.update import Broadcast, ClientUpdate

ClientState = dict[str, State]
"""Per-client state kept between rounds: named States (e.g. ``{"control": c_i}``)."""


@dataclass
class ClientContext:
    """Everything a client procedure may touch for one client in one round.

    The runtime has already loaded the broadcast global State into ``model``.
    """

    client_id: int
    round: int
    seed: int  # derived from (run seed, round, client): the client's RNG for this round
    model: torch.nn.Module
    get_state: Callable[[], State]
    set_state: Callable[[Mapping[str, torch.Tensor]], None]
    train_examples: list[dict[str, Any]]
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]
    device: torch.device
    autocast_dtype: torch.dtype | None = None
    client_state: ClientState | None = None
    # training loss of a batch (None: ``model(**batch).loss``); the fast path's fused loss
    loss_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor] | None = None
    # causal LM packing capacity in tokens (``model.max_length``); None: no packing possible
    max_length: int | None = None


@dataclass
class ClientResult:
    update: ClientUpdate
    client_state: ClientState | None = None  # None: nothing to persist


class ClientProcedure(Protocol):
    """Client half of an algorithm."""

    def run(self, ctx: ClientContext, broadcast: Broadcast) -> ClientResult: ...


class ServerRule(Protocol):
    """Server half of an algorithm."""

    def broadcast_extras(self, global_state: State) -> dict[str, State]:
        """States sent to clients besides the global State (empty for FedAvg)."""
        ...

    def aggregate(self, global_state: State, updates: list[ClientUpdate], round: int) -> State:
        """Return the next global State from this round's (validated) updates."""
        ...

    # Optional: ``check_update(update, global_state)`` raising ValueError for an update this
    # rule cannot use (e.g. a malformed aux State); the loop then rejects that update.

    def state_dict(self) -> dict[str, State]:
        """Named States that must be checkpointed to resume exactly."""
        ...

    def load_state_dict(self, states: Mapping[str, State]) -> None: ...


class ServerWrapper:
    """A server rule around another (compression decoding, attacks, replayed uploads): what a
    subclass does not override is the inner rule's, its protocol methods and its optional parts
    (``aggregator``, ``check_update``, ``round_metrics``, ...) alike."""

    def __init__(self, inner: ServerRule) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (copying, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def broadcast_extras(self, global_state: State) -> dict[str, State]:
        return self.inner.broadcast_extras(global_state)

    def aggregate(self, global_state: State, updates: list[ClientUpdate], round: int) -> State:
        return self.inner.aggregate(global_state, updates, round)

    def state_dict(self) -> dict[str, State]:
        return self.inner.state_dict()

    def load_state_dict(self, states: Mapping[str, State]) -> None:
        self.inner.load_state_dict(states)


@dataclass
class Algorithm:
    """A registered algorithm: both halves, built from one config."""

    name: str
    client: ClientProcedure
    server: ServerRule
    info: dict[str, Any] = field(default_factory=dict)
