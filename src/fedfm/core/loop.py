"""The round loop, identical for every runtime.

```
select clients -> drop some (simulated) -> runtime runs the client half on each -> ClientUpdate
  -> validate -> server rule (aggregate + server optimizer) -> new global State
  -> evaluate every k rounds and at the end -> checkpoint -> log
```

Every random choice is derived from ``(seed, round[, client])`` rather than drawn from a shared
stream, so a run resumed from round r makes exactly the choices the uninterrupted run made.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fedfm.core import state as state_ops
from fedfm.core.algorithm import ClientState, ServerRule
from fedfm.core.client_store import ClientStore
from fedfm.core.state import State
from fedfm.core.update import (
    WIRE_BYTES,
    WIRE_BYTES_TOTAL,
    Broadcast,
    ClientUpdate,
    UpdateBatch,
    validate_update,
)


def derive_seed(seed: int, *path: int) -> int:
    """A 31-bit seed that depends only on ``seed`` and ``path`` (e.g. round, client)."""
    return int(np.random.SeedSequence([seed, *path]).generate_state(1)[0] & 0x7FFFFFFF)


_SAMPLING, _DROPOUT = 1, 2


def sample_clients(seed: int, round: int, num_clients: int, sample_size: int) -> list[int]:
    """Seeded uniform sampling without replacement; sorted ids."""
    if sample_size >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, round, _SAMPLING])
    return sorted(int(i) for i in rng.choice(num_clients, size=sample_size, replace=False))


def sample_clients_poisson(seed: int, round: int, num_clients: int, rate: float) -> list[int]:
    """Each client joins independently with probability ``rate`` (what DP accounting with
    Poisson sampling assumes); sorted ids, possibly none."""
    rng = np.random.default_rng([seed, round, _SAMPLING])
    return [int(i) for i in np.flatnonzero(rng.random(num_clients) < rate)]


def simulate_dropouts(seed: int, round: int, client_ids: list[int], prob: float) -> set[int]:
    """Each selected client independently drops out with probability ``prob``."""
    if prob <= 0.0:
        return set()
    rng = np.random.default_rng([seed, round, _DROPOUT])
    draws = rng.random(len(client_ids))
    return {cid for cid, u in zip(client_ids, draws, strict=True) if u < prob}


class RoundAborted(RuntimeError):
    """The server could not aggregate this round correctly (e.g. secure aggregation lost too
    many clients); the round keeps the previous global State and records why."""


@dataclass
class ClientOutcome:
    """What the runtime reports for one selected client."""

    client_id: int
    update: ClientUpdate | None  # None: dropped out or failed
    wall_time: float = 0.0
    bytes_down: int = 0
    bytes_up: int = 0
    status: str = "ok"  # ok | dropped | failed | rejected
    error: str | None = None
    client_state: ClientState | None = None  # committed to the store only if accepted


@dataclass
class EvalReport:
    global_metrics: dict[str, float] = field(default_factory=dict)
    per_client: dict[int, dict[str, float]] = field(default_factory=dict)  # the global model
    # each client's own model (personal state, cluster, domain adapter, local fine-tuning) on
    # its own validation split; empty when the algorithm keeps nothing personal
    personalized: dict[int, dict[str, float]] = field(default_factory=dict)


class Runtime(Protocol):
    """Where client halves run. Implementations live in ``fedfm.runtime``.

    Optional: ``select_clients(round, selection) -> list[int]`` replaces the loop's seeded
    selection (the ``remote`` runtime picks among clients that are online and over-selects);
    ``folds_updates = True`` asks the loop to fold each accepted update into a running sum as
    it arrives (updates that live on disk are then read once).

    A server rule may have ``decode_update(update, global_state) -> ClientUpdate`` (compressed
    uploads); the loop calls it before validating an update, and a ValueError rejects it.
    It may have ``evaluation_extras(global_state) -> dict[str, State]``: named States (cluster
    models, domain adapters) that the client half's ``personal_state(global_state,
    client_state, extras)`` needs to build each client's own model for evaluation."""

    def run_clients(self, client_ids: list[int], broadcast: Broadcast,
                    round: int) -> Iterator[ClientOutcome]: ...

    def evaluate(self, global_state: State, *, round: int, per_client: bool,
                 extras: Mapping[str, State] | None = None) -> EvalReport: ...

    def close(self) -> None: ...


class RoundObserver(Protocol):
    """Progress and logging hooks (console, metrics files)."""

    def on_round_start(self, round: int, selected: list[int]) -> None: ...
    def on_client_done(self, round: int, outcome: ClientOutcome) -> None: ...
    def on_round_end(self, record: dict[str, Any]) -> None: ...


class Checkpointer(Protocol):
    def should_save(self, round: int, last_round: int) -> bool: ...
    def save(self, snapshot: LoopSnapshot) -> None: ...


@dataclass
class LoopSnapshot:
    """Everything the loop needs to continue exactly after ``round``."""

    round: int
    global_state: State
    server_state: dict[str, State]
    totals: dict[str, float]


@dataclass
class LoopSettings:
    seed: int
    num_clients: int
    sample_size: int
    rounds: int
    dropout_prob: float = 0.0
    eval_every: int = 1
    eval_enabled: bool = True
    eval_at_start: bool = False
    per_client_eval: bool = True
    sampling: str = "fixed"  # fixed: sample_size clients; poisson: each with sample_size / n
    # fewer accepted updates than this: the round is aborted and keeps the global State
    min_updates: int = 1


FairnessFn = Callable[[Mapping[int, Mapping[str, float]]], dict[str, float]]


class RoundLoop:
    """Drives rounds ``start+1 .. settings.rounds``."""

    def __init__(self, *, settings: LoopSettings, server: ServerRule, runtime: Runtime,
                 observers: list[RoundObserver] | None = None,
                 checkpointer: Checkpointer | None = None,
                 fairness: FairnessFn | None = None,
                 client_store: ClientStore | None = None) -> None:
        self.settings = settings
        self.client_store = client_store
        self.server = server
        self.runtime = runtime
        self.observers = list(observers or [])
        self.checkpointer = checkpointer
        self.fairness = fairness

    def run(self, snapshot: LoopSnapshot) -> LoopSnapshot:
        if snapshot.round == 0 and self.settings.eval_at_start and self.settings.eval_enabled:
            record = {"round": 0, "eval": self._evaluate(snapshot.global_state, 0)}
            self._emit_end(record)
        while snapshot.round < self.settings.rounds:
            snapshot = self.run_round(snapshot)
        return snapshot

    def run_round(self, snapshot: LoopSnapshot) -> LoopSnapshot:
        settings = self.settings
        round_index = snapshot.round + 1
        round_start = time.perf_counter()
        if settings.sampling == "poisson":
            selected = sample_clients_poisson(settings.seed, round_index, settings.num_clients,
                                              settings.sample_size / settings.num_clients)
        else:
            selected = sample_clients(settings.seed, round_index, settings.num_clients,
                                      settings.sample_size)
        select = getattr(self.runtime, "select_clients", None)
        if select is not None:
            selected = select(round_index, selected)
        dropped = simulate_dropouts(settings.seed, round_index, selected, settings.dropout_prob)
        for observer in self.observers:
            observer.on_round_start(round_index, selected)

        broadcast = Broadcast(global_state=snapshot.global_state,
                              extras=self.server.broadcast_extras(snapshot.global_state),
                              round=round_index)
        bytes_down = broadcast.num_bytes()
        outcomes = [ClientOutcome(cid, None, bytes_down=bytes_down, status="dropped")
                    for cid in selected if cid in dropped]
        for outcome in outcomes:
            self._emit_client(round_index, outcome)
        active = [cid for cid in selected if cid not in dropped]
        client_start = time.perf_counter()
        updates = UpdateBatch(fold=getattr(self.runtime, "folds_updates", False))
        for outcome in self.runtime.run_clients(active, broadcast, round_index):
            outcome = self._screen(outcome, snapshot.global_state)
            outcome.bytes_down = bytes_down
            if outcome.status == "ok" and outcome.update is not None:
                updates.append(outcome.update)
                if outcome.client_state is not None and self.client_store is not None:
                    self.client_store.put(outcome.client_id, outcome.client_state)
            outcomes.append(outcome)
            self._emit_client(round_index, outcome)
        client_time = time.perf_counter() - client_start

        aggregate_start = time.perf_counter()
        new_global = snapshot.global_state
        aborted = None
        if 0 < len(updates) < settings.min_updates:
            aborted = (f"only {len(updates)} updates were accepted, fewer than the "
                       f"{settings.min_updates} needed (min_updates)")
        elif updates or getattr(self.server, "aggregates_empty_rounds", False):
            try:
                new_global = self.server.aggregate(snapshot.global_state, updates, round_index)
            except RoundAborted as exc:
                aborted = str(exc)
        aggregate_time = time.perf_counter() - aggregate_start

        record = self._round_record(round_index, selected, outcomes, updates)
        if aborted is not None:
            record["aborted"] = aborted
        round_metrics = getattr(self.server, "round_metrics", None)
        if round_metrics is not None and aborted is None:  # e.g. the privacy budget spent
            found = dict(round_metrics())
            _book_wire_bytes(record, found.pop(WIRE_BYTES, None))
            _book_wire_bytes(record, found.pop(WIRE_BYTES_TOTAL, None), add_down=False)
            record.update(found)
        eval_time = 0.0
        if self._is_eval_round(round_index):
            eval_start = time.perf_counter()
            record["eval"] = self._evaluate(new_global, round_index)
            eval_time = time.perf_counter() - eval_start

        totals = dict(snapshot.totals)
        totals["bytes_up"] = totals.get("bytes_up", 0) + record["bytes_up"]
        totals["bytes_down"] = totals.get("bytes_down", 0) + record["bytes_down"]
        round_time = time.perf_counter() - round_start
        totals["wall_time"] = totals.get("wall_time", 0.0) + round_time
        record["wall_time"] = {"clients": client_time, "aggregate": aggregate_time,
                               "eval": eval_time, "round": round_time}
        next_snapshot = LoopSnapshot(round_index, new_global, self.server.state_dict(), totals)
        # metrics first: a crash before the checkpoint reruns the round and truncates its line
        self._emit_end(record)
        if self.checkpointer is not None and self.checkpointer.should_save(
                round_index, settings.rounds):
            self.checkpointer.save(next_snapshot)
        return next_snapshot

    # ------------------------------------------------------------------ helpers

    def _screen(self, outcome: ClientOutcome, global_state: State) -> ClientOutcome:
        """A broken or malicious update is rejected and recorded; it never crashes the server."""
        if outcome.status != "ok" or outcome.update is None:
            return outcome
        try:
            decode = getattr(self.server, "decode_update", None)  # e.g. compressed uploads
            if decode is not None:
                outcome.update = decode(outcome.update, global_state)
            validate_update(outcome.update, global_state)
            check = getattr(self.server, "check_update", None)
            if check is not None:
                check(outcome.update, global_state)
        except (ValueError, TypeError, KeyError) as exc:
            outcome.status, outcome.error = "rejected", str(exc)
        return outcome

    def _is_eval_round(self, round_index: int) -> bool:
        if not self.settings.eval_enabled:
            return False
        return round_index % self.settings.eval_every == 0 or round_index == self.settings.rounds

    def _evaluate(self, global_state: State, round_index: int) -> dict[str, Any]:
        # a server rule that keeps more than one model (cluster models, domain adapters) hands
        # them to the clients' personal models through ``evaluation_extras``
        # (passed only then, so a runtime written before extras existed keeps working)
        extras_of = getattr(self.server, "evaluation_extras", None)
        more = {"extras": extras_of(global_state)} if extras_of is not None else {}
        report = self.runtime.evaluate(
            global_state, round=round_index, per_client=self.settings.per_client_eval, **more)
        result: dict[str, Any] = {"global": report.global_metrics}
        if report.per_client:
            result["per_client"] = {str(k): v for k, v in sorted(report.per_client.items())}
            if self.fairness is not None:
                result["fairness"] = self.fairness(report.per_client)
        if report.personalized:
            result["personalized"] = {str(k): v for k, v in sorted(report.personalized.items())}
            if self.fairness is not None:
                result["personalized_fairness"] = self.fairness(report.personalized)
        return result

    def _round_record(self, round_index: int, selected: list[int],
                      outcomes: list[ClientOutcome], updates: UpdateBatch) -> dict[str, Any]:
        clients: dict[str, dict[str, Any]] = {}
        for outcome in sorted(outcomes, key=lambda o: o.client_id):
            entry: dict[str, Any] = {"status": outcome.status, "wall_time": outcome.wall_time,
                                     "bytes_up": outcome.bytes_up,
                                     "bytes_down": outcome.bytes_down}
            if outcome.update is not None and outcome.status == "ok":
                entry["num_examples"] = outcome.update.num_examples
                entry.update({k: v for k, v in outcome.update.metrics.items()
                              if k not in entry})
            if outcome.error:
                entry["error"] = outcome.error
            clients[str(outcome.client_id)] = entry
        record: dict[str, Any] = {
            "round": round_index,
            "selected": selected,
            "completed": sorted(u.client_id for u in updates),
            "bytes_up": sum(o.bytes_up for o in outcomes),
            "bytes_down": sum(o.bytes_down for o in outcomes),
            "clients": clients,
        }
        train_loss = _weighted_metric(updates, "train_loss")
        if train_loss is not None:
            record["train_loss"] = train_loss
        processed = sum(u.metrics.get("processed_tokens", 0.0) for u in updates)
        if processed > 0:
            useful = sum(u.metrics.get("useful_tokens", 0.0) for u in updates)
            record["padding_efficiency"] = useful / processed
        if updates:
            mean = updates.folded_mean("examples")
            if mean is None:
                mean = state_ops.weighted_mean((u.payload for u in updates),
                                               [u.num_examples for u in updates])
            record["update_norm"] = state_ops.global_norm(mean)
        return record

    def _emit_client(self, round_index: int, outcome: ClientOutcome) -> None:
        for observer in self.observers:
            observer.on_client_done(round_index, outcome)

    def _emit_end(self, record: dict[str, Any]) -> None:
        for observer in self.observers:
            observer.on_round_end(record)


def _book_wire_bytes(record: dict[str, Any], wire: dict[int, tuple[int, int]] | None, *,
                     add_down: bool = True) -> None:
    """A protocol that replaced the clients' uploads (secure aggregation) sent its own bytes:
    they replace each such client's payload size up and add to its broadcast down (or, with
    ``add_down=False``, replace it: split learning clients only receive their part)."""
    if not wire:
        return
    for client_id, (sent, received) in wire.items():
        entry = record["clients"].get(str(client_id))
        if entry is None:
            continue
        entry["bytes_up"] = int(sent)
        base = int(entry.get("bytes_down", 0)) if add_down else 0
        entry["bytes_down"] = base + int(received)
    record["bytes_up"] = sum(int(e.get("bytes_up", 0)) for e in record["clients"].values())
    record["bytes_down"] = sum(int(e.get("bytes_down", 0)) for e in record["clients"].values())


def _weighted_metric(updates: list[ClientUpdate], name: str) -> float | None:
    pairs = [(u.metrics[name], u.num_examples) for u in updates if name in u.metrics]
    if not pairs:
        return None
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total
