"""Privacy bench: utility and membership-inference risk of MiniLM + LoRA on SST-2 (10 clients)
at epsilon in {inf, 8, 2}, and secure aggregation's overhead, in one invocation.

Each setting is one fedfm run (the shipped SST-2 subset, ``--rows`` training sentences split
over 10 clients with Dirichlet(1.0) label skew, all 10 clients per round, ``--rounds`` rounds of
8 local steps of batch 16). Membership inference asks whether an *example* was trained on, so the
epsilon settings use sample-level DP-SGD on the clients (per-example clipping 1.0), the noise
multiplier calibrated so that the client with the fewest examples, taking every step of the run,
stays within epsilon at delta 1e-5 (dp-accounting). One more setting shows client-level DP-FedAvg
at epsilon 8, which with only 10 clients must add noise far above the signal, and one repeats it
with SecAgg+ and distributed noise to time secure aggregation against plain aggregation. After
each run, ``fedfm attack privacy`` measures membership inference on the global model. One JSON
line per setting.

    python bench/privacy.py [--rounds 8] [--rows 2000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"


def config(rounds: int, rows: int, out: str, privacy: dict) -> dict:
    return {
        "name": "bench-privacy", "seed": 0,
        "model": {"name": "minilm", "max_length": 64},
        "adapter": {"kind": "lora", "r": 8, "alpha": 16, "target_modules": ["query", "value"]},
        "data": {"path": str(DATA / "sst2_train.jsonl"), "format": "classification",
                 "validation_path": str(DATA / "sst2_validation.jsonl"),
                 "text_field": "sentence", "label_field": "label",
                 "label_names": ["negative", "positive"], "max_rows": rows,
                 "max_validation_rows": 400,
                 "partition": {"kind": "dirichlet", "alpha": 1.0, "min_size": 32}},
        "federation": {"num_clients": 10, "clients_per_round": 10, "rounds": rounds},
        "algorithm": {"name": "fedavg", "weighting": "uniform",
                      "local": {"steps": 8, "batch_size": 16, "lr": 5e-3}},
        "eval": {"every": rounds, "per_client": False},
        "tracking": {"output_dir": out, "console": False},
        "privacy": privacy,
    }


def dp_sgd(target: float, rounds: int, rows: int) -> dict:
    from fedfm.config import config_from_dict
    from fedfm.data import describe_federated_data
    from fedfm.trust.privacy.accountant import SamplingModel, calibrate_noise_multiplier

    plan = config_from_dict(config(rounds, rows, "unused", {}))
    stats = describe_federated_data(plan.data, num_clients=10, task="classification", seed=0)
    smallest = min(c.train_size for c in stats.clients)
    noise = calibrate_noise_multiplier(SamplingModel("poisson", smallest, 16), target,
                                       rounds * 8, 1e-5)
    return {"dp_sgd": {"noise_multiplier": noise, "max_grad_norm": 1.0, "delta": 1e-5}}


def dp(target: float, secure: bool = False) -> dict:
    found: dict = {"client_dp": {"clip_norm": 0.5, "target_epsilon": target, "delta": 1e-5,
                                 "sampling": "fixed",
                                 "noise": "distributed" if secure else "central"}}
    if secure:
        found["secure_aggregation"] = {"degree": 9, "threshold": 6, "bound": 10.0}
    return found


def main() -> None:
    from fedfm import api
    from fedfm.config import config_from_dict
    from fedfm.trust.attacks.evaluate import privacy_attacks

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()
    settings = [("inf", {}), ("8 (DP-SGD)", dp_sgd(8.0, args.rounds, args.rows)),
                ("2 (DP-SGD)", dp_sgd(2.0, args.rounds, args.rows)),
                ("8 (client-level DP-FedAvg)", dp(8.0)),
                ("8 (client-level, distributed + SecAgg+)", dp(8.0, True))]
    with tempfile.TemporaryDirectory() as out:
        for label, privacy in settings:
            result = api.run(config_from_dict(config(args.rounds, args.rows, out, privacy)),
                             console=False)
            attack = privacy_attacks(result.run_dir, max_examples=400, clients=0)
            aggregate_s = sum(r["wall_time"]["aggregate"] for r in result.metrics)
            summary_privacy = result.summary["privacy"] or {}
            spent = summary_privacy.get("client_dp") or {}
            sample_level = summary_privacy.get("dp_sgd") or {}
            secure = [r["secure_aggregation"] for r in result.metrics
                      if "secure_aggregation" in r]
            print(json.dumps({
                "bench": "privacy", "epsilon_target": label,
                "epsilon_spent": spent.get("epsilon", sample_level.get("max_client_epsilon")),
                "noise_multiplier": spent.get("noise_multiplier", (sample_level.get(
                    "config") or {}).get("noise_multiplier")),
                "val_accuracy": result.summary["final_metrics"].get("val_accuracy"),
                "mia_auc_loss": attack["global"]["loss_threshold"]["auc"],
                "mia_auc_calibrated": attack["global"]["reference_calibrated"]["auc"],
                "mia_auc_start_calibrated": attack["global"]["start_calibrated"]["auc"],
                "mia_tpr_at_1pct_fpr": attack["global"]["reference_calibrated"][
                    "tpr_at_1pct_fpr"],
                "aggregation_s_per_round": round(aggregate_s / args.rounds, 4),
                "secagg_bytes_up_per_client": (secure[-1]["bytes_up_per_client"]
                                               if secure else None),
                # what each client really sent (secure aggregation: the protocol's bytes)
                "bytes_up_per_client": result.metrics[-1]["bytes_up"] / 10,
                "wall_s": round(result.summary["wall_time"], 1)}), flush=True)


if __name__ == "__main__":
    main()
