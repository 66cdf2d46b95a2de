"""Communication bench: bytes up per client per round, what the run reaches after a fixed number
of rounds, wall time and peak memory, for every efficiency method next to FedAvg + LoRA measured
in the same invocation.

Two workloads. ``sst2`` (accuracy): the real MiniLM encoder with LoRA r=8 on query/value, the
shipped SST-2 subset (``--rows`` sentences, 10 clients, Dirichlet(1.0) label skew), all clients
each round, ``--rounds`` rounds of 8 local steps of batch 16; validation accuracy on 400 held-out
sentences (FedSA-LoRA keeps B on the clients, so its line also gives the mean of the clients'
own accuracies). ``w1`` (loss, bytes, memory): W1's model (bench/overhead.py: tiny-llama,
hidden 256, 4 layers, LoRA r=8 on q_proj/v_proj) on Dolly rows, 10 of 20 clients per round,
validation loss after ``--rounds`` rounds. Zeroth-order methods take ``--zo-steps`` local steps
(two forward passes each, plain SGD). Every method runs in its own subprocess, so ``peak_rss_mb``
(the process's maximum RSS) and ``train_rss_mb`` (its growth during the federated rounds, over
the RSS after the model and data are loaded) compare like with like. One JSON line per method,
each with its ratios to FedAvg + LoRA of the same workload.

    python bench/communication.py [--workload sst2|w1|both] [--rounds 5] [--only fedavg,int8]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"

STOCHASTIC_INT8 = {"kind": "quantize", "bits": 8, "rounding": "stochastic"}
METHODS: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "int8": {"compression": {"chain": [STOCHASTIC_INT8]}},
    "int4_block64": {"compression": {"chain": [{"kind": "quantize", "bits": 4,
                                                "rounding": "stochastic", "block_size": 64}],
                                     "error_feedback": True}},
    "qsgd4_block256": {"compression": {"chain": [{"kind": "qsgd", "bits": 4,
                                                  "block_size": 256}]}},
    "topk5_int8_ef": {"compression": {"chain": [{"kind": "topk", "fraction": 0.05},
                                                STOCHASTIC_INT8], "error_feedback": True}},
    "randk10_ef": {"compression": {"chain": [{"kind": "randk", "fraction": 0.1}],
                                   "error_feedback": True}},
    "fedit": {"name": "fedit"},
    "ffa_lora": {"name": "ffa_lora"},
    "flora": {"name": "flora"},
    "flexlora_tiers": {"name": "flexlora", "lora": {"tiers": [{"rank": 2, "fraction": 0.5},
                                                              {"rank": 8, "fraction": 0.5}]}},
    "hetlora_tiers": {"name": "hetlora", "lora": {"tiers": [{"rank": 2, "fraction": 0.5},
                                                            {"rank": 8, "fraction": 0.5}]}},
    "fedsa_lora": {"name": "fedsa_lora"},
    "fedkseed": {"name": "fedkseed", "zo": {"num_seeds": 4096, "eps": 1e-3}},
    "fedzo": {"name": "fedzo", "zo": {"directions": 2, "eps": 1e-3}},
}
ZERO_ORDER = ("fedkseed", "fedzo")
W1_METHODS = ("fedavg", "int8", "topk5_int8_ef", "flora", "flexlora_tiers", "fedkseed",
              "fedzo")


def sst2_config(rounds: int, rows: int) -> dict[str, Any]:
    """bench/privacy.py's MiniLM + SST-2 set-up, example-weighted and without privacy."""
    sys.path.insert(0, str(ROOT / "bench"))
    from privacy import config as privacy_config

    raw = privacy_config(rounds, rows, "runs", {})
    del raw["privacy"]
    raw["name"] = "bench-communication-sst2"
    raw["algorithm"] = {"name": "fedavg", "local": {"steps": 8, "batch_size": 16, "lr": 5e-3}}
    return raw


def w1_config(rounds: int) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "bench"))
    from overhead import w1_config as overhead_w1

    raw = overhead_w1(rounds).model_dump(mode="json")
    raw["name"] = "bench-communication-w1"
    raw["data"] = {"path": str(DATA / "dolly_train.jsonl"), "format": "instruction",
                   "max_rows": 1600, "validation_path": str(DATA / "dolly_validation.jsonl"),
                   "max_validation_rows": 100, "partition": {"kind": "iid"}}
    raw["eval"] = {"enabled": True, "every": rounds, "per_client": False, "batch_size": 16}
    return raw


def method_config(workload: str, method: str, rounds: int, rows: int, zo_steps: int,
                  out: str) -> dict[str, Any]:
    raw = sst2_config(rounds, rows) if workload == "sst2" else w1_config(rounds)
    raw["tracking"]["output_dir"] = out
    changes = METHODS[method]
    algorithm = raw["algorithm"]
    algorithm.update({k: v for k, v in changes.items() if k != "name"})
    algorithm["name"] = changes.get("name", "fedavg")
    if method in ZERO_ORDER:  # plain SGD at MeZO's scale of learning rate
        algorithm["local"] = {**algorithm["local"], "optimizer": "sgd", "momentum": 0.0,
                              "steps": zo_steps, "lr": 1e-4 if workload == "sst2" else 1e-5}
    if method == "fedsa_lora":
        raw["eval"]["per_client"] = True
    return raw


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def run_one(workload: str, method: str, rounds: int, rows: int, zo_steps: int) -> dict[str, Any]:
    """One method in this process (the parent runs each in a fresh one)."""
    raw = method_config(workload, method, rounds, rows, zo_steps, "unused")
    found, result = measured_run(raw, "accuracy" if workload == "sst2" else "loss")
    lora = [r["lora"] for r in result.metrics if "lora" in r]
    if lora:
        found["lora_last"] = lora[-1]
    errors = [e["compression_error"] for r in result.metrics for e in r["clients"].values()
              if "compression_error" in e]
    if errors:
        found["compression_error_mean"] = sum(errors) / len(errors)
    return found


def measured_run(raw: dict[str, Any], metric: str) -> tuple[dict[str, Any], Any]:
    """Run ``raw`` (a config dict) in this process: bytes per client per round, time, memory
    and the last evaluation's ``metric`` (global, and the clients' mean when per-client)."""
    import torch

    from fedfm import api
    from fedfm.config import config_from_dict

    rounds = raw["federation"]["rounds"]
    with tempfile.TemporaryDirectory() as out:
        raw = {**raw, "tracking": {**raw["tracking"], "output_dir": out}}
        config = config_from_dict(raw)
        api.check_components(config)
        api.seed_everything(config.seed)
        algorithm = api.build_algorithm(config)
        start = time.perf_counter()
        workload_obj = api.build_workload(config, algorithm)
        loaded_rss = rss_mb()
        full_model_bytes = sum(p.numel() * p.element_size()
                               for p in workload_obj.model.parameters())
        del workload_obj  # the run builds its own; this measured the loaded baseline
        result = api.run(config, console=False)
        wall = time.perf_counter() - start
    uploads = [entry["bytes_up"] for record in result.metrics
               for entry in record["clients"].values() if entry["status"] == "ok"]
    last_eval = next((r["eval"] for r in reversed(result.metrics) if "eval" in r), {})
    found: dict[str, Any] = {
        "bytes_up_per_client_round": sum(uploads) / max(len(uploads), 1),
        "bytes_down_per_client_round": result.summary["bytes_down"] / max(len(uploads), 1),
        "wall_s_per_round": result.summary["wall_time"] / rounds,
        "total_s": round(wall, 1),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "loaded_rss_mb": round(loaded_rss, 1),
        "train_loss_last": result.metrics[-1].get("train_loss"),
        # what full-parameter FedAvg would upload (FedKSeed's own comparison)
        "full_model_bytes": full_model_bytes,
        "torch_threads": torch.get_num_threads()}
    found["train_rss_mb"] = round(found["peak_rss_mb"] - loaded_rss, 1)
    found[f"val_{metric}"] = last_eval.get("global", {}).get(metric)
    per_client = last_eval.get("per_client")
    if per_client:
        values = [m[metric] for m in per_client.values() if metric in m]
        found[f"clients_mean_{metric}"] = sum(values) / len(values)
    found["last_eval"] = last_eval.get("global", {})
    return found, result


def spawn(workload: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", method, "--workload", workload,
               "--rounds", str(args.rounds), "--rows", str(args.rows),
               "--zo-steps", str(args.zo_steps)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(found: dict[str, Any], baseline: dict[str, Any], workload: str) -> dict[str, Any]:
    if "error" in found or "error" in baseline:
        return {}
    ratios = {"bytes_up_reduction_x": round(baseline["bytes_up_per_client_round"]
                                           / found["bytes_up_per_client_round"], 2),
              "wall_x_fedavg": round(found["wall_s_per_round"]
                                     / baseline["wall_s_per_round"], 3),
              "train_rss_x_fedavg": round(found["train_rss_mb"]
                                          / max(baseline["train_rss_mb"], 1e-9), 3)}
    if workload == "sst2" and found.get("val_accuracy") is not None:
        ratios["accuracy_points_vs_fedavg"] = round(
            100 * (found["val_accuracy"] - baseline["val_accuracy"]), 2)
    ratios["bytes_up_vs_full_model_x"] = round(found["full_model_bytes"]
                                               / found["bytes_up_per_client_round"], 1)
    if workload == "w1" and found.get("val_loss") is not None:
        ratios["loss_minus_fedavg"] = round(found["val_loss"] - baseline["val_loss"], 4)
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=["sst2", "w1", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--zo-steps", type=int, default=32)
    parser.add_argument("--only", default=None, help="comma-separated method names")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(run_one(args.workload, args.child, args.rounds, args.rows,
                                 args.zo_steps)))
        return
    chosen = args.only.split(",") if args.only else list(METHODS)
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    workloads = ["sst2", "w1"] if args.workload == "both" else [args.workload]
    for workload in workloads:
        methods = [m for m in chosen if workload == "sst2" or m in W1_METHODS]
        baseline = spawn(workload, "fedavg", args)
        for method in methods:
            found = baseline if method == "fedavg" else spawn(workload, method, args)
            print(json.dumps({"bench": "communication", "workload": workload,
                              "method": method, "rounds": args.rounds, **found,
                              **compare(found, baseline, workload),
                              "machine": platform.machine(), "python": platform.python_version()
                              }), flush=True)


if __name__ == "__main__":
    main()
