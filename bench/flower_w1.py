"""Flower's simulation of workload W1 (see bench/overhead.py), written the usual FlowerTune way.

A Message-API ``ClientApp`` whose train function builds the model per call (fedfm's
``load_model`` + ``apply_adapter``, so the model is identical to the other variants: tiny-llama,
LoRA r=8 alpha=16 on q_proj/v_proj), loads the received LoRA arrays with peft's
``set_peft_model_state_dict``, runs W1's local steps with a plain loop (the model's own loss,
AdamW lr 1e-3, 10 steps of batch 8) and replies with ``get_peft_model_state_dict`` and
``num-examples``. A ``ServerApp`` runs Flower's ``FedAvg`` (10 of 20 nodes a round, no
evaluation). ``flwr.simulation.run_simulation`` runs both in-process on the Ray backend with 20
virtual SuperNodes.

By default Ray gets ``--threads`` CPUs and each ClientApp ``--threads`` CPUs (one actor at a
time, ``torch.set_num_threads(threads)`` in the client): the same compute as the other variants.
``--num-cpus-per-client`` lowers the per-client share (and its torch threads) to run more actors
at once.

wall_s runs from the call of run_simulation to its return (Ray start-up, actor start-up and
shutdown included); ray_startup_s is ``ray.init`` alone. peak_rss_mb is the peak of the summed
RSS of this process and all its descendants (Ray's gcs/raylet/workers), sampled every 0.2 s
(shared pages, e.g. Ray's object store and shared libraries, count once per process).
Only the JSON line goes to stdout; Flower's and Ray's logs go to stderr.

    python bench/flower_w1.py [--rounds 2] [--threads N] [--num-cpus-per-client C]
"""

from __future__ import annotations

import os

# Offline: no Flower telemetry, no Ray usage stats (read when the packages are imported).
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DISABLE_DOCKER_CPU_WARNING", "1")
# Ray runs its workers at nice 15 by default; on a machine with other load that starves the
# ClientApps against the nice-0 variants they are compared with. Same priority for all.
os.environ.setdefault("RAY_worker_niceness", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Iterable, Iterator  # noqa: E402
from functools import partial  # noqa: E402
from importlib.metadata import version  # noqa: E402
from pathlib import Path  # noqa: E402

import psutil  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import NUM_CLIENTS, w1_config, w1_data  # noqa: E402
from process_tree import TreeRssSampler  # noqa: E402

from fedfm.config import RunConfig  # noqa: E402
from fedfm.data import collate  # noqa: E402
from fedfm.models import ModelBundle, apply_adapter, load_model  # noqa: E402


def get_model(config: RunConfig) -> ModelBundle:
    """The W1 model, exactly as bench/overhead.py's build_workload makes it."""
    return apply_adapter(load_model(config.model, seed=0), config.adapter, seed=0)


# --------------------------------------------------------------------------- Flower apps


def build_client_app():  # -> flwr.clientapp.ClientApp
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        """Train the LoRA adapter on this node's partition (FlowerTune's train())."""
        started = time.perf_counter()
        cfg = msg.content["config"]
        torch.set_num_threads(int(cfg["threads"]))
        warnings.filterwarnings("ignore", category=UserWarning)
        partition_id = int(context.node_config["partition-id"])
        server_round = int(cfg["server-round"])
        config = w1_config(int(cfg["num-server-rounds"]))
        local = config.algorithm.local

        # This node's partition (seeded synthetic W1 tokens; FlowerTune's load_data)
        trainset = w1_data().clients[partition_id].train

        # Load the model and initialise it with the received weights
        bundle = get_model(config)
        model = bundle.model
        set_peft_model_state_dict(model, msg.content["arrays"].to_torch_state_dict())

        built = time.perf_counter()

        # Plain local loop: `steps` AdamW steps of `batch_size` on the model's own loss
        loader = torch.utils.data.DataLoader(
            trainset, batch_size=local.batch_size, shuffle=True, drop_last=True,
            collate_fn=partial(collate, pad_token_id=bundle.tokenizer.pad_token_id,
                               task=bundle.task),
            generator=torch.Generator().manual_seed(1000 * server_round + partition_id))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=local.lr)
        model.train()
        losses: list[float] = []
        while len(losses) < local.steps:
            for batch in loader:
                loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                if len(losses) == local.steps:
                    break

        # Construct and return the reply Message
        model_record = ArrayRecord(get_peft_model_state_dict(model))
        metrics = {"train_loss": sum(losses) / len(losses), "num-examples": len(trainset),
                   "setup_s": built - started, "train_s": time.perf_counter() - built,
                   "torch_threads": torch.get_num_threads()}
        content = RecordDict({"arrays": model_record, "metrics": MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    return app


def build_server_app(rounds: int, client_threads: int, report: dict):  # -> flwr.serverapp.ServerApp
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from peft import get_peft_model_state_dict

    class TimedFedAvg(FedAvg):
        """FedAvg that also records each round's wall time and its successful replies."""

        def configure_train(self, server_round: int, arrays: ArrayRecord,
                            config: ConfigRecord, grid: Grid) -> Iterable[Message]:
            report["round_start"][server_round] = time.perf_counter()
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round: int, replies: Iterable[Message]):
            replies = list(replies)
            report["replies"][server_round] = sum(not m.has_error() for m in replies)
            result = super().aggregate_train(server_round, replies)
            report["round_s"][server_round] = round(
                time.perf_counter() - report["round_start"][server_round], 3)
            return result

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = w1_config(rounds)
        init_model = get_model(config).model
        arrays = ArrayRecord(get_peft_model_state_dict(init_model))
        del init_model
        strategy = TimedFedAvg(
            fraction_train=config.federation.sample_size() / NUM_CLIENTS,
            fraction_evaluate=0.0,
            min_available_nodes=NUM_CLIENTS,
        )
        train_config = ConfigRecord({"num-server-rounds": rounds, "threads": client_threads})
        result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=rounds,
                                train_config=train_config)
        report["client_metrics"] = {
            r: {k: round(float(v), 4) for k, v in m.items()}
            for r, m in result.train_metrics_clientapp.items()}

    return app


# --------------------------------------------------------------------------- measurement


@contextlib.contextmanager
def timed_ray_init(report: dict) -> Iterator[None]:
    """Time ``ray.init`` inside Flower's Ray backend (it runs in this process)."""
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    original = RayBackend.init_ray

    def init_ray(self: RayBackend, backend_config: dict) -> None:
        start = time.perf_counter()
        original(self, backend_config)
        report["ray_startup_s"] = round(time.perf_counter() - start, 3)

    RayBackend.init_ray = init_ray
    try:
        yield
    finally:
        RayBackend.init_ray = original


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send everything written to fd 1 meanwhile (ours, Ray's, its children's) to stderr."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _busy_cpu_s() -> float:
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def reap_descendants(timeout: float = 10.0) -> list[str]:
    """Wait for the processes Ray started to exit; terminate (then kill) any that remain."""
    root = psutil.Process()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in root.children(recursive=True) if p.is_running()
                 and p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return []
        time.sleep(0.2)
    names = []
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            names.append(f"{proc.pid}:{proc.name()}")
            proc.terminate()
    _, still = psutil.wait_procs(alive, timeout=5)
    for proc in still:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return names


# --------------------------------------------------------------------------- main


def run(rounds: int, threads: int, cpus_per_client: float) -> dict:
    import ray
    from flwr.simulation import run_simulation

    report: dict = {"round_start": {}, "round_s": {}, "replies": {}}
    ray_tmp = tempfile.mkdtemp(prefix="flwr-ray-")  # Ray's session files; removed at the end
    backend_config = {
        "init_args": {"num_cpus": threads, "num_gpus": 0, "include_dashboard": False,
                      "logging_level": "WARNING", "_temp_dir": ray_tmp},
        "client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
    }
    # torch threads per ClientApp: the caller's, or the actor's CPU share when that is smaller
    client_threads = max(1, int(min(threads, cpus_per_client)))
    server_app = build_server_app(rounds, client_threads, report)
    client_app = build_client_app()
    sampler = TreeRssSampler()
    sampler.start()
    busy_before = _busy_cpu_s()
    own_before = sum(psutil.Process().cpu_times()[:2])
    start = time.perf_counter()
    try:
        with timed_ray_init(report), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            run_simulation(server_app=server_app, client_app=client_app,
                           num_supernodes=NUM_CLIENTS, backend_config=backend_config)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        wall = time.perf_counter() - start
        sampler.stop()
        busy = _busy_cpu_s() - busy_before
        leftovers = reap_descendants()
        shutil.rmtree(ray_tmp, ignore_errors=True)

    sample = w1_config(rounds).federation.sample_size()
    expected = {r: sample for r in range(1, rounds + 1)}
    if report["replies"] != expected:
        raise RuntimeError(f"successful client replies per round {report['replies']}, "
                           f"expected {expected}")
    steps = rounds * sample * w1_config(rounds).algorithm.local.steps
    return {
        "variant": "flower", "rounds": rounds, "optimizer_steps": steps,
        "wall_s": round(wall, 3), "wall_per_round_s": round(wall / rounds, 3),
        "peak_rss_mb": round(sampler.peak_bytes / 2**20, 1),
        "ray_startup_s": report.get("ray_startup_s"),
        "round_s": [report["round_s"][r] for r in sorted(report["round_s"])],
        "client_mean": [report["client_metrics"][r] for r in sorted(report["client_metrics"])],
        "setup": {
            "flwr": version("flwr"), "ray": ray.__version__, "num_cpus_per_client": cpus_per_client,
            "ray_num_cpus": threads, "threads": threads, "client_threads": client_threads,
            "actor_pool_size": int(threads // cpus_per_client),
            "max_processes": sampler.max_processes,
            "max_alive_by_name": dict(sorted(sampler.max_by_name.items())),
            "ray_actor_nice": sorted(sampler.actor_nice),
            # CPU seconds of this process tree vs the whole machine during wall_s (the rest is
            # other load on the machine, which slows every variant alike)
            "tree_cpu_s": round(sum(sampler.cpu_s.values()) - own_before, 1),
            "machine_busy_cpu_s": round(busy, 1),
            "model_built_per_client_call": True,
            "leftover_processes_killed": leftovers,
            "torch": torch.__version__, "machine": platform.machine(),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--num-cpus-per-client", type=float, default=None,
                        help="Ray CPUs per ClientApp (default: --threads, one actor at a time)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    cpus_per_client = args.num_cpus_per_client or float(threads)
    with stdout_to_stderr():
        result = run(args.rounds, threads, cpus_per_client)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
