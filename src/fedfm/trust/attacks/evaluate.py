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
from fedfm.trust.attacks.membership import (
    attack_report,
    membership_inference,
    per_example_losses,
)
from fedfm.trust.attacks.token_recovery import recover_tokens


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
    start = workload.get_state()  # the run's starting model: never saw client data
    data = workload.data
    if len(data.global_validation) < 4:
        raise RunRecordError("membership inference needs non-members: this run's global "
                             "validation set has fewer than 4 examples (set "
                             "data.validation_path or validation_fraction)")
    collate, task = workload.collate_fn(), workload.bundle.task
    pooled = [ex for client in data.clients for ex in client.train]
    members = _sample(pooled, max_examples, config.seed)
    # half the never-trained-on rows train the attacker's reference model ("population data"),
    # the other half are the non-members
    shuffled = _sample(data.global_validation, len(data.global_validation), config.seed + 1)
    population, held_out = shuffled[: len(shuffled) // 2], shuffled[len(shuffled) // 2:]
    nonmembers = held_out[:max_examples]
    reference = train_reference(workload, config, population, start)

    def losses(weights: Any, examples: list[dict[str, Any]]) -> np.ndarray:
        workload.set_state(weights)
        return per_example_losses(workload.model, examples, collate, task)

    def attacks(weights: Any, inside: list[dict[str, Any]], outside: list[dict[str, Any]]
                ) -> dict[str, Any]:
        target_in, target_out = losses(weights, inside), losses(weights, outside)
        found = membership_inference(target_in, target_out, losses(reference, inside),
                                     losses(reference, outside))
        found["start_calibrated"] = attack_report(losses(start, inside) - target_in,
                                                  losses(start, outside) - target_out)
        return found

    report: dict[str, Any] = {
        "run_dir": str(record.path), "round": attacked_round,
        "reference_model": (f"a shadow federation of the run's algorithm and privacy mechanisms "
                            f"over {len(population)} never-trained-on rows (population data)"),
        "nonmembers": f"{len(nonmembers)} rows of the global validation set",
        "global": attacks(state, members, nonmembers),
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
        found = attacks(local, own, outside)
        found["token_recovery"] = recover_tokens(workload.model, result.update.payload, seen,
                                                  max_positions=config.model.max_length)
        report["clients"][str(client_id)] = found
    if config.eval.canaries is not None:
        report["canaries"] = _canary_exposure(workload, config, state, start)
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


def train_reference(workload: Any, config: Any, population: list[dict[str, Any]],
                    start: Any) -> Any:
    """The attacker's reference model (Watson et al., ICLR 2022), trained the way the target
    was: a shadow federation (Shokri et al., S&P 2017) of ``clients_per_round`` clients that
    split the population data (rows the federation never trained on), run from the starting
    model for the run's rounds with the run's own algorithm and privacy mechanisms (DP-SGD, the
    clipping and noise of DP-FedAvg), so that the reference is as far from the start as the
    target is."""
    from fedfm import api

    algorithm = api.build_algorithm(config)  # a fresh server: its own accountant, clip, state
    shadows = max(1, min(config.federation.clients_per_round, len(population)))
    shards = [population[i::shadows] for i in range(shadows)]
    client_states: dict[int, Any] = {}
    global_state = start
    for round_index in range(1, config.federation.rounds + 1):
        broadcast = Broadcast(global_state=global_state, round=round_index,
                              extras=algorithm.server.broadcast_extras(global_state))
        updates = []
        for shadow, shard in enumerate(shards):
            workload.set_state(global_state)
            context = workload.client_context(
                shard, client_id=shadow, round=round_index,
                seed=config.seed + 7919 * round_index + 17 * shadow + 1,
                client_state=client_states.get(shadow))
            result = algorithm.client.run(context, broadcast)
            client_states[shadow] = result.client_state
            updates.append(result.update)
        global_state = algorithm.server.aggregate(global_state, updates, round_index)
    return global_state
