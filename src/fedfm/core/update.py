"""``ClientUpdate``: what one client sends back to the server after a round."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fedfm.core import state as state_ops
from fedfm.core.state import State

# round-metrics key under which a protocol that replaces the clients' uploads (secure
# aggregation) reports what really crossed the wire: {client id: (bytes sent, bytes received)};
# the loop books it in place of the plain payload's size
WIRE_BYTES = "wire_bytes"
# the same, for a protocol whose clients never receive the broadcast as such (split learning):
# {client id: (bytes sent, bytes received)} replace both of the client's counts
WIRE_BYTES_TOTAL = "wire_bytes_total"


@dataclass
class ClientUpdate:
    """One client's contribution to a round.

    Attributes:
        client_id: index of the client in the federation.
        payload: the communicated State, usually ``local - global`` (a delta).
        num_examples: examples the client trained on this round (the FedAvg weight).
        metrics: scalar training metrics (``train_loss``, ``steps``, ...).
        aux: further States an algorithm sends up, by name (e.g. SCAFFOLD's
            ``control_delta``); counted in bytes up like the payload.
        metadata: small JSON-able facts (ranks, seeds, timings).
    """

    client_id: int
    payload: State
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    aux: dict[str, State] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def num_bytes(self) -> int:
        """Bytes on the wire: the serialized payload and every aux State."""
        return state_ops.num_bytes(self.payload) + sum(
            state_ops.num_bytes(extra) for extra in self.aux.values()
        )


def expand_shared_upload(update: ClientUpdate, global_state: State, local_keys: Collection[str],
                         method: str) -> ClientUpdate:
    """An upload that holds exactly the shared tensors (every key of ``global_state`` but
    ``local_keys``), with zero deltas added for the local tensors a client never uploads; a
    ValueError (the update is rejected) names what is missing or unexpected."""
    shared = set(global_state) - set(local_keys)
    unexpected = [k for k in update.payload if k not in shared]
    missing = [k for k in global_state if k in shared and k not in update.payload]
    if unexpected or missing:
        raise ValueError(f"{method} upload: expected the shared tensors only (missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]})")
    payload = OrderedDict((k, update.payload[k] if k in update.payload
                           else torch.zeros_like(v)) for k, v in global_state.items())
    return ClientUpdate(update.client_id, payload, update.num_examples,
                        dict(update.metrics), dict(update.aux), dict(update.metadata))


@dataclass
class Broadcast:
    """What the server sends to every selected client: the global State plus named extras
    (e.g. SCAFFOLD's server control variate)."""

    global_state: State
    extras: dict[str, State] = field(default_factory=dict)
    round: int = 0

    def num_bytes(self) -> int:
        return state_ops.num_bytes(self.global_state) + sum(
            state_ops.num_bytes(extra) for extra in self.extras.values()
        )


def validate_update(update: ClientUpdate, reference: Mapping[str, Any]) -> None:
    """Reject a malformed update before it reaches an aggregator: payload keys, shapes and
    dtypes; finite values in the payload and every aux State; a positive integer example
    count; finite numeric metrics."""
    import math

    import torch

    who = f"client {update.client_id}"
    state_ops.check_compatible(reference, update.payload, what=f"{who} payload")
    count = update.num_examples
    if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
        raise ValueError(f"{who}: num_examples must be a positive integer, got {count!r}")
    states = [("payload", update.payload), *((f"aux {n}", s) for n, s in update.aux.items())]
    for where, checked in states:
        for key, tensor in checked.items():
            if not isinstance(tensor, torch.Tensor) or not torch.isfinite(tensor).all():
                raise ValueError(f"{who}: {where} {key} is not a finite tensor")
    for name, value in update.metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
                value):
            raise ValueError(f"{who}: metric {name!r} must be a finite number, got {value!r}")


class UpdateBatch(list[ClientUpdate]):
    """A round's accepted updates. With ``fold=True`` each appended update's payload is also
    folded into running float64 sums (example-weighted and uniform) as it arrives, so the mean
    aggregator needs no second pass over payloads that may live on disk (the ``remote``
    runtime). ``folded_mean`` answers only while the list holds exactly what was folded."""

    def __init__(self, *, fold: bool = False) -> None:
        super().__init__()
        self._sums: dict[str, state_ops.RunningSum] | None = (
            {"examples": state_ops.RunningSum(), "uniform": state_ops.RunningSum()}
            if fold else None)
        self._folded: list[int] = []

    def append(self, update: ClientUpdate) -> None:
        super().append(update)
        if self._sums is None:
            return
        payload = update.payload
        self._sums["examples"].add(payload, float(update.num_examples))
        self._sums["uniform"].add(payload, 1.0)
        self._folded.append(id(update))

    def folded_mean(self, weighting: str) -> State | None:
        if self._sums is None or not self or [id(u) for u in self] != self._folded:
            return None
        found = self._sums.get(weighting)
        return found.mean() if found is not None else None
