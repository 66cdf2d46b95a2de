"""The ``ray`` runtime: an actor pool, each actor holding one base model and serving many
clients a round.

Each actor builds the run's algorithm and workload once (model, adapter, every client's data
shard) from the same config and seed as the driver, so its copy is identical; a round then
costs one broadcast per actor (put in Ray's object store once, fetched once per actor and
round) and one small upload per client. Clients are handed out longest first (by training
rows) to whichever actor is free, so a few large clients do not leave the others idle at the
end of a round. Outcomes are yielded in the selection's order whatever order they finish in,
so the server sums the same updates in the same order as under ``local``.

Per-client state (SCAFFOLD's controls, error-feedback residuals, MOON's previous model,
personal heads) stays in the driver's ``ClientStore``: it travels with the client's task and
comes back with its result, so a client can land on any actor in any round. Evaluation and
checkpoints run on the driver, as with ``local``.

Faults: when an actor dies mid-round, its client goes back to the queue and runs on an actor
that is alive (every client starts from the round's broadcast and its seeded RNG, so the re-run
is the same computation). With fewer than ``runtime.min_actors`` actors alive the run stops
with ``ActorPoolLost``; ``fedfm run --resume RUN_DIR`` continues it from its last checkpoint.

Ray itself is used for placement, transport and failure detection; what is written here is the
scheduling (greedy longest-first over free actors) and the ordering and retry rules the round
loop needs, which Ray's ``ActorPool`` does not provide (it neither re-submits the work of a
dead actor nor lets results be matched to clients when an actor fails).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from fedfm.config import ConfigError, RunConfig
from fedfm.core.client_store import ClientStore
from fedfm.core.loop import ClientOutcome, EvalReport
from fedfm.core.registries import RUNTIMES
from fedfm.core.registry import MethodInfo
from fedfm.core.state import State
from fedfm.core.update import Broadcast
from fedfm.runtime.local import LocalRuntime, seeded_client_context
from fedfm.runtime.workload import Workload

log = logging.getLogger(__name__)

RAY_HINT = "install it with `pip install 'fedfm[ray]'` (or `pip install ray`)"


class ActorPoolLost(RuntimeError):
    """Too few Ray actors are alive to go on; the run can be resumed from its checkpoint."""


def import_ray() -> Any:
    try:
        import ray
    except ModuleNotFoundError as exc:
        raise ConfigError(f"runtime.kind 'ray' needs the package ray, which is not installed; "
                          f"{RAY_HINT}") from exc
    return ray


# Server halves that change the base model itself on the driver, which actors would not see.
_MERGES_INTO_BASE = {"flora": "FLoRA merges each round's stacked update into the base weights "
                              "on the server, and the actors' base models would not follow"}


def check_ray(config: RunConfig) -> None:
    """What the ``ray`` runtime cannot run, refused before anything is loaded."""
    import_ray()
    reason = _MERGES_INTO_BASE.get(config.algorithm.name)
    if reason is not None:
        raise ConfigError(f"invalid config: algorithm.name {config.algorithm.name!r} does not "
                          f"run on runtime.kind 'ray': {reason}; use runtime.kind 'local'")


def actor_config(config: RunConfig, speed: Any) -> RunConfig:
    """The driver's config with what its fast path decided pinned (precision, attention, fused
    loss, prefix cache), so every actor computes what the driver would, whatever hardware it
    lands on; actors keep no client store of their own and print nothing."""
    runtime = config.runtime.model_copy(update={
        "precision": speed.precision,
        "attention": speed.attention if speed.attention in ("eager", "sdpa") else "auto",
        "fused_loss": speed.fused_loss,
        "prefix_cache": "auto" if speed.prefix_cache else "off",
        "client_store": "memory"})
    tracking = config.tracking.model_copy(update={"console": False})
    return config.model_copy(update={"runtime": runtime, "tracking": tracking})


# --------------------------------------------------------------------------- the actor


class ClientWorker:
    """What runs inside one actor: the run's workload, built once, serving clients."""

    def __init__(self, config: RunConfig, num_threads: int) -> None:
        import torch

        from fedfm.api import build_algorithm, build_workload, check_components, seed_everything

        torch.set_num_threads(num_threads)
        check_components(config)
        seed_everything(config.seed)  # the driver's order of draws: identical model and data
        algorithm = build_algorithm(config)
        self.workload: Workload = build_workload(config, algorithm)
        self._round = -1
        self._broadcast: Broadcast | None = None
        self.served = 0  # clients run
        self.broadcasts_fetched = 0

    def ready(self) -> dict[str, Any]:
        """Where this actor runs and what it did: pid, device, the GPUs Ray gave it, clients
        served, broadcasts fetched."""
        return {"pid": os.getpid(), "device": str(self.workload.device),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "served": self.served, "broadcasts_fetched": self.broadcasts_fetched}

    def run_client(self, client_id: int, round: int, broadcast_ref: list[Any],
                   client_state: Any) -> tuple[Any, Any, float]:
        """(update, new client state, wall seconds) of one client; ``broadcast_ref`` is a
        one-element list so Ray hands over the reference and the broadcast is fetched (and
        deserialised) once per round, not once per client."""
        start = time.perf_counter()
        broadcast = self._round_broadcast(round, broadcast_ref[0])
        workload = self.workload
        workload.set_state(broadcast.global_state)
        context = seeded_client_context(workload, client_id, round, client_state)
        result = workload.client.run(context, broadcast)
        self.served += 1
        return result.update, result.client_state, time.perf_counter() - start

    def _round_broadcast(self, round: int, ref: Any) -> Broadcast:
        if self._round != round or self._broadcast is None:
            import ray

            self._broadcast = ray.get(ref)
            self._round = round
            self.broadcasts_fetched += 1
        return self._broadcast


# --------------------------------------------------------------------------- the driver


@dataclass
class _Task:
    client_id: int
    actor: int  # index into the pool


@RUNTIMES.register("ray", MethodInfo(
    "efficiency.systems.runtime",
    "Ray: A Distributed Framework for Emerging AI Applications (Moritz et al., OSDI 2018)",
    "runtime: {kind: ray, num_actors: 4, actor_cpus: 2, actor_gpus: 1, address: auto}",
    "an actor pool: each actor loads the model once and serves many clients a round; joins a "
    "cluster with runtime.address; re-runs a dead actor's clients"))
class RayRuntime:
    def __init__(self, workload: Workload, client_store: ClientStore) -> None:
        self.ray = import_ray()
        self.workload = workload
        self.client_store = client_store
        self.local = LocalRuntime(workload, client_store)  # evaluation runs on the driver
        runtime = workload.config.runtime
        self.min_actors = runtime.min_actors
        self._owns_ray = connect(self.ray, workload.config)
        self.actors: list[Any] = []
        self.alive: list[bool] = []
        try:
            self._start_actors(workload.config)
        except BaseException:
            self.close()
            raise
        self.rows = {client.client_id: len(client.train) for client in workload.data.clients}
        self.reruns = 0  # clients re-run after their actor died

    def _start_actors(self, config: RunConfig) -> None:
        runtime = config.runtime
        gpus = actor_gpus(self.ray, config)
        options: dict[str, Any] = {"num_cpus": runtime.actor_cpus, "num_gpus": gpus,
                                   "max_restarts": 0, "max_task_retries": 0}
        if runtime.actor_memory_mb is not None:
            options["memory"] = int(runtime.actor_memory_mb * 2**20)
        threads = runtime.num_threads or max(1, int(runtime.actor_cpus))
        remote_worker = self.ray.remote(ClientWorker).options(**options)
        pinned = actor_config(config, self.workload.speed)
        self.actors = [remote_worker.remote(pinned, threads) for _ in range(runtime.num_actors)]
        self.alive = [True] * len(self.actors)
        try:  # every actor builds its workload now: a config that fails, fails here
            self.ray.get([actor.ready.remote() for actor in self.actors])
        except self.ray.exceptions.RayTaskError as exc:
            raise ConfigError(f"runtime.kind 'ray': an actor could not build the run's "
                              f"workload: {_cause(exc)}") from exc

    @property
    def num_alive(self) -> int:
        return sum(self.alive)

    def run_clients(self, client_ids: list[int], broadcast: Broadcast,
                    round: int) -> Iterator[ClientOutcome]:
        ray = self.ray
        broadcast_ref = ray.put(broadcast)
        queue = deque(sorted(client_ids, key=lambda cid: (-self.rows.get(cid, 0), cid)))
        inflight: dict[Any, _Task] = {}
        finished: dict[int, ClientOutcome] = {}
        next_out = 0
        while queue or inflight:
            self._dispatch(queue, inflight, broadcast_ref, round)
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                task = inflight.pop(ref)
                outcome = self._collect(ref, task)
                if outcome is None:  # its actor died: run the client again elsewhere
                    queue.appendleft(task.client_id)
                    self.reruns += 1
                    self._require_actors(round)
                    continue
                finished[task.client_id] = outcome
            while next_out < len(client_ids) and client_ids[next_out] in finished:
                yield finished.pop(client_ids[next_out])
                next_out += 1

    def actor_stats(self) -> list[dict[str, Any] | None]:
        """Each actor's ``ready()`` report; None for a dead one."""
        alive = [(i, a) for i, a in enumerate(self.actors) if self.alive[i]]
        found = dict(zip([i for i, _ in alive],
                         self.ray.get([a.ready.remote() for _, a in alive]), strict=True))
        return [found.get(i) for i in range(len(self.actors))]

    def _dispatch(self, queue: deque[int], inflight: dict[Any, _Task], broadcast_ref: Any,
                  round: int) -> None:
        busy = {task.actor for task in inflight.values()}
        for index, actor in enumerate(self.actors):
            if not queue:
                return
            if not self.alive[index] or index in busy:
                continue
            client_id = queue.popleft()
            ref = actor.run_client.remote(client_id, round, [broadcast_ref],
                                          self.client_store.get(client_id))
            inflight[ref] = _Task(client_id, index)

    def _collect(self, ref: Any, task: _Task) -> ClientOutcome | None:
        """The client's outcome, or None when its actor died before answering."""
        errors = self.ray.exceptions
        try:
            update, client_state, wall_time = self.ray.get(ref)
        except (errors.RayActorError, errors.ActorUnavailableError) as exc:
            self.alive[task.actor] = False
            log.warning("ray actor %d died while running client %d (%s); re-running the "
                        "client on another actor", task.actor, task.client_id,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return None
        except errors.RayTaskError as exc:  # the client half raised: as under ``local``
            raise exc.as_instanceof_cause() from None
        return ClientOutcome(client_id=task.client_id, update=update, wall_time=wall_time,
                             bytes_up=update.num_bytes(), client_state=client_state)

    def _require_actors(self, round: int) -> None:
        if self.num_alive < self.min_actors:
            raise ActorPoolLost(
                f"runtime.kind 'ray': {self.num_alive} of {len(self.actors)} actors are alive "
                f"in round {round}, fewer than runtime.min_actors={self.min_actors}; the run "
                f"stops here without this round -- resume it with `fedfm run --resume RUN_DIR` "
                f"(it continues from the last checkpoint with a fresh actor pool)")

    def evaluate(self, global_state: State, *, round: int, per_client: bool,
                 extras: Mapping[str, State] | None = None) -> EvalReport:
        return self.local.evaluate(global_state, round=round, per_client=per_client,
                                   extras=extras)

    def close(self) -> None:
        for actor in self.actors:
            with contextlib.suppress(Exception):  # already dead
                self.ray.kill(actor)
        self.actors = []
        if self._owns_ray and self.ray.is_initialized():
            self.ray.shutdown()
        self._owns_ray = False


def connect(ray: Any, config: RunConfig) -> bool:
    """Join ``runtime.address`` or start a local Ray instance; True when this run started (and
    so shuts down) the connection. A Ray session the caller already opened is used as is."""
    if ray.is_initialized():
        return False
    runtime = config.runtime
    common: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                              "log_to_driver": True}
    if runtime.address is not None:
        try:
            ray.init(address=runtime.address, **common)
        except Exception as exc:  # no cluster there, version mismatch, unreachable
            raise ConfigError(f"runtime.address {runtime.address!r}: could not join the Ray "
                              f"cluster ({str(exc).splitlines()[0]}); start one with "
                              f"`ray start --head` and use its address") from exc
        check_cluster_cpus(ray, config)
        return True
    # A local instance gets at least the CPUs the pool asks for: Ray's CPU counts are
    # scheduling tokens, and a pool larger than the machine (tests, fault drills) still runs.
    needed = runtime.num_actors * runtime.actor_cpus
    ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(needed)), **common)
    return True


def check_cluster_cpus(ray: Any, config: RunConfig) -> None:
    runtime = config.runtime
    have = ray.cluster_resources().get("CPU", 0.0)
    needed = runtime.num_actors * runtime.actor_cpus
    if have < needed:
        raise ConfigError(f"runtime.num_actors={runtime.num_actors} x actor_cpus="
                          f"{runtime.actor_cpus} needs {needed:g} CPUs, but the Ray cluster at "
                          f"{runtime.address!r} has {have:g}")


def actor_gpus(ray: Any, config: RunConfig) -> float:
    """GPUs per actor: ``runtime.actor_gpus``, else one each when the cluster has enough, an
    equal share when it has fewer, none without."""
    runtime = config.runtime
    have = ray.cluster_resources().get("GPU", 0.0)
    if runtime.actor_gpus is not None:
        if runtime.actor_gpus * runtime.num_actors > have:
            raise ConfigError(f"runtime.actor_gpus={runtime.actor_gpus} x num_actors="
                              f"{runtime.num_actors} asks for more GPUs than the Ray cluster "
                              f"has ({have:g})")
        return runtime.actor_gpus
    if have <= 0:
        if runtime.device == "cuda":
            raise ConfigError("runtime.device 'cuda' with runtime.kind 'ray', but the Ray "
                              "cluster has no GPUs")
        return 0.0
    return min(1.0, have / runtime.num_actors)


def _cause(exc: Any) -> str:
    cause = getattr(exc, "cause", None)
    text = str(cause if cause is not None else exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__
