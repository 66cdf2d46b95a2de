"""Server-side knowledge distillation: FedDF's ensemble teacher and distillation step, FedMKT's
two-way transfer, the public data reader and the config checks."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fedfm
from fedfm.api import build_algorithm, build_workload, check_components, seed_everything
from fedfm.config import ConfigError, DataConfig, PublicDataConfig, config_from_dict
from fedfm.core.update import ClientUpdate
from fedfm.data.sources import DataError
from fedfm.efficiency.distillation.feddf import client_models
from fedfm.efficiency.distillation.fedmkt import EXTRAS_KEY, STATE_KEY, check_vocabularies
from fedfm.efficiency.distillation.kd import ModelView, ensemble_logits, kd_loss, mean_kd_loss
from fedfm.efficiency.distillation.public import load_public_texts
from tests.conftest import DATA, cls_config_dict, lm_config_dict

PUBLIC = {"path": str(DATA / "sst2_public.jsonl"), "max_rows": 48}


def feddf_config(tmp_path: Path, **distill):
    return config_from_dict(cls_config_dict(tmp_path, algorithm={
        "name": "feddf", "distill": {"public": PUBLIC, "steps": 4, "batch_size": 16,
                                     **distill}}))


def fedmkt_config(tmp_path: Path):
    return config_from_dict(cls_config_dict(tmp_path, algorithm={
        "name": "fedmkt", "distill": {"public": PUBLIC, "steps": 4, "batch_size": 16,
                                      "server_model": {"name": "tiny-bert", "config_overrides":
                                                       {"num_hidden_layers": 3}}}}))


def built(cfg):
    check_components(cfg)
    seed_everything(cfg.seed)
    algorithm = build_algorithm(cfg)
    return algorithm, build_workload(cfg, algorithm)


def random_delta(state, seed: int, scale: float = 0.05):
    generator = torch.Generator().manual_seed(seed)
    return OrderedDict((k, torch.randn(v.shape, generator=generator) * scale)
                       for k, v in state.items())


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_kd_loss_is_the_scaled_kl_divergence(temperature: float) -> None:
    student, teacher = torch.randn(5, 3), torch.randn(5, 3)
    expected = F.kl_div(F.log_softmax(student / temperature, -1),
                        F.softmax(teacher / temperature, -1),
                        reduction="batchmean") * temperature ** 2
    assert torch.allclose(kd_loss(student, teacher, None, temperature), expected, atol=1e-6)
    tokens_s, tokens_t = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    kept = mask.bool()
    per_token = F.kl_div(F.log_softmax(tokens_s[kept] / temperature, -1),
                         F.softmax(tokens_t[kept] / temperature, -1),
                         reduction="batchmean") * temperature ** 2
    assert torch.allclose(kd_loss(tokens_s, tokens_t, mask, temperature), per_token, atol=1e-6)


def test_ensemble_is_the_mean_of_the_client_models_logits(tmp_path: Path) -> None:
    algorithm, workload = built(feddf_config(tmp_path))
    server = algorithm.server
    base = workload.get_state()
    states = [OrderedDict((k, v + d) for (k, v), d in
                          zip(base.items(), random_delta(base, seed).values(), strict=True))
              for seed in (1, 2, 3)]
    view = ModelView(workload.model, workload.device, None, workload.set_state)
    batches = server.batches[:2]
    teacher = ensemble_logits(view, states, batches)
    for index, batch in enumerate(batches):
        separate = []
        for state in states:
            workload.set_state(state)
            with torch.no_grad():
                separate.append(workload.model(**batch).logits)
        assert torch.allclose(teacher[index], torch.stack(separate).mean(0), atol=1e-5)
    weighted = ensemble_logits(view, states[:2], batches, weights=[3.0, 1.0])
    workload.set_state(states[0])
    with torch.no_grad():
        first = workload.model(**batches[0]).logits
    workload.set_state(states[1])
    with torch.no_grad():
        second = workload.model(**batches[0]).logits
    assert torch.allclose(weighted[0], 0.75 * first + 0.25 * second, atol=1e-5)


def test_an_agreeing_ensemble_teaches_nothing(tmp_path: Path) -> None:
    """Two clients with the same update: the ensemble is FedAvg's aggregate itself, so the
    distillation loss is exactly zero and its gradient vanishes (to rounding)."""
    algorithm, workload = built(feddf_config(tmp_path, steps=6))
    server = algorithm.server
    base = workload.get_state()
    delta = random_delta(base, 5)
    updates = [ClientUpdate(i, delta, 10) for i in range(2)]
    fedavg = server.inner.aggregate(base, updates, 1)
    view = ModelView(workload.model, workload.device, None, workload.set_state)
    teacher = ensemble_logits(view, client_models(base, updates), server.batches)
    workload.set_state(fedavg)
    assert mean_kd_loss(view, server.batches, teacher, 1.0) == 0.0
    batch = server.batches[0]
    loss = kd_loss(view.logits(batch), teacher[0], batch["attention_mask"], 1.0)
    loss.backward()
    largest = max(float(p.grad.abs().max()) for p in workload.model.parameters()
                  if p.grad is not None)
    assert largest < 1e-6


def test_feddf_moves_the_aggregate_towards_the_ensemble(tmp_path: Path) -> None:
    algorithm, workload = built(feddf_config(tmp_path, steps=20, lr=1e-2))
    server = algorithm.server
    base = workload.get_state()
    updates = [ClientUpdate(i, random_delta(base, 10 + i, 0.5), 10) for i in range(3)]
    fedavg = server.inner.aggregate(base, updates, 1)
    server.inner.load_state_dict(server.inner.state_dict())
    feddf = server.aggregate(base, updates, 1)
    assert server.last["kd_loss_after"] < 0.8 * server.last["kd_loss_before"]
    assert any(not torch.equal(feddf[k], fedavg[k]) for k in fedavg)
    assert list(feddf) == list(fedavg)


def test_feddf_run_reports_distillation_each_round(tmp_path: Path) -> None:
    result = fedfm.run(feddf_config(tmp_path))
    rounds = [r for r in result.metrics if "distill" in r]
    assert len(rounds) == 2
    for record in rounds:
        assert record["distill"]["public_rows"] == 48
        assert record["distill"]["steps"] == 4
        assert record["distill"]["kd_loss_after"] < record["distill"]["kd_loss_before"]
    assert "val_accuracy" in result.summary["final_metrics"]


def test_public_data_reads_only_the_text(tmp_path: Path) -> None:
    data = DataConfig(path=str(DATA / "sst2_train.jsonl"), format="classification",
                      text_field="sentence")
    texts = load_public_texts(PublicDataConfig(path=str(DATA / "sst2_public.jsonl"),
                                               max_rows=5), data)
    first = json.loads((DATA / "sst2_public.jsonl").read_text().splitlines()[0])
    assert len(texts) == 5 and texts[0] == (first["sentence"], None)
    custom = tmp_path / "public.jsonl"
    custom.write_text(json.dumps({"body": "a fine film", "label": "ignored"}) + "\n"
                      + json.dumps({"other": "no body"}) + "\n")
    with pytest.raises(DataError, match=r"public.jsonl, line 2: public data field 'body'"):
        load_public_texts(PublicDataConfig(path=str(custom), text_field="body"), data)
    instruction = DataConfig(path=str(DATA / "dolly_train.jsonl"), format="instruction")
    text, _ = load_public_texts(PublicDataConfig(path=str(DATA / "dolly_validation.jsonl"),
                                                 max_rows=1), instruction)[0]
    row = json.loads((DATA / "dolly_validation.jsonl").read_text().splitlines()[0])
    assert row["instruction"] in text and text.endswith(row["response"])


def test_fedmkt_transfers_knowledge_both_ways_and_checkpoints_the_large_model(
        tmp_path: Path) -> None:
    algorithm, workload = built(fedmkt_config(tmp_path))
    server = algorithm.server
    assert server.broadcast_extras(workload.get_state()) == {}  # round 1: no teacher yet
    large_before = server.large.get_state()
    base = workload.get_state()
    updates = [ClientUpdate(i, random_delta(base, 20 + i, 0.5), 10) for i in range(2)]
    fedavg = server.inner.aggregate(base, updates, 1)
    server.inner.load_state_dict(server.inner.state_dict())
    aggregated = server.aggregate(base, updates, 1)
    assert all(torch.equal(aggregated[k], fedavg[k]) for k in fedavg)  # small side: FedAvg
    large_after = server.large.get_state()
    assert any(not torch.equal(large_before[k], large_after[k]) for k in large_before)
    transfer = server.last["small_to_large"]
    assert transfer["kd_loss_after"] < transfer["kd_loss_before"]
    assert "accuracy" in server.last["server_model"]
    # large -> small: the broadcast holds the large model's logits on every public batch
    teacher = server.broadcast_extras(aggregated)[EXTRAS_KEY]
    assert len(teacher) == len(server.batches)
    with torch.no_grad():
        expected = server.large.model(**server.large.batches[0]).logits
    assert torch.allclose(teacher["batch_0"], expected, atol=1e-5)
    saved = server.state_dict()
    assert set(saved[STATE_KEY]) == set(large_after)
    server.large.view.set_state(large_before)
    server.teacher = OrderedDict()
    server.load_state_dict(saved)
    restored = server.large.get_state()
    assert all(torch.equal(restored[k], large_after[k]) for k in restored)
    assert torch.equal(server.broadcast_extras(aggregated)[EXTRAS_KEY]["batch_0"],
                       teacher["batch_0"])


def test_fedmkt_clients_add_the_weighted_distillation_loss(tmp_path: Path) -> None:
    """With the teacher broadcast, a client's loss is its own plus client_weight times the KD
    loss on the next public batch; at weight 0 it trains exactly as FedAvg's client."""
    from fedfm.algorithms.fedavg import DeltaClient
    from fedfm.core.update import Broadcast
    from fedfm.efficiency.distillation.fedmkt import TeacherLoss

    algorithm, workload = built(fedmkt_config(tmp_path))
    client, server = algorithm.client, algorithm.server
    base = workload.get_state()
    server.aggregate(base, [ClientUpdate(0, random_delta(base, 3, 0.5), 10)], 1)
    broadcast = Broadcast(base, server.broadcast_extras(base))

    def update_of(procedure) -> OrderedDict:
        workload.set_state(base)
        ctx = workload.client_context(workload.data.clients[0].train, client_id=0, round=2,
                                      seed=11)
        return procedure.run(ctx, broadcast).update

    plain = update_of(DeltaClient(workload.config.algorithm.local))
    distilled = update_of(client)
    assert distilled.metrics["kd_loss"] > 0
    assert any(not torch.equal(plain.payload[k], distilled.payload[k]) for k in plain.payload)
    client.cfg = client.cfg.model_copy(update={"client_weight": 0.0})
    silent = update_of(client)
    assert all(torch.equal(plain.payload[k], silent.payload[k]) for k in plain.payload)
    # the loss itself: base + weight * KD of the next public batch
    ctx = workload.client_context(workload.data.clients[0].train, client_id=0, round=2, seed=1)
    weighted = TeacherLoss(server.batches, broadcast.extras[EXTRAS_KEY], ctx,
                           client.cfg.model_copy(update={"client_weight": 0.5}))
    batch = workload.collate_fn()(workload.data.clients[0].train[:4])
    workload.model.eval()
    with torch.no_grad():
        total = weighted.loss(workload.model, batch)
        own = workload.model(**batch).loss
        kd = kd_loss(workload.model(**server.batches[0]).logits,
                     broadcast.extras[EXTRAS_KEY]["batch_0"], server.batches[0]["attention_mask"],
                     1.0)
    assert torch.allclose(total, own + 0.5 * kd, atol=1e-6)


def test_token_level_transfer_needs_one_vocabulary() -> None:
    from transformers import AutoTokenizer

    from fedfm.models.loader import minilm_dir, tiny_tokenizer

    tiny = tiny_tokenizer()
    wordpiece = AutoTokenizer.from_pretrained(str(minilm_dir()))
    with pytest.raises(ConfigError, match="vocabularies differ.*not implemented"):
        check_vocabularies(tiny, wordpiece, "causal_lm")
    check_vocabularies(tiny, wordpiece, "classification")  # label logits: no alignment needed
    check_vocabularies(tiny, tiny_tokenizer(), "causal_lm")


def test_fedmkt_on_a_causal_lm_with_a_shared_vocabulary(tmp_path: Path) -> None:
    public = {"path": str(DATA / "dolly_validation.jsonl"), "max_rows": 8}
    cfg = config_from_dict(lm_config_dict(tmp_path, federation={"rounds": 2}, algorithm={
        "name": "fedmkt", "distill": {"public": public, "steps": 2, "batch_size": 4,
                                      "server_model": {"name": "tiny-llama", "max_length": 96,
                                                       "config_overrides": {
                                                           "hidden_size": 96,
                                                           "num_hidden_layers": 2}}}}))
    result = fedfm.run(cfg)
    record = next(r for r in result.metrics if "distill" in r)
    assert record["distill"]["small_to_large"]["steps"] == 2
    assert "perplexity" in record["distill"]["server_model"]
    first, second = result.metrics[0], result.metrics[1]
    assert all("kd_loss" not in c for c in first["clients"].values())
    assert all(c["kd_loss"] > 0 for c in second["clients"].values())
    # the token-level teacher (8 rows x tokens x 8192 bfloat16 logits) travels down
    assert second["bytes_down"] > first["bytes_down"] + 2 * 8 * 8192


@pytest.mark.parametrize(("changes", "message"), [
    ({"algorithm": {"name": "fedavg", "distill": {"public": PUBLIC}}},
     "algorithm 'fedavg' would ignore it"),
    ({"algorithm": {"name": "feddf"}}, "needs algorithm.distill"),
    ({"algorithm": {"name": "fedmkt", "distill": {"public": PUBLIC}}},
     "needs algorithm.distill.server_model"),
    ({"algorithm": {"name": "feddf", "distill": {"public": PUBLIC}},
      "privacy": {"secure_aggregation": {}}}, "reveals only their sum"),
    ({"algorithm": {"name": "feddf", "distill": {"public": PUBLIC}},
      "privacy": {"client_dp": {"noise_multiplier": 1.0}}}, "void the guarantee"),
])
def test_config_errors(tmp_path: Path, changes, message: str) -> None:
    cfg = config_from_dict(cls_config_dict(tmp_path, **changes))
    with pytest.raises(ConfigError, match=message):
        check_components(cfg)


def test_the_coordinator_distils_too(tmp_path: Path) -> None:
    """FedDF only changes the server rule: a deployment's coordinator binds it to its own
    model and public data, and the clients run plain FedAvg."""
    from fedfm.deploy.coordinator import build_server_workload, check_deployable

    cfg = feddf_config(tmp_path)
    check_components(cfg)
    check_deployable(cfg)
    algorithm = build_algorithm(cfg)
    workload = build_server_workload(cfg, algorithm)
    assert algorithm.server.view.model is workload.model
    assert sum(len(b["input_ids"]) for b in algorithm.server.batches) == 48
