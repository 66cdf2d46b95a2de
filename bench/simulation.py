"""Side-by-side simulation bench on workload W1 (see bench/overhead.py for its definition).

Each variant runs in its own child process (so peak memory is its own) on the same model init
and data, and prints one JSON line: wall seconds per round, peak memory (the peak of the summed
RSS of the child and all its descendants, sampled the same way for every variant by
bench/process_tree.py, e.g. Ray's processes for Flower, the C++ compiler during torch.compile's
warm-up), and the ratio to the fp32 floor measured in the same invocation. A table follows.

Variants:
  floor       plain PyTorch loop, fp32, the model's own loss, W1's optimizer steps on one model
  local_fp32  fedfm `local` runtime, fp32, the model's own loss (fused_loss off)
  fast_fp32   fedfm `local`, fused chunked loss, attention chosen by measurement, fp32
  fast_bf16   the same with bf16 weight storage and autocast
  fast_bf16_compile  fast_bf16 plus runtime.compile; the compilation runs in a warm-up round
              reported as setup.compile_warmup_round_s, not in wall_per_round_s (steady state)
  fast        the best of the fast_* variants on this machine (reported, not rerun)
  batched     fedfm `batched` runtime (all 10 clients of a round in one pass), fused loss, fp32
  batched_bf16  the same in bf16
  flower      Flower's simulation (bench/flower_w1.py; needs the `bench` extra: flwr + Ray)
  fast_compile  fast_fp32 plus torch.compile (opt-in: --variants ...,fast_compile)

With ``--repeats R`` every variant but Flower times its rounds R times in its process and reports
the fastest (the spread is in ``wall_s_repeats``): on a shared machine a single timing can be
off by +-5%.

    python bench/simulation.py [--rounds 2] [--repeats 1] [--threads N] [--variants ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import build_workload, run_fedfm, run_floor, w1_config  # noqa: E402
from process_tree import TreeRssSampler, peak_tree_rss_mb  # noqa: E402

from fedfm.api import probe_batch, seed_everything  # noqa: E402
from fedfm.models import get_state  # noqa: E402
from fedfm.runtime.batched import BatchedRuntime  # noqa: E402
from fedfm.runtime.fast import prepare_fast_path  # noqa: E402
from fedfm.runtime.local import LocalRuntime  # noqa: E402

VARIANTS = ("floor", "local_fp32", "fast_fp32", "fast_bf16", "fast_bf16_compile", "batched",
            "batched_bf16", "flower")
RUNTIME = {
    "local_fp32": {"precision": "fp32", "fused_loss": False, "attention": "sdpa"},
    "fast_fp32": {"precision": "fp32", "fused_loss": True, "attention": "auto"},
    "fast_bf16": {"precision": "bf16", "fused_loss": True, "attention": "auto"},
    "batched": {"precision": "fp32", "fused_loss": True, "attention": "auto",
                "kind": "batched", "clients_per_pass": 10},
    "batched_bf16": {"precision": "bf16", "fused_loss": True, "attention": "auto",
                     "kind": "batched", "clients_per_pass": 10},
    "fast_bf16_compile": {"precision": "bf16", "fused_loss": True, "attention": "auto",
                          "compile": True},
    # not in the default set: compilation takes over a minute on CPU, more than W1 saves
    "fast_compile": {"precision": "fp32", "fused_loss": True, "attention": "auto",
                     "compile": True},
}


def run_variant(variant: str, rounds: int, repeats: int) -> dict:
    sampler = TreeRssSampler()
    sampler.start()
    try:
        result = measure_variant(variant, rounds, repeats)
    finally:
        sampler.stop()
    return {**result, "peak_rss_mb": round(peak_tree_rss_mb(sampler), 1)}


def measure_variant(variant: str, rounds: int, repeats: int) -> dict:
    seed_everything(0)
    config = w1_config(rounds)
    if variant in RUNTIME:
        config = config.model_copy(update={"runtime": config.runtime.model_copy(
            update=RUNTIME[variant])})
    workload = build_workload(config)
    setup = {}
    if variant in RUNTIME:
        probe = probe_batch(config, workload.data, workload.bundle, torch.device("cpu"))
        plan, loss_fn, autocast_dtype = prepare_fast_path(
            workload.bundle, config.runtime, torch.device("cpu"), probe)
        workload.loss_fn, workload.autocast_dtype, workload.speed = loss_fn, autocast_dtype, plan
        setup = plan.as_dict()
    initial = get_state(workload.model)
    steps = rounds * config.federation.sample_size() * config.algorithm.local.steps
    if variant == "floor":
        run_floor(workload, initial, 5)  # warm-up
        times = [run_floor(workload, initial, steps) for _ in range(repeats)]
    else:
        runtime_cls = BatchedRuntime if config.runtime.kind == "batched" else LocalRuntime
        if config.runtime.compile:  # compile once, in a warm-up round, reported on its own
            setup["compile_warmup_round_s"] = round(
                run_fedfm(workload, initial, 1, runtime_cls), 3)
        times = [run_fedfm(workload, initial, rounds, runtime_cls) for _ in range(repeats)]
    seconds = min(times)
    return {"variant": variant, "rounds": rounds, "optimizer_steps": steps,
            "wall_s": round(seconds, 3), "wall_per_round_s": round(seconds / rounds, 3),
            "wall_s_repeats": [round(t, 3) for t in times], "setup": setup}


def spawn(variant: str, rounds: int, repeats: int, threads: int | None) -> dict:
    command = [sys.executable, __file__, "--child", variant, "--rounds", str(rounds),
               "--repeats", str(repeats)]
    if variant == "flower":
        if importlib.util.find_spec("flwr") is None:
            return {"variant": "flower", "status": "not measured",
                    "why": "flwr is not installed (pip install -e '.[bench]')"}
        command = [sys.executable, str(Path(__file__).with_name("flower_w1.py")),
                   "--rounds", str(rounds)]
    if threads:
        command += ["--threads", str(threads)]
    env = dict(os.environ)
    if RUNTIME.get(variant, {}).get("compile"):
        # compile in-process: a pool of compile workers would add its processes to peak memory
        env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    with tempfile.TemporaryFile() as err:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=err, text=True,
                              check=False, env=env)
        if done.returncode != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace")[-2000:]
            return {"variant": variant, "status": "failed", "error": tail}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(run_variant(args.child, args.rounds, args.repeats)))
        return
    started = time.perf_counter()
    results = [spawn(v, args.rounds, args.repeats, args.threads)
               for v in args.variants.split(",")]
    by_name = {r["variant"]: r for r in results if "wall_per_round_s" in r}
    fast = [by_name[v] for v in ("fast_fp32", "fast_bf16", "fast_bf16_compile") if v in by_name]
    if fast:
        best = min(fast, key=lambda r: r["wall_per_round_s"])
        results.append({**best, "variant": "fast", "chosen": best["variant"]})
    floor = by_name.get("floor")
    for result in results:
        if floor is not None and "wall_per_round_s" in result:
            result["ratio_to_floor"] = round(result["wall_per_round_s"]
                                             / floor["wall_per_round_s"], 4)
            result["memory_ratio_to_floor"] = round(result["peak_rss_mb"]
                                                    / floor["peak_rss_mb"], 3)
        result.update(bench="simulation", workload="W1", torch=torch.__version__,
                      machine=platform.machine(), threads=args.threads or torch.get_num_threads())
        print(json.dumps(result))
    fast_best = next((r for r in results if r["variant"] == "fast"), None)
    flower = by_name.get("flower")
    if fast_best is not None and flower is not None:
        print(json.dumps({"bench": "simulation", "variant": "flower_vs_fast",
                          "time_ratio": round(flower["wall_per_round_s"]
                                              / fast_best["wall_per_round_s"], 3),
                          "memory_ratio": round(flower["peak_rss_mb"]
                                                / fast_best["peak_rss_mb"], 3)}))
    print(f"\n{'variant':<12}{'s/round':>10}{'x floor':>9}{'peak MB':>10}{'mem x':>8}",
          file=sys.stderr)
    for result in results:
        if "wall_per_round_s" in result:
            print(f"{result['variant']:<12}{result['wall_per_round_s']:>10.2f}"
                  f"{result.get('ratio_to_floor', float('nan')):>9.3f}"
                  f"{result['peak_rss_mb']:>10.0f}"
                  f"{result.get('memory_ratio_to_floor', float('nan')):>8.2f}", file=sys.stderr)
    print(f"total {time.perf_counter() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
