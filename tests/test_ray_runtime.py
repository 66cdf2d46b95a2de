"""The ``ray`` runtime (issue 12): an actor pool that gives the local runtime's results, re-runs
a dead actor's clients, stops cleanly (and resumes) when too few actors are left, and refuses
what it cannot run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fedfm import api
from fedfm.config import ConfigError, RunConfig, config_from_dict
from fedfm.core.client_store import MemoryClientStore
from fedfm.core.update import Broadcast
from fedfm.runtime.local import LocalRuntime
from tests.conftest import cls_config_dict, deep_update

ray = pytest.importorskip("ray")

from fedfm.runtime.ray_actors import (  # noqa: E402
    ActorPoolLost,
    RayRuntime,
    actor_config,
    actor_gpus,
)

SMALL_BERT = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
              "num_attention_heads": 4}


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray instance for the module (the runtime joins a session that is open and
    leaves it running); two CPUs, one per actor."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


def config(tmp_path: Path, kind: str, **changes: Any) -> RunConfig:
    runtime = {"kind": kind, "attention": "eager", "num_threads": 1}
    if kind == "ray":
        runtime.update(num_actors=2, actor_cpus=1)
    base = {"model": {"name": "tiny-bert", "max_length": 48, "config_overrides": SMALL_BERT},
            "federation": {"num_clients": 6, "clients_per_round": 4, "rounds": 2},
            "algorithm": {"name": "fedavg", "local": {"steps": 3, "batch_size": 8,
                                                      "lr": 1e-2}},
            "runtime": runtime,
            "tracking": {"checkpoint_every": 1}}
    return config_from_dict(cls_config_dict(tmp_path, **deep_update(base, changes)))


def final_state(result: Any) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(result.summary["final_state"])


def assert_close_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


ALGORITHMS = {
    "fedavg": {},
    # client state in the driver's store: the controls travel with each client's task
    "scaffold": {"algorithm": {"name": "scaffold", "local": {"steps": 3, "batch_size": 8,
                                                             "lr": 5e-2, "optimizer": "sgd"}}},
    # per-client error-feedback residuals, and a server optimizer with moments (slow)
    "topk_ef_fedadam": {"algorithm": {
        "name": "fedavg", "local": {"steps": 3, "batch_size": 8, "lr": 1e-2},
        "compression": {"chain": [{"kind": "topk", "fraction": 0.2}],
                        "error_feedback": True},
        "server_optimizer": {"name": "adam", "lr": 1e-2}}},
    # a personal head per client, evaluated on the driver from the shared store
    "fedper": {"algorithm": {"name": "fedper"}},
    # MOON's previous model in the store, FedLC's per-client counts (slow)
    "fedprox_moon_fedlc": {"algorithm": {"name": "fedprox", "mu": 0.01,
                                         "skew": [{"name": "moon"}, {"name": "fedlc"}]}},
    # cluster models in the broadcast and the evaluation extras (slow)
    "ifca": {"algorithm": {"name": "ifca", "cluster": {"k": 2}}},
    # a robust aggregator over the same updates in the same order; secure aggregation's masked
    # sum (slow)
    "median": {"algorithm": {"aggregator": "median"}},
    "secure_aggregation": {"privacy": {"secure_aggregation": {}}},
}
SLOW = {"topk_ef_fedadam", "fedprox_moon_fedlc", "ifca", "median", "secure_aggregation"}


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow)
                                  if name in SLOW else name for name in ALGORITHMS])
def test_ray_ends_with_the_local_runs_global_state(tmp_path: Path, ray_session: Any,
                                                   name: str) -> None:
    local = api.run(config(tmp_path / "local", "local", **ALGORITHMS[name]))
    remote = api.run(config(tmp_path / "ray", "ray", **ALGORITHMS[name]))
    assert_close_states(final_state(remote), final_state(local))
    ours = [r for r in remote.metrics if "eval" in r]
    theirs = [r for r in local.metrics if "eval" in r]
    for mine, other in zip(ours, theirs, strict=True):
        assert mine["selected"] == other["selected"]
        assert mine["eval"]["global"]["loss"] == pytest.approx(
            other["eval"]["global"]["loss"], rel=1e-4)
        if "personalized" in other["eval"]:
            assert mine["eval"]["personalized"].keys() == other["eval"]["personalized"].keys()


def build(cfg: RunConfig) -> tuple[Any, Any, Broadcast]:
    algorithm = api.build_algorithm(cfg)
    workload = api.build_workload(cfg, algorithm)
    broadcast = Broadcast(global_state=workload.get_state(),
                          extras=algorithm.server.broadcast_extras(workload.get_state()),
                          round=1)
    return algorithm, workload, broadcast


def test_actors_load_once_serve_many_clients_and_yield_in_selection_order(
        tmp_path: Path, ray_session: Any) -> None:
    cfg = config(tmp_path, "ray", federation={"num_clients": 6, "clients_per_round": 6})
    _, workload, broadcast = build(cfg)
    runtime = RayRuntime(workload, MemoryClientStore())
    try:
        pids = [stats["pid"] for stats in runtime.actor_stats()]
        order = [4, 1, 5, 0, 3, 2]
        for round_index in (1, 2):
            seen = [o.client_id for o in runtime.run_clients(order, broadcast, round_index)]
            assert seen == order
        stats = runtime.actor_stats()
        assert [s["pid"] for s in stats] == pids  # the same processes: no reload per round
        assert sum(s["served"] for s in stats) == 12
        assert all(s["served"] >= 2 for s in stats)  # both actors took clients
        assert all(s["broadcasts_fetched"] <= 2 for s in stats)  # once per round, not client
    finally:
        runtime.close()


def test_a_dead_actors_clients_rerun_on_the_others_with_the_same_result(
        tmp_path: Path, ray_session: Any) -> None:
    cfg = config(tmp_path, "ray", federation={"num_clients": 6, "clients_per_round": 6})
    _, workload, broadcast = build(cfg)
    ids = list(range(6))
    expected = {o.client_id: o.update.payload for o in
                LocalRuntime(workload, MemoryClientStore()).run_clients(ids, broadcast, 1)}
    runtime = RayRuntime(workload, MemoryClientStore())
    dispatch = runtime._dispatch

    def dispatch_then_kill(*args: Any) -> None:
        dispatch(*args)
        if runtime.alive[0]:  # actor 0 dies with a client in flight (just handed over)
            ray.kill(runtime.actors[0])

    runtime._dispatch = dispatch_then_kill  # type: ignore[method-assign]
    try:
        got = {o.client_id: o.update.payload for o in runtime.run_clients(ids, broadcast, 1)}
        assert sorted(got) == ids
        assert runtime.reruns >= 1 and runtime.num_alive == 1
        for cid in ids:
            assert_close_states(got[cid], expected[cid])
    finally:
        runtime.close()


def test_too_few_actors_stop_the_run_with_a_message_and_it_resumes(
        tmp_path: Path, ray_session: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(tmp_path / "ray", "ray", federation={"rounds": 2},
                 runtime={"kind": "ray", "num_actors": 2, "min_actors": 2, "actor_cpus": 1,
                          "attention": "eager", "num_threads": 1})
    original = RayRuntime.run_clients

    def dying(self: RayRuntime, client_ids: list[int], broadcast: Broadcast, round: int):
        for index, outcome in enumerate(original(self, client_ids, broadcast, round)):
            if round == 2 and index == 0:
                ray.kill(self.actors[1])
            yield outcome

    monkeypatch.setattr(RayRuntime, "run_clients", dying)
    with pytest.raises(ActorPoolLost, match=r"1 of 2 actors are alive in round 2.*min_actors=2"
                                            r".*--resume"):
        api.run(cfg)
    monkeypatch.setattr(RayRuntime, "run_clients", original)
    run_dir = next((tmp_path / "ray" / "runs").iterdir())
    resumed = api.run(resume=run_dir)
    local = api.run(config(tmp_path / "local", "local", federation={"rounds": 2}))
    assert [r["round"] for r in resumed.metrics] == [1, 2]
    assert_close_states(final_state(resumed), final_state(local))


def test_what_ray_cannot_run_is_refused_at_config_time(tmp_path: Path) -> None:
    local = config(tmp_path, "local")  # a dumped config repeats the defaults: still valid
    assert config_from_dict(local.model_dump(mode="json")).runtime.kind == "local"
    with pytest.raises(ConfigError, match="runtime.num_actors applies to runtime.kind 'ray'"):
        config(tmp_path, "local", runtime={"kind": "local", "num_actors": 4})
    with pytest.raises(ConfigError, match="runtime.address applies"):
        config(tmp_path, "local", runtime={"kind": "local", "address": "auto"})
    with pytest.raises(ConfigError, match=r"min_actors \(3\) exceeds runtime.num_actors \(2\)"):
        config(tmp_path, "ray", runtime={"kind": "ray", "num_actors": 2, "min_actors": 3})
    flora = config(tmp_path, "ray", algorithm={"name": "flora"})
    with pytest.raises(ConfigError, match="'flora' does not run on runtime.kind 'ray'"):
        api.check_components(flora)


class FakeRay:
    def __init__(self, gpus: float) -> None:
        self.gpus = gpus

    def cluster_resources(self) -> dict[str, float]:
        return {"CPU": 16.0, "GPU": self.gpus} if self.gpus else {"CPU": 16.0}


@pytest.mark.parametrize(("gpus", "actors", "given", "expected"), [
    (0, 2, None, 0.0), (4, 2, None, 1.0), (1, 2, None, 0.5), (8, 4, 2.0, 2.0)])
def test_gpus_per_actor(tmp_path: Path, gpus: float, actors: int, given: float | None,
                        expected: float) -> None:
    runtime = {"kind": "ray", "num_actors": actors}
    if given is not None:
        runtime["actor_gpus"] = given
    assert actor_gpus(FakeRay(gpus), config(tmp_path, "ray", runtime=runtime)) == expected


def test_gpu_requests_the_cluster_cannot_meet_are_refused(tmp_path: Path) -> None:
    too_many = config(tmp_path, "ray", runtime={"kind": "ray", "num_actors": 2,
                                                "actor_gpus": 1})
    with pytest.raises(ConfigError, match="more GPUs than the Ray cluster has"):
        actor_gpus(FakeRay(1), too_many)


def test_actors_get_the_drivers_speed_decisions(tmp_path: Path) -> None:
    from fedfm.runtime.fast import SpeedPlan

    cfg = config(tmp_path, "ray", runtime={"kind": "ray", "attention": "auto",
                                            "precision": "auto", "prefix_cache": "auto"})
    pinned = actor_config(cfg, SpeedPlan(precision="bf16", attention="sdpa", fused_loss=False,
                                         prefix_cache=False))
    assert (pinned.runtime.precision, pinned.runtime.attention, pinned.runtime.prefix_cache,
            pinned.runtime.fused_loss) == ("bf16", "sdpa", "off", False)
    assert pinned.runtime.kind == "ray" and pinned.tracking.console is False


@pytest.mark.slow
def test_runtime_address_joins_a_cluster_started_with_ray_start(tmp_path: Path) -> None:
    """``ray start --head`` in another process, then a run with ``runtime.address`` in a child
    process (a fresh driver): it joins that cluster and matches the local run."""
    import json
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray_cli = str(Path(sys.executable).with_name("ray"))
    head = subprocess.Popen(  # --block: the cluster lives as long as this process
        [ray_cli, "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=false", "--disable-usage-stats",
         f"--temp-dir={tmp_path / 'ray-head'}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _skip_unless_reachable(port)
        raw = cls_config_dict(tmp_path / "ray", model={"name": "tiny-bert", "max_length": 48,
                                                        "config_overrides": SMALL_BERT},
                              runtime={"kind": "ray", "num_actors": 2, "actor_cpus": 1,
                                       "attention": "eager", "num_threads": 1,
                                       "address": f"127.0.0.1:{port}"})
        script = ("import json, sys; import fedfm; from fedfm.config import config_from_dict;"
                  "r = fedfm.run(config_from_dict(json.loads(sys.argv[1])), console=False);"
                  "print(r.summary['final_state'])")
        done = subprocess.run([sys.executable, "-c", script, json.dumps(raw)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        from safetensors.torch import load_file

        joined = load_file(done.stdout.strip().splitlines()[-1])
        local = api.run(config_from_dict(cls_config_dict(
            tmp_path / "local", model={"name": "tiny-bert", "max_length": 48,
                                       "config_overrides": SMALL_BERT},
            runtime={"attention": "eager", "num_threads": 1})))
        assert_close_states(joined, final_state(local))
    finally:
        head.terminate()
        head.wait(timeout=60)


def _skip_unless_reachable(port: int) -> None:
    """Ray reaches a cluster on this machine through the machine's own network address, not
    loopback; some sandboxes refuse connections to it (this project's build machine does)."""
    import socket
    import time

    from ray._private.services import get_node_ip_address

    address = get_node_ip_address()
    for _ in range(60):  # the head needs a few seconds to listen
        try:
            socket.create_connection((address, port), timeout=2).close()
            return
        except OSError as exc:
            error = exc
            time.sleep(0.5)
    pytest.skip(f"this machine refuses connections to its own address {address}:{port} "
                f"({error}), which Ray uses to join a cluster on the same machine")
