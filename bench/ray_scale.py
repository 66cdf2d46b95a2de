"""The ``ray`` runtime against ``local`` on workload W1 (bench/overhead.py's model and round: a
Llama-architecture model from config, LoRA r=8 on q_proj/v_proj, 10 of 20 clients a round, 10
local AdamW steps of batch 8 at 128 tokens), on Dolly rows as in bench/deploy.py, since every
Ray actor builds its data from the config.

Each variant runs in its own child process through ``fedfm.run`` (sampling, State swaps,
aggregation, checkpoints; evaluation off) and prints one JSON line: setup seconds (model, data
and, for Ray, starting the instance and the actors), seconds per round (steady state: rounds 2
and later; round 1 is reported apart), peak memory summed over the child and all its descendants
(Ray's raylet, GCS and actors included; bench/process_tree.py), and the largest difference of
its final global State from the ``local`` run's, measured in the same invocation. Variants:
``local`` (one process, ``--threads`` torch threads) and ``ray_N`` for each N in ``--actors``
(N actors of ``--threads / N`` CPUs each, at least one).

    python bench/ray_scale.py [--rounds 4] [--actors 1,2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from deploy import bench_config  # noqa: E402
from process_tree import TreeRssSampler, peak_tree_rss_mb  # noqa: E402

NUM_CLIENTS, PER_ROUND = 20, 10


def variant_config(variant: str, rounds: int, threads: int, out: Path) -> dict[str, Any]:
    raw = bench_config(num_clients=NUM_CLIENTS, per_round=PER_ROUND, rounds=rounds,
                       output_dir=out)
    raw["name"] = f"bench-ray-{variant}"
    raw.pop("deploy", None)
    raw["tracking"].update(checkpoint_every=1)
    raw["runtime"].update(attention="sdpa", num_threads=threads)
    if variant.startswith("ray_"):
        actors = int(variant.removeprefix("ray_"))
        cpus = max(1, threads // actors)
        raw["runtime"].update(kind="ray", num_actors=actors, actor_cpus=cpus, num_threads=cpus)
    return raw


def measure(variant: str, rounds: int, threads: int) -> dict[str, Any]:
    from safetensors.torch import save_file

    import fedfm
    from fedfm.config import config_from_dict

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        config = config_from_dict(variant_config(variant, rounds, threads, Path(tmp)))
        sampler = TreeRssSampler()
        sampler.start()
        start = time.perf_counter()
        result = fedfm.run(config, console=False)
        total = time.perf_counter() - start
        sampler.stop()
        state_path = Path(os.environ["RAY_SCALE_STATE_DIR"]) / f"{variant}.safetensors"
        save_file({k: v.contiguous() for k, v in result.final_state.items()}, str(state_path))
    per_round = [float(r["wall_time"]["round"]) for r in result.metrics]
    steady = per_round[1:] or per_round
    return {"wall_s_per_round": round(sum(steady) / len(steady), 3),
            "round1_s": round(per_round[0], 3),
            "setup_s": round(total - sum(per_round), 2),
            "peak_tree_rss_mb": round(peak_tree_rss_mb(sampler), 1),
            "max_processes": sampler.max_processes,
            "rounds": rounds, "threads": threads}


def spawn(variant: str, args: argparse.Namespace, state_dir: str) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", variant, "--rounds", str(args.rounds),
               "--threads", str(args.threads)]
    env = {**os.environ, "RAY_SCALE_STATE_DIR": state_dir}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def state_gap(state_dir: str, variant: str) -> float | None:
    from safetensors.torch import load_file

    base, path = Path(state_dir) / "local.safetensors", Path(state_dir) / f"{variant}.safetensors"
    if not (base.exists() and path.exists()):
        return None
    ours, theirs = load_file(str(path)), load_file(str(base))
    return max(float((ours[k] - theirs[k]).abs().max()) for k in theirs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--actors", default="1,2", help="comma-separated actor counts")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads of local; CPUs shared by the actors")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, args.rounds, args.threads)))
        return
    variants = ["local", *(f"ray_{int(n)}" for n in args.actors.split(","))]
    with tempfile.TemporaryDirectory() as state_dir:
        found = {variant: spawn(variant, args, state_dir) for variant in variants}
        local = found["local"]
        for variant in variants:
            row = found[variant]
            extra: dict[str, Any] = {}
            if variant != "local" and "error" not in row and "error" not in local:
                extra = {"round_time_vs_local": round(row["wall_s_per_round"]
                                                      / local["wall_s_per_round"], 3),
                         "memory_vs_local": round(row["peak_tree_rss_mb"]
                                                  / local["peak_tree_rss_mb"], 3),
                         "max_abs_state_diff_vs_local": state_gap(state_dir, variant)}
            print(json.dumps({"bench": "ray_scale", "workload": "W1-dolly", "variant": variant,
                              **row, **extra, "cpu_count": os.cpu_count(),
                              "torch": torch.__version__, "machine": platform.machine(),
                              "python": platform.python_version()}), flush=True)


if __name__ == "__main__":
    main()
