"""Personalization against its math (issue 10, item 1): FedPer uploads the body and keeps the
head (the global head never moves); FedRep's head phase moves only the head and its body phase
only the body; Ditto's global part is FedAvg's, with lam = 0 its personal model is plain local
training and with a large lam it stays at the global model; dual LoRA's local adapter never
leaves the client yet changes its model; personal states survive rounds and resume exactly;
on a label-skewed federation the personal models beat the global one; ``eval.finetune_steps``
personalizes any algorithm."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import fedfm
from fedfm.adaptability.personalization import check_personalization
from fedfm.adaptability.personalization.ditto import DittoClient, personal_seed, proximal_hook
from fedfm.adaptability.personalization.dual_lora import PERSONAL
from fedfm.algorithms.fedavg import DeltaClient
from fedfm.algorithms.local_train import train_locally
from fedfm.api import build_algorithm, build_workload, check_components, seed_everything
from fedfm.catalogue import entries
from fedfm.config import ConfigError, config_from_dict
from fedfm.core import state as S
from fedfm.core.client_store import MemoryClientStore
from fedfm.core.update import Broadcast
from fedfm.runtime.local import LocalRuntime
from tests.conftest import cls_config_dict, deep_update

HEAD = ".classifier."
SMALL = {"data": {"max_rows": 96, "max_validation_rows": 16},
         "runtime": {"num_threads": 1}}
SKEWED = {"max_rows": 160, "max_validation_rows": 16,
          "partition": {"kind": "dirichlet", "alpha": 0.1, "min_size": 10}}


def raw_config(tmp_path: Path, name: str, *, local: dict[str, Any] | None = None,
               **changes: Any) -> dict[str, Any]:
    """The conftest classification run (tiny-bert, SST-2) made smaller, with ``name`` and
    ``local`` (``algorithm.local`` changes) merged into ``changes``."""
    raw = cls_config_dict(tmp_path, **SMALL, algorithm={"name": name, "local": local or {}})
    return deep_update(raw, changes)


def build(tmp_path: Path, name: str, **changes: Any):
    config = config_from_dict(raw_config(tmp_path, name, **changes))
    check_components(config)
    seed_everything(config.seed)
    algo = build_algorithm(config)
    return config, algo, build_workload(config, algo)


def one_round(algo, workload, global_state, clients, store=None):
    """Run ``clients`` as the loop does: (outcomes, decoded updates, runtime)."""
    runtime = LocalRuntime(workload, store or MemoryClientStore())
    broadcast = Broadcast(global_state, algo.server.broadcast_extras(global_state), 1)
    outcomes = list(runtime.run_clients(clients, broadcast, 1))
    decode = getattr(algo.server, "decode_update", None)
    decoded = [decode(o.update, global_state) if decode else o.update for o in outcomes]
    return outcomes, decoded, runtime


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


# --------------------------------------------------------------------------- FedPer / FedRep


def test_fedper_uploads_the_body_keeps_the_head_and_the_global_head_never_moves(
        tmp_path: Path) -> None:
    _, algo, workload = build(tmp_path, "fedper")
    start = workload.get_state()
    heads = {k for k in start if HEAD in k}
    assert heads and len(heads) < len(start)
    outcomes, decoded, _ = one_round(algo, workload, start, [0, 1])
    for outcome, update in zip(outcomes, decoded, strict=True):
        assert set(outcome.update.payload) == set(start) - heads  # exactly the body
        kept = outcome.client_state["personal_head"]
        assert set(kept) == heads and changed({k: start[k] for k in heads}, kept) == heads
        assert all(torch.count_nonzero(update.payload[k]) == 0 for k in heads)
    new_global = algo.server.aggregate(start, decoded, 1)
    assert changed(start, new_global) == set(start) - heads  # body averaged, head untouched
    own = algo.client.personal_state(new_global, outcomes[0].client_state)
    assert changed(new_global, own) == heads


def test_fedrep_trains_the_head_alone_then_the_body_alone(tmp_path: Path) -> None:
    _, algo, workload = build(tmp_path, "fedrep", algorithm={"personal": {"head_steps": 3}})
    start = workload.get_state()
    heads = {k for k in start if HEAD in k}
    after_head_phase: dict[str, torch.Tensor] = {}
    inner_train = algo.client.inner.train

    def record_then_train(ctx, broadcast):
        after_head_phase.update({n: p.detach().clone() for n, p in ctx.model.named_parameters()
                                 if n in start})
        return inner_train(ctx, broadcast)

    algo.client.inner.train = record_then_train
    outcomes, _, _ = one_round(algo, workload, start, [0])
    final = workload.get_state()
    assert changed(start, after_head_phase) == heads  # head phase: the head only
    assert changed(after_head_phase, final) == set(start) - heads  # body phase: the body only
    update = outcomes[0].update
    assert set(update.payload) == set(start) - heads
    assert S.equal(outcomes[0].client_state["personal_head"],
                   {k: after_head_phase[k] for k in start if k in heads})
    assert update.metrics["head_steps"] == 3.0 and update.metrics["steps"] == 2.0


@pytest.mark.parametrize("name", ["fedper", "fedrep"])
def test_personal_heads_beat_the_global_model_on_label_skew(tmp_path: Path, name: str) -> None:
    raw = raw_config(tmp_path, name, data=SKEWED, local={"steps": 3},
                     federation={"num_clients": 4, "clients_per_round": 4, "rounds": 2},
                     eval={"every": 2})
    result = fedfm.run(config_from_dict(raw))
    final = result.summary["final_metrics"]
    assert final["personal_accuracy_mean"] > final["clients_accuracy_mean"] + 0.2
    record = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    personalized = record["eval"]["personalized"]
    assert set(personalized) == set(record["eval"]["per_client"]) == {"0", "1", "2", "3"}
    assert "accuracy_mean" in record["eval"]["personalized_fairness"]
    _, _, workload = build(tmp_path / "init", name, data=SKEWED)
    start = workload.get_state()
    assert all(torch.equal(result.final_state[k], start[k]) for k in start if HEAD in k)


def test_a_model_without_a_head_is_refused_before_any_round(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no tensor of the communicated State"):
        build(tmp_path, "fedper", algorithm={"personal": {"head": ["no_such_module"]}})
    with pytest.raises(ConfigError, match="nothing would be shared"):
        check_personalization(config_from_dict(raw_config(tmp_path, "fedrep",
                                                          adapter={"kind": "head"})))


# --------------------------------------------------------------------------- Ditto


def test_ditto_proximal_hook_adds_lam_times_the_distance() -> None:
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    param.grad = torch.tensor([0.5, 0.5, 0.5])
    anchor = {"w": torch.tensor([0.0, 0.0, 1.0])}
    hook = proximal_hook(anchor, 2.0, torch.device("cpu"))
    assert hook is not None
    hook([("w", param)])
    assert torch.equal(param.grad, torch.tensor([2.5, -3.5, 4.5]))
    assert proximal_hook(anchor, 0.0, torch.device("cpu")) is None


def test_ditto_global_part_is_fedavg_and_lam_zero_is_plain_local_training(
        tmp_path: Path) -> None:
    config, algo, workload = build(tmp_path, "ditto",
                                   algorithm={"personal": {"lam": 0.0, "personal_steps": 3}})
    start = workload.get_state()
    outcomes, _, runtime = one_round(algo, workload, start, [0])
    personal = outcomes[0].client_state["ditto_personal"]
    ctx = runtime.client_context(0, 1)
    workload.set_state(start)
    fedavg = DeltaClient(config.algorithm.local).run(ctx, Broadcast(start, {}, 1))
    assert S.equal(outcomes[0].update.payload, fedavg.update.payload)
    workload.set_state(start)
    steps3 = config.algorithm.local.model_copy(update={"steps": 3})
    train_locally(dataclasses.replace(ctx, seed=personal_seed(ctx)), steps3)
    assert S.equal(personal, workload.get_state())  # exactly independent local training
    assert S.equal(algo.client.personal_state(start, outcomes[0].client_state), personal)
    assert S.equal(algo.client.personal_state(start, None), start)  # before it trains


def test_ditto_with_a_large_lam_keeps_the_personal_model_at_the_global_one(
        tmp_path: Path) -> None:
    lr = 0.05
    config, algo, workload = build(tmp_path, "ditto",
                                   local={"optimizer": "sgd", "lr": lr, "steps": 1})
    start = workload.get_state()
    personal = config.algorithm.local.model_copy(update={"steps": 16})
    distances = []
    for lam in (0.0, 5.0, 1.0 / lr):  # lr * lam = 1: each step pulls v all the way back to w
        algo.client = workload.client = DittoClient(DeltaClient(config.algorithm.local),
                                                    personal, lam)
        outcomes, _, _ = one_round(algo, workload, start, [0])
        distances.append(S.global_norm(S.sub(outcomes[0].client_state["ditto_personal"],
                                             start)))
    assert distances[0] > distances[1] > distances[2] > 0.0
    assert distances[2] < 0.3 * distances[0]  # measured: about 0.19


# --------------------------------------------------------------------------- dual LoRA


def test_dual_lora_keeps_the_local_adapter_home_and_it_changes_the_model(
        tmp_path: Path) -> None:
    _, algo, workload = build(tmp_path, "dual_lora", algorithm={"personal": {"personal_r": 2}})
    start = workload.get_state()
    local = {k for k in start if f".{PERSONAL}." in k}
    shared = set(start) - local
    assert local and all(start[k].shape[0] == 2 for k in local if ".lora_A." in k)
    assert any(HEAD in k for k in shared) and any(".lora_B.default." in k for k in shared)
    outcomes, decoded, _ = one_round(algo, workload, start, [0, 1])
    for outcome, update in zip(outcomes, decoded, strict=True):
        assert set(outcome.update.payload) == shared  # the local adapter never leaves
        kept = outcome.client_state["dual_lora_personal"]
        assert set(kept) == local
        assert any(torch.count_nonzero(kept[k]) > 0 for k in local if ".lora_B." in k)
        assert all(torch.count_nonzero(update.payload[k]) == 0 for k in local)
    new_global = algo.server.aggregate(start, decoded, 1)
    assert changed(start, new_global) == shared
    own = algo.client.personal_state(new_global, outcomes[0].client_state)
    assert changed(new_global, own) == local
    batch = workload.collate_fn()(workload.data.clients[0].train[:8])
    workload.model.eval()
    logits = []
    for state in (new_global, own):
        workload.set_state(state)
        with torch.no_grad():
            logits.append(workload.model(**batch).logits)
    assert not torch.allclose(logits[0], logits[1])  # both adapters are in the forward pass


def test_dual_lora_needs_lora(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="use lora"):
        check_personalization(config_from_dict(raw_config(tmp_path, "dual_lora",
                                                          adapter={"kind": "ia3"})))
    with pytest.raises(ConfigError, match="algorithm.compression"):
        check_personalization(config_from_dict(raw_config(
            tmp_path, "fedper", algorithm={"compression": {"chain": [{"kind": "quantize"}]}})))


# --------------------------------------------------------------------------- runs


@pytest.mark.parametrize("name", ["fedper", "fedrep", "ditto", "dual_lora", "fedsa_lora"])
def test_personal_state_persists_across_rounds_and_resume(tmp_path: Path, name: str) -> None:
    changes = dict(local={"steps": 1, "batch_size": 4},
                   federation={"num_clients": 3, "clients_per_round": 2, "rounds": 3},
                   algorithm={"personal": {"head_steps": 1, "personal_steps": 1}},
                   eval={"every": 3})
    whole = fedfm.run(config_from_dict(raw_config(tmp_path / "whole", name, **changes)))
    short_changes = {**changes, "federation": {**changes["federation"], "rounds": 2}}
    short = fedfm.run(config_from_dict(raw_config(tmp_path / "short", name, **short_changes)))
    resumed = fedfm.run(resume=short.run_dir, overrides=["federation.rounds=3"])
    assert S.max_abs_diff(resumed.final_state, whole.final_state) == 0.0
    last, again = whole.metrics[-1]["eval"], resumed.metrics[-1]["eval"]
    assert again["personalized"] == last["personalized"]  # built from the stored states
    assert last["personalized"] != last["per_client"]
    assert "personal_accuracy_mean" in resumed.summary["final_metrics"]


def test_finetune_steps_personalizes_fedavg(tmp_path: Path) -> None:
    raw = raw_config(tmp_path, "fedavg", federation={"num_clients": 3, "clients_per_round": 3,
                                                     "rounds": 1},
                     eval={"finetune_steps": 3})
    result = fedfm.run(config_from_dict(raw))
    record = result.metrics[-1]["eval"]
    assert set(record["personalized"]) == set(record["per_client"])
    assert all(record["personalized"][c]["loss"] != record["per_client"][c]["loss"]
               for c in record["per_client"])
    assert "personal_accuracy_mean" in result.summary["final_metrics"]


def test_methods_are_catalogued_with_their_papers() -> None:
    found = {e.name: e.info for e in entries() if e.registry == "algorithm"}
    for name, paper in (("fedper", "Personalization Layers"), ("fedrep", "ICML 2021"),
                        ("ditto", "ICML 2021"), ("dual_lora", "FDLoRA")):
        assert found[name].taxonomy == "adaptability.personalization"
        assert paper in found[name].paper
