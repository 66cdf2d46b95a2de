"""The deployment end to end: real client processes and agents against a coordinator process,
compared with the local runtime; ``kill -9`` of the coordinator at several points of a round."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

import fedfm
from fedfm.config import config_from_dict
from fedfm.core import state as state_ops
from fedfm.deploy.coordinator import CRASH_ENV
from tests.deploy_util import (
    add_clients,
    agents_running,
    server_config_dict,
    site_data,
    start_server,
    wait_finished,
    write_config,
)

TOLERANCE = 1e-6


def local_final_state(tmp_path: Path, raw: dict) -> dict:
    config = config_from_dict({**raw, "tracking": {**raw["tracking"],
                                                   "output_dir": str(tmp_path / "local")}})
    return fedfm.run(config, console=False).final_state


def remote_final_state(state_dir: Path) -> dict:
    return load_file(str(state_dir / "run" / "final" / "global.safetensors"))


def rounds_logged(state_dir: Path) -> list[int]:
    lines = (state_dir / "run" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["round"] for line in lines if line.strip()]


def test_client_processes_reach_the_local_runtime_state(tmp_path: Path) -> None:
    """Three `fedfm client` processes on loopback end where the local runtime ends."""
    raw = server_config_dict(tmp_path, federation={"num_clients": 3, "clients_per_round": 2,
                                                   "rounds": 3})
    config_path = write_config(tmp_path, raw)
    state_dir = tmp_path / "state"
    tokens = add_clients(state_dir, 3)
    server, url = start_server(config_path, state_dir)
    clients = []
    try:
        for index, token in enumerate(tokens):
            client_yaml = tmp_path / f"client{index}.yaml"
            client_yaml.write_text(yaml.safe_dump({
                "data": site_data(raw), "partition": {"of": 3, "index": index},
                "state_dir": str(tmp_path / f"agent{index}"), "runtime": {"num_threads": 1}}))
            clients.append(subprocess.Popen(
                [sys.executable, "-m", "fedfm.cli", "client", "--server", url, "--config",
                 str(client_yaml)], env={**os.environ, "FEDFM_TOKEN": token},
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        assert wait_finished(server, 240) == 0
        for client in clients:
            assert client.wait(timeout=60) == 0
    finally:
        for process in (server, *clients):
            if process.poll() is None:
                process.kill()
    remote = remote_final_state(state_dir)
    local = local_final_state(tmp_path, raw)
    assert state_ops.max_abs_diff(local, remote) <= TOLERANCE
    assert rounds_logged(state_dir) == [1, 2, 3]
    summary = json.loads((state_dir / "run" / "summary.json").read_text())
    assert summary["rounds"] == 3


CRASH_POINTS = [
    "round_opened:2",  # tasks handed out, nothing received yet
    "update_accepted:2:1",  # one of the round's updates accepted
    "update_accepted:1:2",  # all of round 1's updates accepted, not yet aggregated
    "aggregated:1",  # the round's record written, its checkpoint not yet
    "checkpointed:2",  # the checkpoint written, the round not yet marked done
]


@pytest.mark.parametrize("crash_at", CRASH_POINTS)
def test_kill_9_then_restart_resumes_the_round(tmp_path: Path, crash_at: str) -> None:
    """SIGKILL at a point of a round, restart with the same command: no accepted update and
    no completed round is lost, and the run ends with the uninterrupted run's State."""
    raw = server_config_dict(tmp_path, federation={"num_clients": 2, "clients_per_round": 2,
                                                   "rounds": 3})
    config_path = write_config(tmp_path, raw)
    state_dir = tmp_path / "state"
    tokens = add_clients(state_dir, 2)
    server, url = start_server(config_path, state_dir, env={CRASH_ENV: crash_at})
    port = int(url.rsplit(":", 1)[1])
    restarted = None
    try:
        with agents_running(url, tokens, tmp_path) as agents:
            assert server.wait(timeout=180) == -signal.SIGKILL
            restarted, _ = start_server(config_path, state_dir, port=port)
            assert wait_finished(restarted, 240) == 0
        assert all(not hasattr(agent, "error") for agent in agents)
    finally:
        for process in (server, restarted):
            if process is not None and process.poll() is None:
                process.kill()
    assert rounds_logged(state_dir) == [1, 2, 3]
    local = local_final_state(tmp_path, raw)
    assert state_ops.max_abs_diff(local, remote_final_state(state_dir)) <= TOLERANCE


def test_agent_restart_resends_and_no_raw_data_leaves(tmp_path: Path) -> None:
    """An agent killed after training (update on disk, not sent) is restarted and resends that
    update; the run still ends at the local runtime's State. Everything an agent sends is
    adapter tensors and scalars: no request body holds any of its training text."""
    from fedfm.deploy.agent import ClientAgent
    from fedfm.deploy.wire import UPDATE_META
    from tests.deploy_util import agent_config

    raw = server_config_dict(tmp_path, federation={"num_clients": 2, "clients_per_round": 2,
                                                   "rounds": 3})
    config_path = write_config(tmp_path, raw)
    state_dir = tmp_path / "state"
    tokens = add_clients(state_dir, 2)
    server, url = start_server(config_path, state_dir)
    bodies: list[bytes] = []
    watched = ClientAgent(url, tokens[0], agent_config(tmp_path, 0, 2),
                          on_request=lambda request: bodies.append(request.read()))
    client_yaml = tmp_path / "client1.yaml"
    client_yaml.write_text(yaml.safe_dump({
        "data": site_data(raw), "partition": {"of": 2, "index": 1},
        "state_dir": str(tmp_path / "agent1"), "runtime": {"num_threads": 1}}))
    command = [sys.executable, "-m", "fedfm.cli", "client", "--server", url, "--config",
               str(client_yaml)]
    log_file = tmp_path / "agent1.log"
    env = {**os.environ, "FEDFM_TOKEN": tokens[1]}
    processes = [server]
    try:
        import threading

        thread = threading.Thread(target=watched.run, daemon=True)
        thread.start()
        with open(log_file, "ab") as log:
            first = subprocess.Popen(command, env={**env, CRASH_ENV: "agent_trained:2"},
                                     stderr=log, stdout=log)
            processes.append(first)
            assert first.wait(timeout=180) == -signal.SIGKILL
            second = subprocess.Popen(command, env=env, stderr=log, stdout=log)
            processes.append(second)
            assert wait_finished(server, 240) == 0
            assert second.wait(timeout=60) == 0
        thread.join(timeout=60)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    assert "resending the update computed before a restart" in log_file.read_text()
    assert state_ops.max_abs_diff(local_final_state(tmp_path, raw),
                                  remote_final_state(state_dir)) <= TOLERANCE
    texts = [json.loads(line)["sentence"] for line in Path(raw["data"]["path"]).read_text(
        ).splitlines()[: raw["data"]["max_rows"]]]
    sent = b"".join(bodies)
    assert sent and not any(t.encode() in sent for t in texts if len(t) >= 12)
    uploads = [b for b in bodies if UPDATE_META.encode() in b[:4096]]
    assert len(uploads) == 3  # one update per round, nothing else carries tensors
    from fedfm.core.state import read_metadata

    for body in uploads:
        facts = json.loads(read_metadata(body)[UPDATE_META])
        assert set(facts) == {"client_id", "round", "task_id", "num_examples", "metrics",
                              "metadata"}
        assert set(facts["metadata"]) <= {"eval", "wall_time"}


def test_https_with_mutual_tls_and_gen_certs(tmp_path: Path) -> None:
    """`fedfm server gen-certs` material serves the API over HTTPS with client certificates
    required: agents with a certificate finish the run, a request without one is refused."""
    import ssl

    import httpx

    from fedfm.deploy.certs import generate_certificates

    certs = generate_certificates(tmp_path / "certs", clients=["site0", "site1"])
    raw = server_config_dict(tmp_path, federation={"num_clients": 2, "clients_per_round": 2,
                                                   "rounds": 1})
    config_path = write_config(tmp_path, raw)
    state_dir = tmp_path / "state"
    tokens = add_clients(state_dir, 2)
    server, url = start_server(config_path, state_dir, "--tls-cert", str(certs.server_cert),
                               "--tls-key", str(certs.server_key), "--tls-client-ca",
                               str(certs.ca_cert))
    assert url.startswith("https://")
    url = url.replace("127.0.0.1", "localhost")
    try:
        trust_only = ssl.create_default_context(cafile=str(certs.ca_cert))
        with pytest.raises(httpx.HTTPError):  # no client certificate: the handshake fails
            httpx.get(f"{url}/api/v1/health", verify=trust_only, timeout=10).json()
        with_cert = ssl.create_default_context(cafile=str(certs.ca_cert))
        with_cert.load_cert_chain(*map(str, certs.client_certs["site0"]))
        health = httpx.get(f"{url}/api/v1/health", verify=with_cert, timeout=10)
        assert health.status_code == 200
        per_site = [{"ca_cert": str(certs.ca_cert), "client_cert": str(certs.client_certs[n][0]),
                     "client_key": str(certs.client_certs[n][1])} for n in ("site0", "site1")]
        with agents_running(url, tokens, tmp_path, per_agent=per_site) as agents:
            assert wait_finished(server, 180) == 0
        assert all(agent.tasks_done == 1 for agent in agents)
    finally:
        if server.poll() is None:
            server.kill()
