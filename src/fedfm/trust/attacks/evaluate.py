"""``fedfm attack privacy RUN_DIR``: membership inference on a finished run's global model and on
client models, written to ``RUN_DIR/attacks/privacy.json``."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np

from fedfm.core import state as state_ops
from fedfm.core.client_store import MemoryClientStore
from fedfm.core.update import Broadcast
from fedfm.tracking.run_record import RunRecordError, global_state_at, read_run
from fedfm.trust.attacks.membership import membership_inference, per_example_losses


def _sample(items: list[dict[str, Any]], count: int, seed: int) -> list[dict[str, Any]]:
    if len(items) <= count:
        return list(items)
    return random.Random(seed).sample(items, count)


def privacy_attacks(run_dir: str | Path, *, max_examples: int = 400, clients: int = 3,
                    round_index: int | None = None) -> dict[str, Any]:
    """Loss-threshold and reference-calibrated membership inference on the global model after
    ``round_index`` (default: the last kept) and on ``clients`` client models."""
    from fedfm import api
    from fedfm.runtime.local import LocalRuntime

    record = read_run(run_dir)
    state, attacked_round = global_state_at(record, round_index)
    config = record.config
    api.seed_everything(config.seed)
    algorithm = api.build_algorithm(config)
    workload = api.build_workload(config, algorithm)
    reference = workload.get_state()  # the run's starting model: never saw client data
    data = workload.data
    if not data.global_validation:
        raise RunRecordError("membership inference needs non-members: this run has no global "
                             "validation set (set data.validation_path or validation_fraction)")
    collate, task = workload.collate_fn(), workload.bundle.task
    pooled = [ex for client in data.clients for ex in client.train]
    members = _sample(pooled, max_examples, config.seed)
    nonmembers = _sample(data.global_validation, max_examples, config.seed + 1)

    def losses(weights: Any, examples: list[dict[str, Any]]) -> np.ndarray:
        workload.set_state(weights)
        return per_example_losses(workload.model, examples, collate, task)

    report: dict[str, Any] = {
        "run_dir": str(record.path), "round": attacked_round,
        "reference_model": "the run's starting model (base + initial adapter)",
        "nonmembers": "global validation set",
        "global": membership_inference(losses(state, members), losses(state, nonmembers),
                                       losses(reference, members),
                                       losses(reference, nonmembers)),
        "clients": {},
    }
    runtime = LocalRuntime(workload, MemoryClientStore())
    chosen = sorted(range(len(data.clients)), key=lambda c: -len(data.clients[c].train))
    for client_id in chosen[:clients]:
        own = _sample(data.clients[client_id].train, max_examples, config.seed + 2)
        outside = nonmembers[:len(own)] if len(own) < len(nonmembers) else nonmembers
        workload.set_state(state)
        broadcast = Broadcast(global_state=state, extras=algorithm.server.broadcast_extras(state),
                              round=attacked_round + 1)
        result = workload.client.run(runtime.client_context(client_id, attacked_round + 1),
                                     broadcast)
        # what the server sees of this client: the global model plus its (clipped, noised
        # under DP) update
        local = state_ops.add(state, result.update.payload)
        report["clients"][str(client_id)] = membership_inference(
            losses(local, own), losses(local, outside), losses(reference, own),
            losses(reference, outside))
    out = record.path / "attacks"
    out.mkdir(exist_ok=True)
    (out / "privacy.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report
