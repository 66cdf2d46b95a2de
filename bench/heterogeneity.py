"""Heterogeneity bench: every method against data skew, next to centralized training of the
same model for the same number of steps, on four partitions, in one invocation.

Partitions (the real MiniLM encoder, LoRA r=8 on query/value plus the classifier head):

- ``sst2_dir0.1`` / ``sst2_dir0.3``: the shipped SST-2 subset (2,000 sentences) over 10
  clients with a Dirichlet(0.1) / (0.3) label skew;
- ``sst2_lq1``: label-quantity skew, every client holds exactly one class;
- ``nusax_lang``: NusaX-Senti, one client per language (12; feature skew).

Methods: ``fedavg``, ``fedprox`` (mu 0.01), ``scaffold`` (local SGD), ``fedadam`` (FedAvg with
the Adam server optimizer), each ``algorithm.skew`` method alone on FedAvg (``fedbabu``,
``fedlc``, ``fedrs``, ``moon``, and ``fednova`` with ``--nova-epochs`` local epochs, so that
step counts differ by client, next to its control ``fedavg_epochs``), the ``recipe``
(``recipes/label_skew.yaml``'s algorithm section and model settings, read from the file), and
``centralized``: one client holding every training row, trained for ``rounds`` rounds of
``clients x local_steps`` steps, so it sees the same number of examples as the federation
(at its own ``--central-lr``: the federated rate diverges over that many sequential steps);
``centralized_recipe`` is the same with the recipe's model settings (its pooling), so the
recipe is also measured against centralized training of exactly its own model.
Every run evaluates every round; each line gives the global validation accuracy by round and
at the end, the mean and worst-10% accuracy of the global model on the clients' own
validation splits, and the points to FedAvg and to centralized on the same partition. Each
run is its own subprocess.

    python bench/heterogeneity.py [--rounds 10] [--only fedavg,recipe] [--partitions sst2_dir0.3]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
RECIPE = ROOT / "recipes" / "label_skew.yaml"
sys.path.insert(0, str(ROOT / "bench"))

from communication import measured_run  # noqa: E402

PARTITIONS = ("sst2_dir0.1", "sst2_dir0.3", "sst2_lq1", "nusax_lang")
METHODS = ("fedavg", "fedprox", "scaffold", "fedadam", "fedbabu", "fedlc", "fedrs", "fednova",
           "fedavg_epochs", "moon", "recipe", "centralized", "centralized_recipe")


def sst2_data(partition: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    return {"path": str(DATA / "sst2_train.jsonl"), "max_rows": args.rows,
            "validation_path": str(DATA / "sst2_validation.jsonl"),
            "max_validation_rows": 400, "format": "classification", "text_field": "sentence",
            "label_field": "label", "label_names": ["negative", "positive"],
            "client_validation_fraction": 0.2, "partition": partition}


def partition_config(name: str, args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    """(data section, number of clients) of a partition."""
    if name == "nusax_lang":
        data = {"path": str(DATA / "nusax_train.jsonl"),
                "validation_path": str(DATA / "nusax_validation.jsonl"),
                "format": "classification", "text_field": "text", "label_field": "label",
                "label_names": ["negative", "neutral", "positive"],
                "client_validation_fraction": 0.2,
                "partition": {"kind": "natural", "by": "language"}}
        return data, 12
    if name == "sst2_lq1":
        return sst2_data({"kind": "label_quantity", "classes_per_client": 1}, args), 10
    alpha = float(name.removeprefix("sst2_dir"))
    return sst2_data({"kind": "dirichlet", "alpha": alpha, "by": "label", "min_size": 20},
                     args), 10


def base_config(partition: str, args: argparse.Namespace) -> dict[str, Any]:
    data, clients = partition_config(partition, args)
    return {
        "name": f"bench-heterogeneity-{partition}", "seed": args.seed,
        "model": {"name": "minilm", "max_length": 64},
        "adapter": {"kind": "lora", "r": 8, "alpha": 16, "target_modules": ["query", "value"],
                    "train_head": True},
        "data": data,
        "federation": {"num_clients": clients, "clients_per_round": clients,
                       "rounds": args.rounds},
        "algorithm": {"name": "fedavg",
                      "local": {"steps": args.local_steps, "batch_size": 16, "lr": args.lr,
                                "max_grad_norm": 1.0}},
        "eval": {"every": 1, "batch_size": 64},
        "tracking": {"output_dir": "runs", "console": False},
        "runtime": {"attention": "eager"},
    }


def recipe_sections() -> tuple[dict[str, Any], dict[str, Any]]:
    """(model settings, algorithm section) of ``recipes/label_skew.yaml``: the model's name
    and length stay the bench's, its other settings (pooling) are the recipe's."""
    recipe = yaml.safe_load(RECIPE.read_text())
    model = {k: v for k, v in recipe["model"].items() if k not in ("name", "max_length")}
    return model, recipe["algorithm"]


def method_config(partition: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    raw = base_config(partition, args)
    algorithm = raw["algorithm"]
    local = algorithm["local"]
    if method == "fedprox":
        algorithm.update(name="fedprox", mu=0.01)
    elif method == "scaffold":
        algorithm["name"] = "scaffold"
        local.update(optimizer="sgd", lr=args.sgd_lr)
    elif method == "fedadam":
        algorithm["server_optimizer"] = {"name": "adam", "lr": args.server_lr}
    elif method in ("fedbabu", "fedlc", "fedrs", "fednova", "moon"):
        algorithm["skew"] = [{"name": method}]
        if method == "fednova":  # FedNova matters when clients take different step counts
            local.update(steps=None, epochs=args.nova_epochs)
    elif method == "fedavg_epochs":  # FedNova's control: the same unequal steps, plain mean
        local.update(steps=None, epochs=args.nova_epochs)
    elif method == "recipe":
        model, raw["algorithm"] = recipe_sections()
        raw["model"].update(model)
    elif method in ("centralized", "centralized_recipe"):
        if method == "centralized_recipe":  # the recipe's model, trained centrally
            raw["model"].update(recipe_sections()[0])
        clients = raw["federation"]["num_clients"]
        raw["federation"] = {"num_clients": 1, "clients_per_round": 1, "rounds": args.rounds}
        raw["data"]["partition"] = {"kind": "iid"}
        local.update(steps=args.local_steps * clients, lr=args.central_lr)
        raw["eval"]["per_client"] = False
    elif method != "fedavg":
        raise ValueError(method)
    return raw


def run_one(partition: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    found, result = measured_run(method_config(partition, method, args), "accuracy")
    curve = [round(r["eval"]["global"]["accuracy"], 4) for r in result.metrics if "eval" in r]
    last_eval = next((r["eval"] for r in reversed(result.metrics) if "eval" in r), {})
    spread = last_eval.get("fairness", {})
    return {"val_accuracy": found["val_accuracy"], "accuracy_by_round": curve,
            "best_accuracy": max(curve) if curve else None,
            "clients_accuracy_mean": spread.get("accuracy_mean"),
            "clients_accuracy_worst10": spread.get("accuracy_worst10"),
            "skew": result.summary.get("data", {}).get("skew"),
            "wall_s_per_round": round(found["wall_s_per_round"], 2)}


_SPAWNED: dict[str, dict[str, Any]] = {}


def spawn(partition: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    """The run's result, measured in a subprocess; a run whose config equals one already
    measured in this invocation but for its name (centralized on the SST-2 partitions: one
    client holding all rows) is not measured again."""
    raw = method_config(partition, method, args)
    key = json.dumps({k: v for k, v in raw.items() if k != "name"}, sort_keys=True)
    if key not in _SPAWNED:
        _SPAWNED[key] = _measure(partition, method, args)
    return _SPAWNED[key]


def _measure(partition: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", f"{partition}:{method}",
               "--rounds", str(args.rounds), "--rows", str(args.rows),
               "--local-steps", str(args.local_steps), "--seed", str(args.seed),
               "--lr", str(args.lr), "--central-lr", str(args.central_lr),
               "--sgd-lr", str(args.sgd_lr), "--server-lr", str(args.server_lr),
               "--nova-epochs", str(args.nova_epochs)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def points(found: dict[str, Any], reference: dict[str, Any] | None, name: str
           ) -> dict[str, Any]:
    if reference is None or "error" in found or "error" in reference:
        return {}
    out = {f"points_vs_{name}": round(100 * (found["val_accuracy"]
                                             - reference["val_accuracy"]), 2)}
    mean, ref_mean = found.get("clients_accuracy_mean"), reference.get("clients_accuracy_mean")
    if mean is not None and ref_mean is not None:
        out[f"clients_mean_points_vs_{name}"] = round(100 * (mean - ref_mean), 2)
    return out


def reused_baselines(path: Path | None) -> dict[tuple[str, str], dict[str, Any]]:
    """(partition, method) -> the measured fields of an earlier output's baseline lines."""
    if path is None:
        return {}
    measured = ("val_accuracy", "accuracy_by_round", "best_accuracy", "clients_accuracy_mean",
                "clients_accuracy_worst10", "skew", "wall_s_per_round")
    found = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get("method") in ("centralized", "fedavg") and "error" not in row:
            found[(row["partition"], row["method"])] = {k: row.get(k) for k in measured}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=5e-3,
                        help="local AdamW rate of the federated runs")
    parser.add_argument("--central-lr", type=float, default=1e-3,
                        help="centralized training's AdamW rate (5e-3 diverges over 1,000 steps)")
    parser.add_argument("--sgd-lr", type=float, default=0.05, help="SCAFFOLD's local SGD rate")
    parser.add_argument("--server-lr", type=float, default=0.01, help="FedAdam's server rate")
    parser.add_argument("--nova-epochs", type=float, default=1.0,
                        help="FedNova's local epochs (steps then differ by client size)")
    parser.add_argument("--only", default=None, help="comma-separated method names")
    parser.add_argument("--partitions", default=",".join(PARTITIONS))
    parser.add_argument("--baselines", default=None, type=Path,
                        help="reuse the centralized and fedavg lines of an earlier output")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        partition, method = args.child.split(":")
        print(json.dumps(run_one(partition, method, args)))
        return
    chosen = args.only.split(",") if args.only else list(METHODS)
    partitions = args.partitions.split(",")
    unknown = [m for m in chosen if m not in METHODS] + [p for p in partitions
                                                         if p not in PARTITIONS]
    if unknown:
        parser.error(f"unknown {unknown}; methods: {', '.join(METHODS)}; partitions: "
                     f"{', '.join(PARTITIONS)}")
    earlier = reused_baselines(args.baselines)
    for partition in partitions:
        central = earlier.get((partition, "centralized")) or spawn(partition, "centralized",
                                                                   args)
        baseline = earlier.get((partition, "fedavg")) or spawn(partition, "fedavg", args)
        for method in chosen:
            found = {"centralized": central, "fedavg": baseline}.get(method) or spawn(
                partition, method, args)
            own_central = (spawn(partition, "centralized_recipe", args)
                           if method in ("recipe", "centralized_recipe") else None)
            print(json.dumps({"bench": "heterogeneity", "partition": partition,
                              "method": method, "rounds": args.rounds, **found,
                              **points(found, baseline, "fedavg"),
                              **points(found, central, "centralized"),
                              **points(found, own_central, "centralized_recipe"),
                              "machine": platform.machine(),
                              "python": platform.python_version()}), flush=True)


if __name__ == "__main__":
    main()
