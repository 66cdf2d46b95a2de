"""Adaptability bench: the global FedAvg model against every personalization and clustering
method, on two kinds of client heterogeneity, in one invocation.

Workloads (the real MiniLM encoder, LoRA r=8 on query/value with the classifier head):

- ``nusax``: NusaX-Senti (shipped subset, ``examples/data/nusax_*.jsonl``), one client per
  language (12 clients; the same label mix everywhere, a pure language/feature skew).
- ``sst2``: the shipped SST-2 subset over 10 clients with a Dirichlet(0.1) label skew (most
  clients hold almost one class).

Methods: ``fedavg`` (the global model), ``fedavg_ft`` (FedAvg, then ``--finetune-steps`` local
steps per client before its personalized evaluation), ``fedper``, ``fedrep``, ``ditto``,
``fedsa_lora``, ``dual_lora``, ``ifca`` (k=2), ``cfl`` and, on NusaX (languages as domains),
``domain_lora``; and the reference ``local_majority`` (no training: each client predicts its
training split's most frequent label), the floor a personalized model must clear under label
skew, where a client's own split is mostly one class. Every client is evaluated on its own
validation split: ``own_accuracy_mean`` / ``own_accuracy_worst10`` use each client's own model
(the personalized metrics; the global model's for ``fedavg``), next to the global model's
(``global_model_accuracy_*``) and the global validation accuracy. Each method runs in its own
subprocess; each line reports its difference to ``fedavg`` on the same workload.

    python bench/adaptability.py [--rounds 5] [--only fedavg,fedper] [--workloads nusax]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
sys.path.insert(0, str(ROOT / "bench"))

from communication import measured_run  # noqa: E402

METHODS = ("fedavg", "fedavg_ft", "fedper", "fedrep", "ditto", "fedsa_lora", "dual_lora",
           "ifca", "cfl", "domain_lora", "local_majority")
GROUPED = {"domain_lora"}  # needs data.group_by: NusaX's language, not SST-2
WORKLOADS = ("nusax", "sst2")


def workload_config(workload: str, args: argparse.Namespace) -> dict[str, Any]:
    common = {
        "seed": 0,
        "model": {"name": "minilm", "max_length": 64},
        "adapter": {"kind": "lora", "r": 8, "alpha": 16, "target_modules": ["query", "value"],
                    "train_head": True},
        "algorithm": {"name": "fedavg", "local": {"steps": args.local_steps, "batch_size": 16,
                                                  "lr": 5e-3, "max_grad_norm": 1.0}},
        "eval": {"every": args.rounds, "batch_size": 64},
        "tracking": {"output_dir": "runs", "console": False},
        "runtime": {"attention": "eager"},
    }
    if workload == "nusax":
        data = {"path": str(DATA / "nusax_train.jsonl"),
                "validation_path": str(DATA / "nusax_validation.jsonl"),
                "format": "classification", "text_field": "text", "label_field": "label",
                "label_names": ["negative", "neutral", "positive"], "group_by": "language",
                "client_validation_fraction": 0.2,
                "partition": {"kind": "natural", "by": "language"}}
        federation = {"num_clients": 12, "clients_per_round": 12, "rounds": args.rounds}
    else:
        data = {"path": str(DATA / "sst2_train.jsonl"), "max_rows": args.rows,
                "validation_path": str(DATA / "sst2_validation.jsonl"),
                "max_validation_rows": 400, "format": "classification",
                "text_field": "sentence", "label_field": "label",
                "label_names": ["negative", "positive"], "client_validation_fraction": 0.2,
                "partition": {"kind": "dirichlet", "alpha": 0.1, "by": "label",
                              "min_size": 20}}
        federation = {"num_clients": 10, "clients_per_round": 10, "rounds": args.rounds}
    return {**common, "name": f"bench-adaptability-{workload}", "data": data,
            "federation": federation}


def method_config(workload: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    raw = workload_config(workload, args)
    algorithm = raw["algorithm"]
    if method == "fedavg_ft":
        raw["eval"]["finetune_steps"] = args.finetune_steps
    elif method == "ifca":
        algorithm.update(name="ifca", cluster={"k": 2})
    elif method == "ditto":
        algorithm.update(name="ditto", personal={"lam": 0.1})
    elif method != "fedavg":
        algorithm["name"] = method
    return raw


def local_majority(workload: str, args: argparse.Namespace) -> dict[str, Any]:
    """Each client's accuracy when it predicts its training split's most frequent label."""
    from collections import Counter

    from fedfm import api
    from fedfm.config import config_from_dict
    from fedfm.eval.evaluator import fairness_summary

    config = config_from_dict(method_config(workload, "fedavg", args))
    data = api.build_workload(config, api.build_algorithm(config)).data
    per_client = {}
    for client in data.clients:
        majority = Counter(e["labels"] for e in client.train).most_common(1)[0][0]
        hits = [e["labels"] == majority for e in client.validation]
        per_client[client.client_id] = {"accuracy": sum(hits) / max(len(hits), 1)}
    spread = fairness_summary(per_client, metric="accuracy", higher_is_better=True)
    return {"own_accuracy_mean": spread["accuracy_mean"],
            "own_accuracy_worst10": spread["accuracy_worst10"]}


def run_one(workload: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    if method == "local_majority":
        return local_majority(workload, args)
    found, result = measured_run(method_config(workload, method, args), "accuracy")
    last_eval = next((r["eval"] for r in reversed(result.metrics) if "eval" in r), {})
    global_model = last_eval.get("fairness", {})
    own = last_eval.get("personalized_fairness") or global_model
    out = {"val_accuracy": found["val_accuracy"],
           "global_model_accuracy_mean": global_model.get("accuracy_mean"),
           "global_model_accuracy_worst10": global_model.get("accuracy_worst10"),
           "own_accuracy_mean": own.get("accuracy_mean"),
           "own_accuracy_worst10": own.get("accuracy_worst10"),
           "bytes_up_per_client_round": found["bytes_up_per_client_round"],
           "bytes_down_per_client_round": found["bytes_down_per_client_round"],
           "wall_s_per_round": found["wall_s_per_round"]}
    clustered = [r for r in result.metrics if "num_clusters" in r]
    if clustered:
        out["num_clusters"] = clustered[-1]["num_clusters"]
        if "cluster_purity" in clustered[-1]:
            out["cluster_purity"] = clustered[-1]["cluster_purity"]
    return out


def spawn(workload: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", f"{workload}:{method}",
               "--rounds", str(args.rounds), "--rows", str(args.rows),
               "--local-steps", str(args.local_steps),
               "--finetune-steps", str(args.finetune_steps)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(found: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    if "error" in found or "error" in baseline:
        return {}
    return {f"{key}_points_vs_fedavg": round(100 * (found[key] - baseline[key]), 2)
            for key in ("own_accuracy_mean", "own_accuracy_worst10")
            if found.get(key) is not None and baseline.get(key) is not None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--finetune-steps", type=int, default=8)
    parser.add_argument("--only", default=None, help="comma-separated method names")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        workload, method = args.child.split(":")
        print(json.dumps(run_one(workload, method, args)))
        return
    chosen = args.only.split(",") if args.only else list(METHODS)
    workloads = args.workloads.split(",")
    unknown = [m for m in chosen if m not in METHODS] + [w for w in workloads
                                                         if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown {unknown}; methods: {', '.join(METHODS)}; workloads: "
                     f"{', '.join(WORKLOADS)}")
    for workload in workloads:
        baseline = spawn(workload, "fedavg", args)
        for method in chosen:
            if method in GROUPED and workload != "nusax":
                continue
            found = baseline if method == "fedavg" else spawn(workload, method, args)
            print(json.dumps({"bench": "adaptability", "workload": workload, "method": method,
                              "rounds": args.rounds, **found, **compare(found, baseline),
                              "machine": platform.machine(),
                              "python": platform.python_version()}), flush=True)


if __name__ == "__main__":
    main()
