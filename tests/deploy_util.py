"""Helpers for the deployment tests: a small server config, a coordinator process, agents."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from fedfm.deploy.agent import ClientAgent, ClientAgentConfig
from fedfm.deploy.store import StateStore
from tests.conftest import DATA, cls_config_dict, deep_update


def server_config_dict(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    """tiny-bert LoRA on SST-2 rows, every client in every round, a short long-poll."""
    base = cls_config_dict(tmp_path, name="deploy-test")
    base = deep_update(base, {
        "data": {"partition": {"kind": "iid"}, "max_rows": 120},
        "federation": {"num_clients": 3, "clients_per_round": 3, "rounds": 2},
        # attention: auto times the implementations per process and may pick differently in
        # the agents and in the test; one fixed choice keeps the equivalence bit for bit
        "runtime": {"num_threads": 1, "attention": "eager"},
        "deploy": {"round_timeout_s": 120, "long_poll_s": 1.0, "heartbeat_s": 2.0},
    })
    return deep_update(base, changes)


def write_config(tmp_path: Path, raw: dict[str, Any], name: str = "server.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def add_clients(state_dir: Path, count: int) -> list[str]:
    store = StateStore(state_dir / "coordinator.db")
    tokens = [store.add_client(f"site{i}", client_id=i)[1] for i in range(count)]
    store.close()
    return tokens


def agent_config(tmp_path: Path, index: int, of: int, **changes: Any) -> ClientAgentConfig:
    raw = {"data": {"path": str(DATA / "sst2_train.jsonl"),
                    "validation_path": str(DATA / "sst2_validation.jsonl")},
           "partition": {"of": of, "index": index},
           "state_dir": str(tmp_path / f"agent{index}"),
           "runtime": {"num_threads": 1}, "max_backoff_s": 0.5, **changes}
    return ClientAgentConfig.model_validate(raw)


def server_command(config: Path, state_dir: Path, *extra: str, port: int = 0) -> list[str]:
    return [sys.executable, "-m", "fedfm.cli", "server", str(config), "--state-dir",
            str(state_dir), "--port", str(port), "--linger", "2", *extra]


def start_server(config: Path, state_dir: Path, *extra: str, env: dict[str, str] | None = None,
                 log: Path | None = None, port: int = 0) -> tuple[subprocess.Popen[bytes], str]:
    """A coordinator process; returns it and its URL once it listens."""
    endpoint = state_dir / "endpoint.json"
    endpoint.unlink(missing_ok=True)
    output = open(log or state_dir.parent / "server.log", "ab")  # noqa: SIM115
    process = subprocess.Popen(server_command(config, state_dir, *extra, port=port),
                               env={**os.environ, **(env or {})}, stdout=output,
                               stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not endpoint.exists():
        if process.poll() is not None:
            raise RuntimeError(f"the coordinator exited with {process.returncode}")
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("the coordinator did not start in 120 s")
        time.sleep(0.1)
    return process, json.loads(endpoint.read_text())["url"]


@contextmanager
def agents_running(url: str, tokens: list[str], tmp_path: Path,
                   per_agent: list[dict[str, Any]] | None = None, **changes: Any
                   ) -> Iterator[list[ClientAgent]]:
    """Client agents in threads of this process (they retry while the server is down);
    ``per_agent`` adds CLIENT.yaml keys to each agent's config."""
    agents = [ClientAgent(url, token, agent_config(
        tmp_path, i, len(tokens), **changes, **(per_agent[i] if per_agent else {})))
              for i, token in enumerate(tokens)]
    threads = [threading.Thread(target=_run_quietly, args=(a,), daemon=True) for a in agents]
    for thread in threads:
        thread.start()
    try:
        yield agents
    finally:
        for agent in agents:
            agent.stop()
        for thread in threads:
            thread.join(timeout=30)


def _run_quietly(agent: ClientAgent) -> None:
    try:
        agent.run()
    except Exception as exc:  # noqa: BLE001 - the test checks the outcome, not the thread
        agent.error = exc  # type: ignore[attr-defined]


def wait_finished(process: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise


@contextmanager
def coordinator_app(tmp_path: Path, clients: int = 3, online: bool = True, **changes: Any
                    ) -> Iterator[tuple[Any, Any, list[str]]]:
    """An in-process coordinator (round loop thread) behind FastAPI's TestClient; no agent
    runs, the test plays the clients (all online from the start unless ``online=False``).
    Yields (coordinator, http client, client tokens)."""
    from fastapi.testclient import TestClient

    from fedfm.config import config_from_dict
    from fedfm.deploy.app import create_app
    from fedfm.deploy.coordinator import Coordinator

    config = config_from_dict(server_config_dict(
        tmp_path, **deep_update({"federation": {"num_clients": clients,
                                                "clients_per_round": clients}}, changes)))
    config.runtime.kind = "remote"
    state_dir = tmp_path / "state"
    tokens = add_clients(state_dir, clients)
    coordinator = Coordinator(config, state_dir)
    coordinator.start()
    try:
        with TestClient(create_app(coordinator)) as http:
            for token in tokens if online else []:
                assert http.post("/api/v1/heartbeat", headers=bearer(token)).status_code == 200
            yield coordinator, http, tokens
    finally:
        coordinator.stop()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def poll_task(http: Any, token: str, wait: float = 1.0, tries: int = 30) -> dict[str, Any]:
    """The client's next task (polling until the round opens)."""
    for _ in range(tries):
        response = http.get("/api/v1/tasks/next", params={"wait": wait}, headers=bearer(token))
        assert response.status_code == 200, response.text
        if response.json()["task"] is not None:
            return response.json()["task"]
    raise AssertionError("no task arrived")


def fake_update_bytes(coordinator: Any, task: dict[str, Any], value: float = 0.01,
                      **facts: Any) -> bytes:
    """A well-formed update for ``task``: every payload entry filled with ``value``."""
    import torch

    from fedfm.core.update import ClientUpdate
    from fedfm.deploy import wire

    payload = {k: torch.full_like(v, value) for k, v in coordinator.global_state.items()}
    update = ClientUpdate(client_id=facts.pop("client_id", task["client_id"]), payload=payload,
                          num_examples=facts.pop("num_examples", 10),
                          metrics={"train_loss": 1.0})
    return wire.update_to_bytes(update, round_index=facts.pop("round", task["round"]),
                                task_id=facts.pop("task_id", task["task_id"]))


def upload(http: Any, token: str, task_id: str, body: bytes, sha: str | None = None) -> Any:
    import hashlib

    return http.put(f"/api/v1/tasks/{task_id}/update", content=body, headers={
        **bearer(token), "X-Content-SHA256": sha or hashlib.sha256(body).hexdigest(),
        "Content-Type": "application/octet-stream"})


def site_data(raw: dict[str, Any]) -> dict[str, Any]:
    """A client's CLIENT.yaml data section for a server config: its paths (the coordinator
    sends the run's data section without them)."""
    return {key: raw["data"][key] for key in ("path", "validation_path") if raw["data"].get(key)}
