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
        ctx = runtime.client_context(client_id, attacked_round + 1)
        seen: list[dict[str, Any]] = []
        ctx.collate = _recording(ctx.collate, seen)
        result = workload.client.run(ctx, broadcast)
        # what the server sees of this client: the global model plus its (clipped, noised
        # under DP) update
        local = state_ops.add(state, result.update.payload)
        found = membership_inference(losses(local, own), losses(local, outside),
                                     losses(reference, own), losses(reference, outside))
        found["token_recovery"] = recover_tokens(workload.model, result.update.payload, seen)
        report["clients"][str(client_id)] = found
    if config.eval.canaries is not None:
        report["canaries"] = _canary_exposure(workload, config, state, reference)
    out = record.path / "attacks"
    out.mkdir(exist_ok=True)
    (out / "privacy.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def _recording(collate: Any, seen: list[dict[str, Any]]) -> Any:
    """``collate`` that also keeps every batch it made (the attack's ground truth)."""
    def wrapped(rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(rows)
        seen.append(batch)
        return batch
    return wrapped


def recover_tokens(model: Any, payload: dict[str, Any], batches: list[dict[str, Any]]
                   ) -> dict[str, Any]:
    """Which tokens a client's batches held, read off its update of the input embedding: a row
    moves only if its token was looked up (Zhu et al., "Deep Leakage from Gradients", NeurIPS
    2019, note the same for embedding gradients). Precision and recall against the tokens the
    client really fed (attention-masked positions only); in a causal LM a token seen only as a
    row's last token predicts nothing, gets no gradient, and is the one way to stay hidden."""
    embedding = model.get_input_embeddings().weight
    key = next((name for name, param in model.named_parameters() if param is embedding), None)
    if key is None or key not in payload:
        return {"applicable": False,
                "why": "the update carries no input-embedding matrix (e.g. LoRA on attention "
                       "only); nothing to read token ids from"}
    moved = payload[key].abs().sum(dim=1) > 0
    recovered = set(int(i) for i in moved.nonzero().flatten())
    truth: set[int] = set()
    for batch in batches:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        kept = ids[mask.bool()] if mask is not None else ids.flatten()
        truth.update(int(i) for i in kept)
    hits = len(recovered & truth)
    return {"applicable": True, "recovered": len(recovered), "true_tokens": len(truth),
            "precision": hits / max(len(recovered), 1), "recall": hits / max(len(truth), 1)}


def _canary_exposure(workload: Any, config: Any, state: Any, reference: Any
                     ) -> dict[str, Any]:
    from fedfm.trust.attacks.canaries import digit_ids, exposure, make_canaries

    cfg = config.eval.canaries
    tokenizer = workload.bundle.tokenizer
    canaries = make_canaries(cfg, tokenizer, config.seed)
    digits = digit_ids(tokenizer)
    found = {}
    for name, weights in (("global", state), ("reference", reference)):
        workload.set_state(weights)
        found[name] = exposure(workload.model, canaries, cfg, digits, config.seed)
    found["client"] = cfg.client
    return found
