"""The client agent: runs next to one organisation's data and does the coordinator's tasks.

``fedfm client --server URL --token TOKEN --config CLIENT.yaml``. The agent registers, receives
the run's config (model, adapter, algorithm, data format; never a data path), loads the model
and its *own* data (``data`` in CLIENT.yaml), then loops: long-poll for a task, download the
broadcast (SHA-256 checked), run the algorithm's registered client half -- the very code the
simulator runs -- and upload the update. Only the update (a State of adapter tensors plus scalar
training metrics) ever leaves; examples, texts and token ids never do.

Crash safety on this side: a computed update is written to ``state_dir/pending/`` before it is
sent, and the per-client state (SCAFFOLD controls, ...) is committed to ``state_dir/client_state``
only once the coordinator accepted the update; a restarted agent resends a pending update for a
task that is still open instead of training again. Network errors and 5xx answers are retried
with exponential backoff and jitter.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import shutil
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml
from pydantic import Field, ValidationError

import fedfm
from fedfm.config import ConfigError, RunConfig, _Section, config_from_dict
from fedfm.core.client_store import DiskClientStore
from fedfm.core.loop import derive_seed
from fedfm.core.update import Broadcast
from fedfm.deploy import wire
from fedfm.deploy.faults import crash_point
from fedfm.deploy.store import atomic_write_bytes

log = logging.getLogger("fedfm.agent")
API = "/api/v1"
_CLIENT_STREAM = 3  # the local runtime's client seed stream: same seeds, same training
# Building the model (random-init presets) and local training (dropout, reseeded per client
# and round) use torch's process-wide RNG: agents that share a process (tests, a site running
# several) take turns, so each computes exactly what it would alone.
_TORCH_RNG = threading.Lock()


class AgentError(RuntimeError):
    """The agent cannot go on (token refused, bad config, the run rejected us)."""


class TaskSkipped(RuntimeError):
    """This one task cannot be done (its round closed, its State arrived corrupt); the agent
    logs it and polls for the next one."""


class PartitionChoice(_Section):
    """Take partition ``index`` of ``of`` of ``data``, exactly as a simulation with
    ``federation.num_clients: of`` and the run's seed and partition would (demos, benchmarks,
    equivalence tests: one public data set standing in for many organisations)."""

    of: int = Field(ge=1)
    index: int = Field(ge=0)


class AgentRuntimeConfig(_Section):
    device: str = "auto"
    precision: str = "auto"
    num_threads: int | None = Field(default=None, ge=1)


class ClientAgentConfig(_Section):
    """CLIENT.yaml: where this organisation's data is and how to reach the coordinator."""

    server: str | None = None  # the coordinator URL (--server overrides)
    # this organisation's data, merged over the run's data section (which arrives without the
    # coordinator's paths): path is required; validation_path, column names, label names,
    # prompt template may be set here too
    data: dict[str, Any]
    partition: PartitionChoice | None = None
    state_dir: str = "fedfm-client"
    ca_cert: str | None = None  # CA bundle that signed the coordinator's certificate
    client_cert: str | None = None  # mutual TLS
    client_key: str | None = None
    runtime: AgentRuntimeConfig = Field(default_factory=AgentRuntimeConfig)
    request_timeout_s: float = Field(default=120.0, gt=0)
    max_backoff_s: float = Field(default=30.0, gt=0)
    max_retries: int = Field(default=1000, ge=0)  # per request; then the agent gives up

    def model_post_init(self, context: Any) -> None:
        if "path" not in self.data:
            raise ValueError("data.path: required (this organisation's training data)")


def load_agent_config(path: str | Path) -> ClientAgentConfig:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"client config {file} does not exist")
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        config = ClientAgentConfig.model_validate(raw)
    except (yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"invalid client config {file}: {exc}") from None
    base = file.resolve().parent
    for field in ("path", "validation_path"):
        value = config.data.get(field)
        if not value:
            continue
        data_path = Path(str(value).split("::")[0])
        if not data_path.is_absolute() and not data_path.exists() and (base / data_path).exists():
            config.data[field] = str(base / value)
    return config


class ClientAgent:
    """One organisation's agent. ``run()`` returns when the run is finished."""

    def __init__(self, server: str, token: str, config: ClientAgentConfig, *,
                 transport: httpx.BaseTransport | None = None,
                 on_request: Callable[[httpx.Request], None] | None = None) -> None:
        self.server = server.rstrip("/")
        self.config = config
        self.state_dir = Path(config.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        hooks = {"request": [on_request]} if on_request is not None else {}
        self.http = httpx.Client(base_url=self.server, verify=tls_context(config),
                                 headers={"Authorization": f"Bearer {token}"},
                                 timeout=config.request_timeout_s, transport=transport,
                                 event_hooks=hooks)
        self.rng = random.Random()
        self.client_id: int | None = None
        self.workload: Any = None
        self.train_examples: list[dict[str, Any]] = []
        self.validation: list[dict[str, Any]] = []
        self.run_config: RunConfig | None = None
        self.tasks_done = 0
        self.resent = 0  # updates computed before a restart and sent after it
        self.skipped = 0  # tasks given up (round closed before we could fetch its State)
        self._stop = threading.Event()

    # ------------------------------------------------------------------ HTTP with retries

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send, retrying transport errors and 5xx with capped exponential backoff + jitter;
        a 4xx is returned to the caller (401 raises: the token is wrong or revoked)."""
        delay = 0.25
        for attempt in range(self.config.max_retries + 1):
            try:
                response = self.http.request(method, f"{API}{path}", **kwargs)
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 401:
                    raise AgentError(f"the coordinator refused our token: "
                                     f"{_detail(response)}")
                if response.status_code < 500:
                    return response
                problem = f"HTTP {response.status_code}: {_detail(response)}"
            if attempt == self.config.max_retries or self._stop.is_set():
                break
            log.info("%s %s failed (%s); retrying in %.1fs", method, path, problem, delay)
            time.sleep(delay * self.rng.uniform(0.5, 1.5))
            delay = min(delay * 2, self.config.max_backoff_s)
        raise AgentError(f"{method} {path}: gave up after {self.config.max_retries} retries "
                         f"({problem})")

    # ------------------------------------------------------------------ set-up

    def register(self) -> None:
        response = self._request("POST", "/register", json={
            "agent_version": fedfm.__version__, "info": {"state_dir": str(self.state_dir)}})
        _expect_ok(response, "register")
        found = response.json()
        self.client_id = int(found["client_id"])
        self._check_run(found["run_id"])
        self.run_config = self._local_config(found["config"])
        self._build_workload(self.run_config)
        self.heartbeat_s = float(found["heartbeat_s"])
        self.long_poll_s = float(found["long_poll_s"])

    def _check_run(self, run_id: str) -> None:
        """A new run means the per-client state and pending uploads of the old one go."""
        marker = self.state_dir / "run.json"
        if marker.exists() and json.loads(marker.read_text()).get("run_id") != run_id:
            for name in ("client_state", "pending"):
                shutil.rmtree(self.state_dir / name, ignore_errors=True)
        atomic_write_bytes(marker, json.dumps({"run_id": run_id,
                                               "client_id": self.client_id}).encode())
        self.client_store = DiskClientStore(self.state_dir / "client_state")

    def _local_config(self, server_config: dict[str, Any]) -> RunConfig:
        raw = json.loads(json.dumps(server_config))
        raw["data"] = {**raw.get("data", {}), **self.config.data}
        partition = self.config.partition
        raw["federation"] = {**raw.get("federation", {}),
                             "num_clients": partition.of if partition else 1,
                             "clients_per_round": None, "fraction": None}
        runtime = self.config.runtime
        raw["runtime"] = {**raw.get("runtime", {}), "kind": "local", "device": runtime.device,
                          "precision": runtime.precision, "num_threads": runtime.num_threads,
                          "client_store": "memory"}
        raw["tracking"] = {**raw.get("tracking", {}), "console": False}
        raw["eval"] = {**raw.get("eval", {}), "canaries": None}
        return config_from_dict(raw, source="the coordinator's run config + CLIENT.yaml data")

    def _build_workload(self, config: RunConfig) -> None:
        from fedfm.api import build_algorithm, build_workload, check_components, seed_everything

        check_components(config)
        with _TORCH_RNG:
            seed_everything(config.seed)
            algorithm = build_algorithm(config)
            self.workload = build_workload(config, algorithm)
        index = self.config.partition.index if self.config.partition else 0
        clients = self.workload.data.clients
        if index >= len(clients):
            raise AgentError(f"partition.index {index} but the data has {len(clients)} "
                             f"partitions")
        self.train_examples = clients[index].train
        self.validation = clients[index].validation

    # ------------------------------------------------------------------ the loop

    def run(self) -> int:
        """Work until the run finishes; the number of tasks done."""
        self.register()
        beat = threading.Thread(target=self._heartbeat, daemon=True)
        beat.start()
        try:
            while not self._stop.is_set():
                response = self._request("GET", "/tasks/next",
                                         params={"wait": self.long_poll_s})
                _expect_ok(response, "poll for a task")
                found = response.json()
                if found["task"] is not None:
                    self._do_task(found["task"])
                elif found["run_state"] in ("finished", "failed"):
                    break
        finally:
            self._stop.set()
            beat.join(timeout=self.config.request_timeout_s)
            self.http.close()
        return self.tasks_done

    def stop(self) -> None:
        self._stop.set()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            # the main loop's requests retry; a missed beat is harmless
            with contextlib.suppress(httpx.HTTPError):
                self.http.post(f"{API}/heartbeat")

    def _do_task(self, task: dict[str, Any]) -> None:
        try:
            self._attempt_task(task)
        except TaskSkipped as exc:
            self.skipped += 1
            log.warning("task %s skipped: %s", task.get("task_id"), exc)

    def _attempt_task(self, task: dict[str, Any]) -> None:
        if task.get("protocol") == "secagg":
            self._do_secure_task(task)
            return
        pending = self.state_dir / "pending" / f"{task['task_id']}.safetensors"
        if pending.exists():
            log.info("task %s: resending the update computed before a restart",
                     task["task_id"])
            self.resent += 1
        else:
            self._train(task, pending)
            crash_point("agent_trained", int(task["round"]))
        body = pending.read_bytes()
        response = self._request("PUT", f"/tasks/{task['task_id']}/update", content=body,
                                 headers={"X-Content-SHA256": hashlib.sha256(body).hexdigest(),
                                          "Content-Type": "application/octet-stream"})
        state_file = pending.with_suffix(".state.safetensors")
        if response.status_code == 200:
            if state_file.exists():
                from fedfm.core.client_store import unflatten
                from fedfm.core.state import from_bytes

                self.client_store.put(int(task["client_id"]),
                                      unflatten(from_bytes(state_file.read_bytes())))
            self.tasks_done += 1
        else:
            log.warning("task %s: update refused: %s", task["task_id"], _detail(response))
        pending.unlink(missing_ok=True)
        state_file.unlink(missing_ok=True)

    def _do_secure_task(self, task: dict[str, Any]) -> None:
        """Train, then hand the update to SecAgg+ instead of uploading it: the coordinator
        only ever learns the sum (``fedfm.deploy.secure``)."""
        from fedfm.deploy.secure import client_secure_steps

        update, _ = self._compute(task)
        if client_secure_steps(self, task, update):
            self.tasks_done += 1

    def secure_call(self, method: str, path: str, *, json: Any = None, content: bytes = b"",
                    binary: bool = False) -> bool:
        """One protocol message; False when the coordinator has moved on (we dropped out)."""
        kwargs: dict[str, Any] = {"json": json} if not binary else {
            "content": content, "headers": {"Content-Type": "application/octet-stream"}}
        response = self._request(method, path, **kwargs)
        if response.status_code != 200:
            log.warning("secure aggregation %s: %s", path, _detail(response))
            return False
        return True

    def secure_wait(self, path: str) -> dict[str, Any] | None:
        """Long-poll a protocol step until it opens; None when we are out of the protocol."""
        while not self._stop.is_set():
            response = self._request("GET", path, params={"wait": self.long_poll_s})
            if response.status_code != 200:
                log.warning("secure aggregation %s: %s", path, _detail(response))
                return None
            found = response.json()
            if found.get("ready"):
                return found
        return None

    def _download(self, task: dict[str, Any]) -> Broadcast:
        """The task's broadcast, checked against its SHA-256 (fetched again once on a
        mismatch); TaskSkipped when the coordinator no longer serves it."""
        for _ in range(2):
            response = self._request("GET", f"/tasks/{task['task_id']}/state")
            if response.status_code != 200:
                raise TaskSkipped(f"download the global State: HTTP {response.status_code}: "
                                  f"{_detail(response)}")
            body = response.content
            if hashlib.sha256(body).hexdigest() == task["state_sha256"]:
                break
            log.warning("task %s: the downloaded State does not match its SHA-256",
                        task["task_id"])
        else:
            raise TaskSkipped("the downloaded State twice failed its SHA-256 check")
        try:
            return wire.broadcast_from_bytes(body)
        except wire.WireError as exc:
            raise TaskSkipped(f"the global State is unreadable: {exc}") from exc

    def _compute(self, task: dict[str, Any]) -> tuple[Any, Any]:
        """Download the broadcast, measure it on our validation split, train: (update, new
        per-client state)."""
        start = time.perf_counter()
        broadcast = self._download(task)
        workload, config = self.workload, self.run_config
        assert config is not None
        client_id, round_index = int(task["client_id"]), int(task["round"])
        metadata: dict[str, Any] = {}
        if config.eval.enabled and config.eval.per_client and self.validation:
            metadata["eval"] = workload.evaluate_examples(broadcast.global_state, self.validation)
        workload.set_state(broadcast.global_state)
        context = workload.client_context(
            self.train_examples, client_id=client_id, round=round_index,
            seed=derive_seed(config.seed, round_index, client_id, _CLIENT_STREAM),
            client_state=self.client_store.get(client_id))
        with _TORCH_RNG:
            result = workload.client.run(context, broadcast)
        update = result.update
        update.metadata = {**update.metadata, **metadata,
                           "wall_time": time.perf_counter() - start}
        return update, result.client_state

    def _train(self, task: dict[str, Any], pending: Path) -> None:
        """Compute the update and keep it (and the new per-client state) on disk until sent."""
        from fedfm.core import client_store as store_ops
        from fedfm.core import state as state_ops

        update, client_state = self._compute(task)
        if client_state is not None:
            atomic_write_bytes(pending.with_suffix(".state.safetensors"), state_ops.to_bytes(
                store_ops.flatten(client_state)))
        atomic_write_bytes(pending, wire.update_to_bytes(update, round_index=int(task["round"]),
                                                         task_id=task["task_id"]))


def tls_context(config: ClientAgentConfig) -> ssl.SSLContext:
    """Trust ``ca_cert`` (else the system's CAs); present ``client_cert`` for mutual TLS."""
    for field in ("ca_cert", "client_cert", "client_key"):
        value = getattr(config, field)
        if value is not None and not Path(value).is_file():
            raise ConfigError(f"client config {field}: {value} does not exist")
    if (config.client_cert is None) != (config.client_key is None):
        raise ConfigError("client config: client_cert and client_key go together")
    context = ssl.create_default_context(cafile=config.ca_cert)
    if config.client_cert is not None:
        context.load_cert_chain(config.client_cert, config.client_key)
    return context


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail", response.text[:200]))
    except (ValueError, AttributeError):
        return response.text[:200]


def _expect_ok(response: httpx.Response, what: str) -> None:
    if response.status_code != 200:
        raise AgentError(f"{what}: HTTP {response.status_code}: {_detail(response)}")
