"""Secure aggregation over the deployment's transport: SecAgg+ between the coordinator and
real agents gives the simulator's result, and survives a client that vanishes mid-protocol."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from fedfm.core import state as state_ops
from fedfm.deploy.faults import CRASH_ENV
from tests.deploy_util import (
    add_clients,
    agents_running,
    server_config_dict,
    site_data,
    start_server,
    wait_finished,
    write_config,
)
from tests.test_deploy import local_final_state, remote_final_state


def secure_config(tmp_path: Path, rounds: int) -> dict:
    return server_config_dict(tmp_path, federation={"num_clients": 3, "clients_per_round": 3,
                                                    "rounds": rounds},
                              privacy={"secure_aggregation": {}},
                              deploy={"secagg_step_timeout_s": 6.0})


def records(state_dir: Path) -> list[dict]:
    lines = (state_dir / "run" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_secure_aggregation_over_the_network_matches_the_simulation(tmp_path: Path) -> None:
    raw = secure_config(tmp_path, rounds=2)
    config_path = write_config(tmp_path, raw)
    state_dir = tmp_path / "state"
    tokens = add_clients(state_dir, 3)
    server, url = start_server(config_path, state_dir)
    try:
        with agents_running(url, tokens, tmp_path) as agents:
            assert wait_finished(server, 240) == 0
        assert all(not hasattr(agent, "error") for agent in agents)
    finally:
        if server.poll() is None:
            server.kill()
    local = local_final_state(tmp_path, raw)
    assert state_ops.max_abs_diff(local, remote_final_state(state_dir)) <= 1e-6
    for record in records(state_dir):
        assert record["secure_aggregation"]["survived"] == 3.0
        assert record["secure_aggregation"]["transport"] == 1.0
        assert all(entry["bytes_up"] > 0 for entry in record["clients"].values())


def test_a_client_vanishing_after_key_sharing_is_recovered(tmp_path: Path) -> None:
    raw = secure_config(tmp_path, rounds=1)
    config_path = write_config(tmp_path, raw)
    state_dir = tmp_path / "state"
    tokens = add_clients(state_dir, 3)
    server, url = start_server(config_path, state_dir)
    client_yaml = tmp_path / "client2.yaml"
    client_yaml.write_text(yaml.safe_dump({
        "data": site_data(raw), "partition": {"of": 3, "index": 2},
        "state_dir": str(tmp_path / "agent2"), "runtime": {"num_threads": 1}}))
    vanishing = subprocess.Popen(
        [sys.executable, "-m", "fedfm.cli", "client", "--server", url, "--config",
         str(client_yaml)], env={**os.environ, "FEDFM_TOKEN": tokens[2],
                                 CRASH_ENV: "secagg_shared:1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with agents_running(url, tokens[:2], tmp_path):
            assert vanishing.wait(timeout=180) == -signal.SIGKILL
            assert wait_finished(server, 180) == 0
    finally:
        for process in (server, vanishing):
            if process.poll() is None:
                process.kill()
    (record,) = records(state_dir)
    assert "aborted" not in record
    assert record["completed"] == [0, 1]
    assert record["clients"]["2"]["status"] == "dropped"
    assert "masking" in record["clients"]["2"]["error"]
    assert record["secure_aggregation"]["survived"] == 2.0
    assert record["secure_aggregation"]["dropped_in_protocol"] == 1.0
