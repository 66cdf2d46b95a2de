"""Model-level efficiency bench: accuracy and bytes of knowledge distillation (FedDF, FedMKT),
split learning (SplitFed), offsite tuning (FedOT) and black-box prompt tuning (FedBPT), each
next to FedAvg + LoRA measured in the same invocation.

The workload is bench/communication.py's ``sst2``: the real MiniLM encoder (6 blocks) with LoRA
r=8 on query/value, the shipped SST-2 subset (``--rows`` sentences, 10 clients, Dirichlet(1.0)
label skew), all clients each round, ``--rounds`` rounds of 8 local steps of batch 16, accuracy
on 400 validation sentences. Per method:

- ``feddf``: FedAvg, then ``--distill-steps`` Adam steps distilling the clients' ensemble on
  ``--public-rows`` unlabeled sentences of ``sst2_public.jsonl`` into the aggregate.
- ``fedmkt``: the clients hold a 4-block MiniLM (its first four pretrained blocks), the server
  the whole 6-block MiniLM; logits move both ways on the same public sentences. Reported next to
  ``fedavg_small`` (plain FedAvg of the 4-block model) and with the server model's accuracy.
- ``splitfed``: the clients hold the embeddings and block 0-1 (``cut_layer`` 2); bytes include
  the activations and gradients of every step.
- ``fedot``: the emulator keeps blocks 0 and 5 and a uniform half of the middle four; the line
  gives the full model's accuracy (adapters plugged back) and the emulator's.
- ``fedbpt``: prompt tuning with CMA-ES on a 500-dimensional subspace (forward queries only).

Each method runs in its own subprocess (``peak_rss_mb`` compares like with like). One JSON line
per method with its ratios to FedAvg + LoRA.

    python bench/model_efficiency.py [--rounds 5] [--only fedavg,feddf]
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

from communication import measured_run, sst2_config  # noqa: E402

SMALL_MINILM = {"name": "minilm", "max_length": 64, "config_overrides": {"num_hidden_layers": 4}}
METHODS = ("fedavg", "feddf", "fedavg_small", "fedmkt", "splitfed", "fedot", "fedbpt")


def method_config(method: str, args: argparse.Namespace) -> dict[str, Any]:
    raw = sst2_config(args.rounds, args.rows)
    raw["name"] = f"bench-model-efficiency-{method}"
    algorithm = raw["algorithm"]
    distill = {"public": {"path": str(DATA / "sst2_public.jsonl"), "max_rows": args.public_rows},
               "steps": args.distill_steps, "batch_size": 32, "lr": 1e-3, "temperature": 1.0}
    if method == "feddf":
        algorithm.update(name="feddf", distill=distill)
    elif method == "fedavg_small":
        raw["model"] = dict(SMALL_MINILM)
    elif method == "fedmkt":
        raw["model"] = dict(SMALL_MINILM)
        algorithm.update(name="fedmkt", distill={**distill, "server_model": {
            "name": "minilm", "max_length": 64}})
    elif method == "splitfed":
        algorithm.update(name="splitfed", split={"cut_layer": 2})
    elif method == "fedot":
        algorithm.update(name="fedot", offsite={"drop": 0.5, "bottom": 1, "top": 1})
    elif method == "fedbpt":
        raw["adapter"] = {"kind": "prompt_tuning", "num_virtual_tokens": 8}
        algorithm.update(name="fedbpt", bpt={"intrinsic_dim": 500, "population": 20,
                                             "generations": 4})
    return raw


def run_one(method: str, args: argparse.Namespace) -> dict[str, Any]:
    found, result = measured_run(method_config(method, args), "accuracy")
    clients = [entry for record in result.metrics for entry in record["clients"].values()
               if entry["status"] == "ok"]
    for name in ("split_activation_bytes", "split_gradient_bytes", "split_label_bytes",
                 "queries"):
        values = [entry[name] for entry in clients if name in entry]
        if values:
            found[f"{name}_per_client_round"] = sum(values) / len(values)
    distill = [r["distill"] for r in result.metrics if "distill" in r]
    if distill:
        found["distill_last"] = distill[-1]
    return found


def spawn(method: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", method, "--rounds", str(args.rounds),
               "--rows", str(args.rows), "--public-rows", str(args.public_rows),
               "--distill-steps", str(args.distill_steps)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(found: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    if "error" in found or "error" in baseline or found.get("val_accuracy") is None:
        return {}
    return {"accuracy_points_vs_fedavg": round(
                100 * (found["val_accuracy"] - baseline["val_accuracy"]), 2),
            "bytes_up_x_fedavg": round(found["bytes_up_per_client_round"]
                                       / baseline["bytes_up_per_client_round"], 3),
            "wall_x_fedavg": round(found["wall_s_per_round"] / baseline["wall_s_per_round"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--public-rows", type=int, default=256)
    parser.add_argument("--distill-steps", type=int, default=30)
    parser.add_argument("--only", default=None, help="comma-separated method names")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(run_one(args.child, args)))
        return
    chosen = args.only.split(",") if args.only else list(METHODS)
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    baseline = spawn("fedavg", args)
    for method in chosen:
        found = baseline if method == "fedavg" else spawn(method, args)
        print(json.dumps({"bench": "model_efficiency", "method": method,
                          "rounds": args.rounds, **found, **compare(found, baseline),
                          "machine": platform.machine(), "python": platform.python_version()}),
              flush=True)


if __name__ == "__main__":
    main()
