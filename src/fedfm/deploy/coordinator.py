"""The coordinator: the simulator's round loop with the ``remote`` runtime, made crash-safe.

``Coordinator`` owns the durable state (``StateStore``, the run directory with its checkpoints,
the update files) and runs ``RoundLoop`` in a background thread; the HTTP layer
(``fedfm.deploy.app``) calls into it for registrations, task polls, downloads and uploads.

How a round survives ``kill -9``: the round's selection, target and tasks are committed before
any task is handed out; an upload is validated, written to its final file and fsynced, and only
then accepted in the database (the client hears 200 after that); the round's aggregate is a
checkpoint, after which the round is marked done and its update files removed. A restart with
the same command restores the newest checkpoint, reopens the round that was in flight with the
same selection, yields the updates already accepted from disk and waits only for the missing
ones; a round that was aggregated but not yet checkpointed is aggregated again from the same
files, so it ends with the same State.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedfm.config import ConfigError, RunConfig, dump_config, load_config
from fedfm.core.checkpoint import CheckpointManager
from fedfm.core.client_store import MemoryClientStore
from fedfm.core.loop import (
    ClientOutcome,
    EvalReport,
    LoopSettings,
    LoopSnapshot,
    RoundLoop,
)
from fedfm.core.state import State
from fedfm.core.update import Broadcast, validate_update
from fedfm.deploy import wire
from fedfm.deploy.faults import CRASH_ENV, crash_point
from fedfm.deploy.store import (
    ACCEPTED,
    CANCELLED,
    EXPIRED,
    FINAL_STATUSES,
    OPEN,
    REJECTED,
    StateStore,
    TaskRecord,
    atomic_write_bytes,
    fsync_directory,
)
from fedfm.tracking import MetricsFileSink, RunDirectory

log = logging.getLogger("fedfm.deploy")
_SELECTION_STREAM = 4


class CoordinatorStopped(Exception):
    """``Coordinator.stop()`` was called: the loop leaves at its next wait."""


class DeployError(Exception):
    """A request the coordinator refuses: ``status`` is the HTTP code, ``detail`` says why."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def check_deployable(config: RunConfig) -> None:
    """Reject what a real deployment cannot do, before anything is loaded."""
    from fedfm.efficiency.lora import SLICED_UPLOADS

    if config.robustness.attack is not None:
        raise ConfigError("invalid config: robustness.attack simulates malicious clients; a "
                          "deployment has real ones (remove robustness.attack)")
    if config.federation.dropout_prob > 0:
        raise ConfigError("invalid config: federation.dropout_prob simulates dropouts; a "
                          "deployment's clients drop out by themselves (set it to 0; "
                          "deploy.min_updates is the dropout tolerance)")
    if config.privacy.client_dp is not None and config.privacy.client_dp.sampling == "poisson":
        raise ConfigError("invalid config: privacy.client_dp.sampling 'poisson' assumes each "
                          "client joins independently at random, which a coordinator that "
                          "picks among online clients cannot promise; use sampling: fixed")
    if config.privacy.secure_aggregation is not None and config.privacy.client_dp is not None:
        raise ConfigError("invalid config: privacy.secure_aggregation with privacy.client_dp "
                          "(distributed DP noise) runs in simulation only so far; a deployment "
                          "runs secure aggregation with the mean aggregator, or client_dp with "
                          "central noise")
    from fedfm.efficiency.split import check_split_deployable

    check_split_deployable(config)
    if config.algorithm.name == "fedmkt":
        raise ConfigError("invalid config: algorithm 'fedmkt' runs in simulation only so far: "
                          "its clients distil the broadcast teacher logits on the public data, "
                          "which the client agents do not load yet (feddf deploys)")
    if config.algorithm.name == "fedot":
        raise ConfigError("invalid config: algorithm 'fedot' runs in simulation only so far: "
                          "its clients train an emulator view of the simulator's full model "
                          "(fedfm.trust.ip.offsite.save_emulator writes the directory an "
                          "owner would ship)")
    if config.algorithm.name == "fedbpt":
        raise ConfigError("invalid config: algorithm 'fedbpt' runs in simulation only so far: "
                          "its clients query the model through the simulator's process")
    if config.algorithm.name in (*SLICED_UPLOADS, "fedkseed"):
        raise ConfigError(f"invalid config: algorithm {config.algorithm.name!r} runs in "
                          f"simulation only so far: its uploads are rank slices, A alone "
                          f"or (seed, scalar) pairs, and the deployment's wire format carries "
                          f"the global State's shapes")
    if config.algorithm.compression is not None:
        raise ConfigError("invalid config: algorithm.compression runs in simulation only so "
                          "far; the deployment's wire format carries dense updates (remove "
                          "algorithm.compression)")
    if config.deploy.min_updates > config.federation.sample_size():
        raise ConfigError(f"invalid config: deploy.min_updates={config.deploy.min_updates} "
                          f"exceeds the clients per round ({config.federation.sample_size()})")


@dataclass
class RoundView:
    """What the dashboard shows of the round in flight."""

    index: int = 0
    state: str = "waiting_for_clients"
    deadline: float | None = None
    selected: list[int] = field(default_factory=list)
    target: int = 0


class Coordinator:
    """Durable state + the round loop thread. Thread-safe for the HTTP layer."""

    def __init__(self, config: RunConfig, state_dir: str | Path) -> None:
        from fedfm.api import check_components

        check_components(config)
        check_deployable(config)
        self.config = config
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = StateStore(self.state_dir / "coordinator.db")
        self._claim_state_dir(config)
        self.run_dir = RunDirectory(self.state_dir / "run")
        self.run_dir.path.mkdir(parents=True, exist_ok=True)
        self.run_dir.write_config(config)
        self.changed = threading.Condition()
        self.view = RoundView()
        self.run_state = "starting"
        self.error: str | None = None
        self.started_at = time.time()
        self.finished_at: float | None = None
        self.global_state: State | None = None
        self._broadcast_bytes: dict[int, tuple[bytes, str]] = {}
        self._state_bytes: int | None = None  # the State's serialized size (upload limit)
        self._last_touch: dict[str, float] = {}
        self._thread: threading.Thread | None = None
        self.finished = threading.Event()
        self.stopping = threading.Event()
        self.algorithm: Any = None
        self.workload: Any = None
        self.secure: Any = None  # NetworkSecureSum when the run uses secure aggregation
        self.secure_round: Any = None  # the protocol of the round in flight

    # ------------------------------------------------------------------ set-up

    def _claim_state_dir(self, config: RunConfig) -> None:
        digest = config.config_hash()
        saved = self.store.get_meta("config_hash")
        if saved is None:
            self.store.set_meta("config_hash", digest)
            self.store.set_meta("config", json.dumps(config.model_dump(mode="json")))
            self.store.set_meta("created_at", str(time.time()))
        elif saved != digest:
            raise ConfigError(f"--state-dir {self.state_dir} holds a run with another config "
                              f"(hash {saved[:12]}, this one {digest[:12]}); use a new state "
                              f"directory or the config that run started with")

    def prepare(self) -> LoopSnapshot:
        """Build the server half and the evaluation model; restore the newest checkpoint."""
        from fedfm.api import _restore, build_algorithm, seed_everything

        seed_everything(self.config.seed)
        self.algorithm = build_algorithm(self.config)
        self.secure = _network_secure_sum(self.algorithm)
        self.workload = build_server_workload(self.config, self.algorithm)
        snapshot = LoopSnapshot(round=0, global_state=self.workload.get_state(),
                                server_state={}, totals={})
        snapshot = _restore(self.run_dir, self.algorithm, MemoryClientStore(), snapshot)
        self._remove_done_rounds(snapshot.round)
        self.global_state = snapshot.global_state
        self.view.index = snapshot.round
        return snapshot

    def _remove_done_rounds(self, last_done: int) -> None:
        for directory in (self.state_dir / "updates").glob("round_*"):
            if int(directory.name.split("_")[1]) <= last_done:
                shutil.rmtree(directory, ignore_errors=True)
        shutil.rmtree(self.state_dir / "incoming", ignore_errors=True)

    def start(self) -> None:
        snapshot = self.prepare()
        self._thread = threading.Thread(target=self._run, args=(snapshot,), daemon=True,
                                        name="fedfm-round-loop")
        self._thread.start()

    def _run(self, snapshot: LoopSnapshot) -> None:
        from fedfm.api import _finish
        from fedfm.eval import fairness_summary, primary_metric

        config = self.config
        metric, higher = primary_metric(self.workload.bundle.task, config.data.format)
        settings = LoopSettings(
            seed=config.seed, num_clients=config.federation.num_clients,
            sample_size=config.federation.sample_size(), rounds=config.federation.rounds,
            eval_every=config.eval.every, eval_enabled=config.eval.enabled,
            eval_at_start=config.eval.at_start, per_client_eval=config.eval.per_client,
            min_updates=config.deploy.min_updates)
        loop = RoundLoop(settings=settings, server=self.algorithm.server,
                         runtime=RemoteRuntime(self),
                         observers=[MetricsFileSink(self.run_dir), _CrashObserver()],
                         checkpointer=DeployCheckpointer(self), client_store=MemoryClientStore(),
                         fairness=lambda per_client: fairness_summary(
                             dict(per_client), metric=metric, higher_is_better=higher))
        try:
            self._set_state("running")
            final = loop.run(snapshot)
            _finish(config, self.run_dir, final, self.workload, show=False)
            self._set_state("finished")
        except CoordinatorStopped:
            self._set_state("stopped")
        except Exception as exc:  # noqa: BLE001 - reported on the dashboard and the log
            log.exception("the round loop failed")
            self.error = f"{type(exc).__name__}: {exc}"
            self._set_state("failed")
        finally:
            self.finished.set()

    def stop(self) -> None:
        """Leave the round loop at its next wait (the round in flight resumes on restart)."""
        self.stopping.set()
        self.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def wait(self, timeout: float) -> None:
        """Wait on ``changed`` (held by the caller) unless stopping."""
        if self.stopping.is_set():
            raise CoordinatorStopped
        self.changed.wait(timeout=timeout)

    def _set_state(self, state: str) -> None:
        with self.changed:
            self.run_state = state
            if state in ("finished", "failed", "stopped"):
                self.finished_at = time.time()
            if state == "finished":
                self.view.state = "done"
            self.changed.notify_all()

    # ------------------------------------------------------------------ rounds

    def seen(self, name: str) -> None:
        """Record a request from ``name`` (last seen); at most one database write a second
        per client, since each commit is an fsync."""
        now = time.monotonic()
        if now - self._last_touch.get(name, -1e9) >= 1.0:
            self._last_touch[name] = now
            self.store.touch(name)

    def notify(self) -> None:
        with self.changed:
            self.changed.notify_all()

    def publish_round(self, broadcast: Broadcast, selected: list[int], target: int) -> float:
        """Write the round's broadcast, then open it (tasks become visible); the deadline."""
        payload = wire.broadcast_to_bytes(broadcast)
        self._broadcast_bytes = {broadcast.round: (payload, _sha256(payload))}
        self.global_state = broadcast.global_state
        deadline = time.time() + self.config.deploy.round_timeout_s
        record = self.store.open_round(broadcast.round, selected, target, deadline)
        with self.changed:
            self.view = RoundView(broadcast.round, "training", deadline, record.selected, target)
            self.changed.notify_all()
        crash_point("round_opened", broadcast.round)
        return deadline

    def broadcast_for(self, task: TaskRecord) -> tuple[bytes, str]:
        found = self._broadcast_bytes.get(task.round)
        if found is None:
            raise DeployError(409, f"task {task.task_id} belongs to round {task.round}, whose "
                                   f"broadcast is no longer served (the current round is "
                                   f"{self.view.index})")
        return found

    def update_limit(self) -> int:
        if self.config.deploy.max_upload_mb is not None:
            return int(self.config.deploy.max_upload_mb * 2**20)
        if self._state_bytes is None:
            from fedfm.core import state as state_ops

            self._state_bytes = state_ops.num_bytes(self.global_state or {})
        return 4 * self._state_bytes + 2**20

    # ------------------------------------------------------------------ uploads

    def task_for_upload(self, client_id: int | None, task_id: str) -> TaskRecord:
        """The task an upload targets, if this client may still upload for it."""
        task = self.store.get_task(task_id)
        if task is None:
            raise DeployError(404, f"no task {task_id!r}")
        if client_id is None or task.client_id != client_id:
            raise DeployError(403, f"task {task_id} is not assigned to this client")
        if task.status == ACCEPTED:
            raise DeployError(409, f"task {task_id}: an update was already received (replay)")
        if task.status != OPEN:
            raise DeployError(409, f"task {task_id} is closed ({task.status}"
                                   f"{': ' + task.error if task.error else ''})")
        if task.round != self.view.index:
            raise DeployError(409, f"task {task_id} is for round {task.round}; the current "
                                   f"round is {self.view.index} (stale upload)")
        return task

    def receive_update(self, task: TaskRecord, incoming: Path, sha256: str) -> dict[str, Any]:
        """Validate an uploaded file and accept it, or reject the client for this round."""
        reference = self.global_state
        assert reference is not None
        try:
            facts = wire.check_header(incoming, reference)
            _check_identity(facts, task)
            update = wire.load_update(incoming)
            validate_update(update, reference)
            check = getattr(self.algorithm.server, "check_update", None)
            if check is not None:
                check(update, reference)
        except (ValueError, TypeError, KeyError) as exc:
            incoming.unlink(missing_ok=True)
            reason = str(exc)
            log.warning("client %s: update for %s rejected: %s", task.client_id, task.task_id,
                        reason)
            self.store.close_task(task.task_id, REJECTED, reason)
            self.notify()
            raise DeployError(422, f"update rejected, client excluded from round "
                                   f"{task.round}: {reason}") from None
        final = self.update_path(task)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(incoming, final)
        fsync_directory(final.parent)
        metrics = {**update.metrics, "num_examples": update.num_examples}
        wall_time = float(update.metadata.get("wall_time", 0.0) or 0.0)
        if not self.store.accept_update(task.task_id, final, sha256, final.stat().st_size,
                                        wall_time, metrics):
            raise DeployError(409, f"task {task.task_id} closed while the upload arrived")
        accepted = sum(1 for t in self.store.round_tasks(task.round) if t.status == ACCEPTED)
        crash_point("update_accepted", task.round, accepted)
        self.notify()
        return {"accepted": True, "task_id": task.task_id, "round": task.round}

    def update_path(self, task: TaskRecord) -> Path:
        return (self.state_dir / "updates" / f"round_{task.round:04d}"
                / f"client_{task.client_id}.safetensors")

    def incoming_path(self) -> Path:
        directory = self.state_dir / "incoming"
        directory.mkdir(parents=True, exist_ok=True)
        return directory / f"{time.time_ns()}-{os.getpid()}-{threading.get_ident()}.part"

    # ------------------------------------------------------------------ polls and status

    def next_task(self, client_id: int | None, wait: float) -> TaskRecord | None:
        """An open task for this client, waiting up to ``wait`` seconds for one."""
        if client_id is None:
            return None
        until = time.monotonic() + wait
        with self.changed:
            while True:
                task = self.store.open_task_for(client_id)
                if task is not None and task.round in self._broadcast_bytes:
                    return task
                remaining = until - time.monotonic()
                if remaining <= 0 or self.finished.is_set() or self.stopping.is_set():
                    return None
                self.changed.wait(timeout=min(remaining, 1.0))

    # ------------------------------------------------------------------ secure aggregation

    def secure_act(self, client_id: int | None, round_index: int, action: Any) -> Any:
        """Run ``action(secure_round)`` for a client's step message, mapping refusals."""
        with self.changed:
            found = self._secure_round(round_index)
            try:
                result = action(found)
            except PermissionError as exc:
                raise DeployError(403, str(exc)) from None
            except (LookupError, FileExistsError) as exc:
                raise DeployError(409, str(exc)) from None
            except (ValueError, TypeError) as exc:
                raise DeployError(422, str(exc)) from None
            self.changed.notify_all()
            return result

    def secure_wait(self, client_id: int | None, round_index: int, phase: str, wait: float,
                    action: Any) -> Any:
        """``action(secure_round)`` once the protocol reaches ``phase`` (None: not yet)."""
        from fedfm.deploy.secure import PHASES

        until = time.monotonic() + wait
        with self.changed:
            while True:
                found = self._secure_round(round_index)
                if PHASES.index(found.phase) > PHASES.index(phase):
                    raise DeployError(409, f"secure aggregation of round {round_index} is past "
                                           f"step {phase!r} (now {found.phase!r})")
                if found.phase == phase:
                    return self.secure_act(client_id, round_index, action)
                remaining = until - time.monotonic()
                if remaining <= 0 or self.stopping.is_set():
                    return None
                self.changed.wait(timeout=min(remaining, 1.0))

    def _secure_round(self, round_index: int) -> Any:
        found = self.secure_round
        if found is None or found.round != round_index:
            raise DeployError(409, f"no secure aggregation is in progress for round "
                                   f"{round_index}")
        return found

    def status(self) -> dict[str, Any]:
        deploy = self.config.deploy
        now = time.time()
        latest = self.store.latest_client_metrics()
        completed = self.store.rounds_completed()
        received = 0
        if self.view.index and self.view.state == "training":
            received = sum(1 for t in self.store.round_tasks(self.view.index)
                           if t.status == ACCEPTED)
        clients = []
        for record in self.store.clients():
            if record.role != "client":
                continue
            online = record.last_seen is not None and now - record.last_seen <= \
                deploy.offline_after_s
            client_id = -1 if record.client_id is None else record.client_id
            last_round, metrics = latest.get(client_id, (None, {}))
            clients.append({
                "name": record.name, "id": record.client_id,
                "status": "revoked" if record.revoked else ("online" if online else "offline"),
                "last_seen": record.last_seen,
                "rounds_completed": completed.get(client_id, 0),
                "last_round": last_round, "metrics": metrics})
        return {
            "run": {"name": self.config.name, "state": self.run_state,
                    "rounds": self.config.federation.rounds,
                    "algorithm": self.config.algorithm.name, "model": self.config.model.name,
                    "started_at": self.started_at, "finished_at": self.finished_at,
                    "error": self.error},
            "round": {"index": self.view.index, "state": self.view.state,
                      "deadline": self.view.deadline, "selected": self.view.selected,
                      "received": received, "target": self.view.target},
            "clients": clients,
            "server_time": now,
        }

    def online_clients(self) -> list[int]:
        return self.store.training_clients(online_within=self.config.deploy.offline_after_s)


def _network_secure_sum(algorithm: Any) -> Any:
    """Point the secure-mean aggregator at the network protocol (None: no secure agg.)."""
    from fedfm.deploy.secure import NetworkSecureSum
    from fedfm.trust.robust.attacks import server_aggregator
    from fedfm.trust.secagg.aggregation import SecureMean

    aggregator = server_aggregator(algorithm.server)
    if not isinstance(aggregator, SecureMean):
        return None
    aggregator.summer = NetworkSecureSum(aggregator.summer)
    return aggregator.summer


def _check_identity(facts: dict[str, Any], task: TaskRecord) -> None:
    for name, expected in (("client_id", task.client_id), ("round", task.round),
                           ("task_id", task.task_id)):
        if facts.get(name) != expected:
            raise ValueError(f"upload: {name} is {facts.get(name)!r}, but the task says "
                             f"{expected!r}")


def _sha256(payload: bytes) -> str:
    import hashlib

    return hashlib.sha256(payload).hexdigest()


class _CrashObserver:
    """Crash points around the end of a round (after the record, before the checkpoint)."""

    def on_round_start(self, round: int, selected: list[int]) -> None:
        return None

    def on_client_done(self, round: int, outcome: ClientOutcome) -> None:
        return None

    def on_round_end(self, record: dict[str, Any]) -> None:
        crash_point("aggregated", int(record.get("round", 0)))


class DeployCheckpointer(CheckpointManager):
    """Every round is checkpointed; then it is marked done and its update files go."""

    def __init__(self, coordinator: Coordinator) -> None:
        super().__init__(coordinator.run_dir.checkpoints, every=1,
                         keep=coordinator.config.tracking.keep_checkpoints)
        self.coordinator = coordinator

    def should_save(self, round_index: int, last_round: int) -> bool:
        return True

    def save(self, snapshot: LoopSnapshot) -> Path:
        path = super().save(snapshot)
        crash_point("checkpointed", snapshot.round)
        coordinator = self.coordinator
        coordinator.store.set_round_state(snapshot.round, "done")
        coordinator._remove_done_rounds(snapshot.round)
        return path


class RemoteRuntime:
    """Client halves run in client agents; this side hands out tasks and gathers updates."""

    folds_updates = True

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self.target = 0
        # round -> client -> metrics the client measured with the global model it received
        self.client_eval: dict[int, dict[int, dict[str, float]]] = {}

    def _note_eval(self, round_index: int, client_id: int, metadata: dict[str, Any]) -> None:
        found = metadata.get("eval")
        if isinstance(found, dict):
            self.client_eval.setdefault(round_index, {})[client_id] = {
                k: float(v) for k, v in found.items()
                if isinstance(v, int | float) and not isinstance(v, bool)}

    # ------------------------------------------------------------------ selection

    def select_clients(self, round_index: int, selection: list[int]) -> list[int]:
        """The round's clients: as recorded (a restart), else among the online ones once
        ``min_clients`` are online -- the loop's seeded choice where those are online, then
        a seeded draw of the others, ``over_selection`` more than the target."""
        coordinator = self.coordinator
        existing = coordinator.store.get_round(round_index)
        if existing is not None:
            self.target = existing.target
            return existing.selected
        deploy = coordinator.config.deploy
        wanted = coordinator.config.federation.sample_size()
        minimum = deploy.min_clients if deploy.min_clients is not None else wanted
        with coordinator.changed:
            coordinator.view = RoundView(round_index, "waiting_for_clients")
            coordinator.changed.notify_all()
            while len(coordinator.online_clients()) < minimum:
                coordinator.wait(1.0)
        online = coordinator.online_clients()
        size = min(len(online), wanted + math.ceil(wanted * deploy.over_selection))
        preferred = [c for c in selection if c in online]
        others = [c for c in online if c not in selection]
        np.random.default_rng([coordinator.config.seed, round_index, _SELECTION_STREAM]
                              ).shuffle(others)
        chosen = sorted((preferred + others)[:size])
        self.target = min(wanted, len(chosen))
        return chosen

    # ------------------------------------------------------------------ rounds

    def run_clients(self, client_ids: list[int], broadcast: Broadcast,
                    round: int) -> Iterator[ClientOutcome]:
        coordinator = self.coordinator
        deadline = coordinator.publish_round(broadcast, client_ids, self.target or len(client_ids))
        if coordinator.secure is not None:
            yield from self._run_secure(round, deadline)
            return
        target = coordinator.store.get_round(round).target  # type: ignore[union-attr]
        yielded: set[str] = set()
        while True:
            tasks = coordinator.store.round_tasks(round)
            yield from self._finished(tasks, yielded)
            accepted = sum(1 for t in tasks if t.status == ACCEPTED)
            if accepted >= target or all(t.status in FINAL_STATUSES for t in tasks) \
                    or time.time() >= deadline:
                break
            with coordinator.changed:
                coordinator.wait(min(1.0, max(0.0, deadline - time.time())))
        enough = accepted >= target
        for task in coordinator.store.round_tasks(round):
            if task.status == OPEN:
                coordinator.store.close_task(
                    task.task_id, CANCELLED if enough else EXPIRED,
                    "over-selected: the round had enough updates" if enough
                    else "no update by the round deadline")
        yield from self._finished(coordinator.store.round_tasks(round), yielded)
        with coordinator.changed:
            coordinator.view.state = "aggregating"
            coordinator.changed.notify_all()

    def _run_secure(self, round_index: int, deadline: float) -> Iterator[ClientOutcome]:
        """The round's SecAgg+ steps over the network (``fedfm.deploy.secure``): each waits
        for the clients still in the protocol or its deadline, then closes."""
        from fedfm.deploy.secure import SecureRound

        coordinator = self.coordinator
        store = coordinator.store
        tasks = store.round_tasks(round_index)
        if any(t.status != OPEN for t in tasks):  # restarted mid-protocol: its state is gone
            for task in tasks:
                store.close_task(task.task_id, EXPIRED, "secure aggregation state lost in a "
                                                        "coordinator restart")
            for task in store.round_tasks(round_index):
                yield ClientOutcome(task.client_id, None, status="dropped",
                                    error="secure aggregation state lost in a coordinator "
                                          "restart; the round is skipped")
            return
        like = coordinator.global_state
        assert like is not None
        rng = np.random.default_rng([coordinator.config.seed, round_index, 7])
        secure = SecureRound(round_index, [t.client_id for t in tasks], coordinator.secure,
                             sum(v.numel() for v in like.values()) + 1,
                             int(rng.integers(2**31)))
        with coordinator.changed:
            coordinator.secure_round = secure
            coordinator.changed.notify_all()
        step_timeout = coordinator.config.deploy.secagg_step_timeout_s
        for close, until in ((secure.close_advertise, deadline), (secure.close_share, None),
                             (secure.close_mask, None), (secure.close_unmask, None)):
            self._wait_step(secure, until or time.time() + step_timeout)
            with coordinator.changed:
                close()
                coordinator.changed.notify_all()
        coordinator.secure.results[round_index] = secure
        yield from self._secure_outcomes(secure, tasks)

    def _wait_step(self, secure: Any, until: float) -> None:
        coordinator = self.coordinator
        with coordinator.changed:
            while secure.waiting_for() and time.time() < until:
                coordinator.wait(min(1.0, max(0.0, until - time.time())))

    def _secure_outcomes(self, secure: Any, tasks: list[TaskRecord]
                         ) -> Iterator[ClientOutcome]:
        """Survivors yield a placeholder update (zeros with their real example count and
        metrics): the server rule takes the sum from the protocol, never from these."""
        from fedfm.core import state as state_ops
        from fedfm.core.update import ClientUpdate

        coordinator = self.coordinator
        survivors = set(secure.survivors())
        like = coordinator.global_state
        for task in tasks:
            if task.client_id not in survivors:
                step = "key advertisement" if task.client_id not in secure.keys else \
                    "key sharing" if task.client_id not in secure.outgoing else "masking"
                coordinator.store.close_task(task.task_id, EXPIRED,
                                             f"dropped out of secure aggregation at {step}")
                yield ClientOutcome(task.client_id, None, status="dropped",
                                    error=f"dropped out of secure aggregation at {step}")
                continue
            facts = secure.facts[task.client_id]
            self._note_eval(task.round, task.client_id, facts["metadata"])
            path = coordinator.update_path(task)
            atomic_write_bytes(path, secure.server.masked[task.client_id].tobytes())
            metrics = {**facts["metrics"], "num_examples": facts["num_examples"]}
            wall = float(facts["metadata"].get("wall_time", 0.0) or 0.0)
            coordinator.store.accept_update(task.task_id, path, "", path.stat().st_size, wall,
                                            metrics)
            update = ClientUpdate(task.client_id, state_ops.zeros_like(like),
                                  facts["num_examples"], metrics=dict(facts["metrics"]),
                                  metadata={**facts["metadata"], "secure_aggregation": True})
            yield ClientOutcome(task.client_id, update, wall_time=wall,
                                bytes_up=secure.up.get(task.client_id, 0))

    def _finished(self, tasks: list[TaskRecord], yielded: set[str]) -> Iterator[ClientOutcome]:
        for task in tasks:
            if task.status not in FINAL_STATUSES or task.task_id in yielded:
                continue
            yielded.add(task.task_id)
            yield self._outcome(task)

    def _outcome(self, task: TaskRecord) -> ClientOutcome:
        if task.status != ACCEPTED:
            status = "rejected" if task.status == REJECTED else "dropped"
            return ClientOutcome(task.client_id, None, status=status, error=task.error)
        record = self.coordinator.store.update_for(task.task_id)
        assert record is not None
        path = Path(record.path)
        update = wire.SpilledUpdate(path, wire.update_facts(path))
        self._note_eval(task.round, task.client_id, update.metadata)
        return ClientOutcome(task.client_id, update, wall_time=record.wall_time,
                             bytes_up=record.num_bytes)

    def evaluate(self, global_state: State, *, round: int, per_client: bool,
                 extras: Mapping[str, State] | None = None) -> EvalReport:
        """Global metrics on the coordinator's validation set (``data.validation_path``, when
        the coordinator has it); per-client metrics as the clients measured them on their own
        validation split, with the global model they received this round."""
        coordinator = self.coordinator
        report = EvalReport()
        if coordinator.workload.data.global_validation:
            report = coordinator.workload.evaluate(global_state, per_client=False)
        if per_client:
            report.per_client = dict(self.client_eval.get(round, {}))
        return report

    def close(self) -> None:
        return None


def build_server_workload(config: RunConfig, algorithm: Any) -> Any:
    """The coordinator's model (initial State, evaluation) and validation set: the rows of
    ``data.validation_path`` when that file is on the coordinator, else none."""
    import torch

    from fedfm.api import _bind_root_data, adapt_model
    from fedfm.data import FederatedData, build_federated_data, load_label_info
    from fedfm.models import load_model
    from fedfm.runtime.workload import Workload, resolve_device

    if config.runtime.num_threads is not None:
        torch.set_num_threads(config.runtime.num_threads)
    device = resolve_device(config.runtime)
    label_names, num_labels = (None, None)
    validation_path = config.data.validation_path
    has_validation = validation_path is not None and Path(validation_path.split("::")[0]).exists()
    labeled = config.data.format in ("classification", "image")
    if labeled and (has_validation or config.data.label_names):
        source = config.data if not has_validation else config.data.model_copy(
            update={"path": validation_path})
        label_names, num_labels = load_label_info(source)
    bundle = adapt_model(load_model(config.model, seed=config.seed, num_labels=num_labels),
                         config, algorithm)
    bundle.model.to(device)
    validation: list[dict[str, Any]] = []
    if has_validation:
        data_cfg = config.data.model_copy(update={"path": validation_path,
                                                  "client_validation_fraction": 0.0})
        built = build_federated_data(data_cfg, num_clients=1, tokenizer=bundle.tokenizer,
                                     task=bundle.task, max_length=config.model.max_length,
                                     seed=config.seed)
        validation = built.global_validation
    data = FederatedData(clients=[], global_validation=validation, label_names=label_names,
                         num_labels=num_labels, task=bundle.task, stats=None)  # type: ignore
    workload = Workload(bundle=bundle, data=data, client=algorithm.client, config=config,
                        device=device, autocast_dtype=None)
    if validation:
        _bind_root_data(algorithm, workload)
    elif config.algorithm.aggregator == "fltrust":
        raise ConfigError("invalid config: algorithm.aggregator 'fltrust' needs the server's "
                          "root data: data.validation_path must exist on the coordinator")
    bind = getattr(algorithm.server, "bind_workload", None)  # e.g. FedDF's public data
    if bind is not None:
        bind(workload)
    return workload


def load_server_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    config = load_config(path, overrides)
    config.runtime.kind = "remote"
    return config


__all__ = ["CRASH_ENV", "Coordinator", "DeployError", "RemoteRuntime", "atomic_write_bytes",
           "dump_config", "load_server_config"]
