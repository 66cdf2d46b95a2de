"""Robustness bench: aggregator x attack on MiniLM + LoRA, SST-2, 20 clients, 20% malicious.

Each cell is one fedfm run (the shipped SST-2 subset, ``--rows`` training sentences split IID
over 20 clients, all 20 every round, ``--rounds`` rounds of ``--steps`` local steps of ``--batch``,
bf16 autocast). Four clients (20%) are malicious; every robust aggregator is told f = 20%. The
baseline row is the plain FedAvg mean; the baseline column is no attack. Reported per cell:
clean validation accuracy after the last round, the backdoor's attack success rate (share of
triggered validation sentences of the other class classified as the target), and, for
aggregators that leave clients out, the mean detection precision / recall over rounds. One JSON
line per cell, then a table; the table is what the README shows.

    python bench/robustness.py [--rounds 4] [--rows 1000] [--steps 4] [--batch 8]
                               [--aggregators mean,krum]
                               [--attacks none,alie]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
AGGREGATORS = ["mean", "median", "trimmed_mean", "krum", "multi_krum", "bulyan",
               "geometric_median", "centered_clipping", "norm_bounding", "fltrust", "dnc",
               "clipped_clustering"]
ATTACKS = ["none", "label_flip", "backdoor", "sign_flip", "gaussian", "scaling", "alie", "ipm",
           "min_max", "min_sum"]
BACKDOORS = {"backdoor", "scaling"}


def config(aggregator: str, attack: str, args: argparse.Namespace, out: str) -> dict:
    robustness = {} if attack == "none" else {"attack": {
        "kind": attack, "fraction": 0.2, "target_label": 1, "poison_fraction": 0.5}}
    return {
        "name": f"bench-robust-{aggregator}-{attack}", "seed": 0,
        "model": {"name": "minilm", "max_length": 64},
        "adapter": {"kind": "lora", "r": 8, "alpha": 16, "target_modules": ["query", "value"]},
        "data": {"path": str(DATA / "sst2_train.jsonl"), "format": "classification",
                 "validation_path": str(DATA / "sst2_validation.jsonl"),
                 "text_field": "sentence", "label_field": "label",
                 "label_names": ["negative", "positive"], "max_rows": args.rows,
                 "max_validation_rows": 400, "partition": {"kind": "iid"}},
        "federation": {"num_clients": 20, "clients_per_round": 20, "rounds": args.rounds},
        "algorithm": {"name": "fedavg", "aggregator": aggregator,
                      "robust": {"byzantine_fraction": 0.2, "root_rows": 100},
                      "local": {"steps": args.steps, "batch_size": args.batch,
                                "lr": args.lr}},
        "runtime": {"precision": "bf16"},
        "eval": {"every": args.rounds, "per_client": False},
        "tracking": {"output_dir": out, "console": False, "keep_checkpoints": 1},
        "robustness": robustness,
    }


def cell(aggregator: str, attack: str, args: argparse.Namespace, out: str) -> dict:
    from fedfm import api
    from fedfm.config import config_from_dict

    start = time.perf_counter()
    result = api.run(config_from_dict(config(aggregator, attack, args, out)), console=False)
    final = result.metrics[-1]["eval"]["global"]
    found = {"bench": "robustness", "aggregator": aggregator, "attack": attack,
             "clean_accuracy": round(final["accuracy"], 4),
             "attack_success_rate": (round(final["attack_success_rate"], 4)
                                     if "attack_success_rate" in final else None),
             "wall_s": round(time.perf_counter() - start, 1)}
    detections = [r["attack"] for r in result.metrics
                  if "detection_precision" in r.get("attack", {})]
    if detections:
        found["detection_precision"] = round(
            sum(d["detection_precision"] for d in detections) / len(detections), 3)
        found["detection_recall"] = round(
            sum(d["detection_recall"] for d in detections) / len(detections), 3)
    return found


def table(cells: list[dict], aggregators: list[str], attacks: list[str]) -> str:
    """Markdown: clean accuracy per cell, with the backdoor's ASR after a slash."""
    by = {(c["aggregator"], c["attack"]): c for c in cells}
    lines = ["| aggregator | " + " | ".join(attacks) + " |",
             "|---|" + "---:|" * len(attacks)]
    for aggregator in aggregators:
        row = []
        for attack in attacks:
            found = by.get((aggregator, attack))
            if found is None:
                row.append("-")
                continue
            text = f"{found['clean_accuracy']:.3f}"
            if found.get("attack_success_rate") is not None:
                text += f" / {found['attack_success_rate']:.2f}"
            row.append(text)
        lines.append(f"| {aggregator} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--aggregators", default=",".join(AGGREGATORS))
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    args = parser.parse_args()
    aggregators = args.aggregators.split(",")
    attacks = args.attacks.split(",")
    cells = []
    with tempfile.TemporaryDirectory() as out:
        for attack in attacks:  # attack-major: a partial run still compares every aggregator
            for aggregator in aggregators:
                try:
                    found = cell(aggregator, attack, args, out)
                except Exception as exc:  # a rule's precondition: record it, keep the table
                    found = {"bench": "robustness", "aggregator": aggregator,
                             "attack": attack, "error": f"{type(exc).__name__}: {exc}"}
                print(json.dumps(found), flush=True)
                if "error" not in found:
                    cells.append(found)
    print(table(cells, aggregators, attacks))


if __name__ == "__main__":
    main()
