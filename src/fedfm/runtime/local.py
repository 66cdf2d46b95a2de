"""The ``local`` runtime: one process, one base model, clients one after another.

Each client starts from the broadcast global State (copied into the adapter parameters in
place; the frozen base is never copied), runs the algorithm's client half on its own data, and
leaves behind a ``ClientUpdate`` and, for stateful algorithms, its new per-client state (the
round loop commits it to the store only if the update is accepted). Per-client wall time and
bytes up (the serialized payload size) are recorded; the loop adds bytes down.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from fedfm.core.algorithm import ClientContext, ClientProcedure
from fedfm.core.client_store import ClientStore
from fedfm.core.loop import ClientOutcome, EvalReport, derive_seed
from fedfm.core.registries import RUNTIMES
from fedfm.core.registry import MethodInfo
from fedfm.core.state import State
from fedfm.core.update import Broadcast
from fedfm.runtime.workload import Workload

_CLIENT_STREAM = 3  # keeps client seeds apart from sampling (1) and dropout (2) streams


@RUNTIMES.register("local", MethodInfo(
    "efficiency.systems.runtime", "",
    "runtime: {kind: local, precision: bf16, compile: true}",
    "one process, one base model; clients run in turn by swapping their small State"))
class LocalRuntime:
    def __init__(self, workload: Workload, client_store: ClientStore) -> None:
        self.workload = workload
        self.client_store = client_store

    def client_context(self, client_id: int, round_index: int) -> ClientContext:
        return seeded_client_context(self.workload, client_id, round_index,
                                     self.client_store.get(client_id))

    def run_clients(self, client_ids: list[int], broadcast: Broadcast,
                    round: int) -> Iterator[ClientOutcome]:
        for client_id in client_ids:
            start = time.perf_counter()
            self.workload.set_state(broadcast.global_state)
            result = self.workload.client.run(self.client_context(client_id, round), broadcast)
            yield ClientOutcome(client_id=client_id, update=result.update,
                                wall_time=time.perf_counter() - start,
                                bytes_up=result.update.num_bytes(),
                                client_state=result.client_state)

    def evaluate(self, global_state: State, *, round: int, per_client: bool,
                 extras: Mapping[str, State] | None = None) -> EvalReport:
        return self.workload.evaluate(
            global_state, per_client=per_client,
            personal=personal_models(self.workload.client, global_state, self.client_store,
                                     extras, context=lambda cid: self.client_context(cid, round)),
            round=round, extras=extras)

    def close(self) -> None:
        return None


def seeded_client_context(workload: Workload, client_id: int, round_index: int,
                          client_state: Any) -> ClientContext:
    """Client ``client_id``'s context in round ``round_index``: its training shard and its RNG
    seed derived from (run seed, round, client), the same in every process that runs it."""
    return workload.client_context(
        workload.data.clients[client_id].train, client_id=client_id, round=round_index,
        seed=derive_seed(workload.config.seed, round_index, client_id, _CLIENT_STREAM),
        client_state=client_state)


def personal_models(client: ClientProcedure, global_state: State, store: ClientStore,
                    extras: Mapping[str, State] | None,
                    context: Callable[[int], ClientContext] | None = None
                    ) -> Callable[[int], State] | None:
    """Each client's own model (``client.personal_state``), or None when the algorithm keeps
    nothing personal. ``personal_state(global_state, client_state, extras)``: ``extras`` are
    the server's ``evaluation_extras`` (cluster models, domain adapters), ``{}`` without; a
    ``personal_state`` with a ``ctx`` parameter also gets the client's context (IFCA picks its
    cluster by the loss on the client's training data)."""
    personalize = getattr(client, "personal_state", None)
    if personalize is None:
        return None
    shared = dict(extras or {})
    if context is not None and "ctx" in inspect.signature(personalize).parameters:
        return lambda client_id: personalize(global_state, store.get(client_id), shared,
                                             ctx=context(client_id))
    return lambda client_id: personalize(global_state, store.get(client_id), shared)
