"""Frozen-prefix caching (issue 3, item 3): replaying a frozen bottom's cached output must give
what recomputing it gives -- losses, gradients, whole local training runs and evaluations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fedfm import api
from fedfm.algorithms.local_train import train_locally
from fedfm.config import (
    AdapterConfig,
    ConfigError,
    LocalTrainingConfig,
    ModelConfig,
    RuntimeConfig,
    config_from_dict,
)
from fedfm.core.algorithm import ClientContext
from fedfm.data import collate
from fedfm.data.packing import pack_examples
from fedfm.eval import evaluate_examples
from fedfm.models import apply_adapter, get_state, load_model
from fedfm.models.fused_loss import CausalLMLoss, standard_loss
from fedfm.runtime.prefix_cache import FeatureStore, build_prefix_cache, find_split
from tests.conftest import SMALL_LLAMA, cls_config_dict

NO_DROPOUT_BERT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
BERT_4 = {"num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 128,
          "num_attention_heads": 4, **NO_DROPOUT_BERT}
LLAMA_3 = {**SMALL_LLAMA, "num_hidden_layers": 3}


def bert_bundle(adapter: AdapterConfig) -> Any:
    bundle = load_model(ModelConfig(name="tiny-bert", config_overrides=BERT_4), seed=0,
                        num_labels=2)
    return apply_adapter(bundle, adapter, seed=0)


def cls_examples(count: int, seed: int = 0) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for index in range(count):
        length = int(torch.randint(4, 30, (1,), generator=generator))
        ids = torch.randint(5, 8000, (length,), generator=generator).tolist()
        examples.append({"input_ids": ids, "token_type_ids": [0] * length,
                         "labels": index % 2})
    return examples


def lm_examples(count: int, seed: int = 0) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(count):
        length = int(torch.randint(6, 40, (1,), generator=generator))
        ids = torch.randint(5, 8000, (length,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return examples


def context(model: torch.nn.Module, examples: list[dict[str, Any]], task: str,
            loss_fn: Any) -> ClientContext:
    return ClientContext(
        client_id=0, round=1, seed=7, model=model, get_state=lambda: get_state(model),
        set_state=lambda s: None, train_examples=examples,
        collate=lambda rows: collate(rows, pad_token_id=1, task=task),
        device=torch.device("cpu"), loss_fn=loss_fn, max_length=96)


def relative_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over the whole State (per tensor, a key bias -- whose gradient is
    zero in exact arithmetic -- would compare rounding noise with rounding noise)."""
    diff = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a)
    norm = sum(float(b[k].double().pow(2).sum()) for k in a)
    return (diff / norm) ** 0.5


# ------------------------------------------------------------------ storage


def test_feature_store_spills_beyond_its_budget_and_reads_back_exactly(tmp_path: Path) -> None:
    tensors = {bytes([i]): torch.randn(10 + i, 8, generator=torch.Generator().manual_seed(i))
               for i in range(6)}
    tensors[b"bf16"] = torch.randn(5, 8).to(torch.bfloat16)
    tensors[b"empty"] = torch.empty(0, 8)
    budget = 3 * 12 * 8 * 4  # room for about three of the fp32 entries
    store = FeatureStore(budget, tmp_path)
    for key, tensor in tensors.items():
        store.put(key, tensor)
    assert 0 < store.bytes_in_memory <= budget
    assert store.bytes_on_disk > 0
    assert store.bytes_in_memory + store.bytes_on_disk == sum(
        t.numel() * t.element_size() for t in tensors.values())
    for key, tensor in tensors.items():
        got = store.get(key)
        assert got is not None and got.dtype == tensor.dtype
        assert torch.equal(got, tensor)
    assert list(tmp_path.iterdir()) == []  # the spill file is unlinked once open: no leftovers
    store.close()
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ where the split is


def test_split_sits_at_the_first_trainable_block() -> None:
    head, _ = find_split(bert_bundle(AdapterConfig(kind="head")).model)
    assert head is not None and head.index == 4
    last2, _ = find_split(bert_bundle(AdapterConfig(kind="last_layers", num_layers=2)).model)
    assert last2 is not None and last2.index == 2
    everywhere, why = find_split(bert_bundle(AdapterConfig(kind="lora", r=2)).model)
    assert everywhere is None and "first transformer block trains" in why


# ------------------------------------------------------------------ exactness (float64)


@pytest.mark.parametrize("adapter", [AdapterConfig(kind="head"),
                                     AdapterConfig(kind="last_layers", num_layers=2)])
def test_cached_local_training_equals_recomputation_in_float64(adapter: AdapterConfig) -> None:
    examples = cls_examples(40)
    cfg = LocalTrainingConfig(steps=6, batch_size=8, lr=1e-2)  # AdamW
    bundle = bert_bundle(adapter)
    model = bundle.model.double()
    initial = {k: v.clone() for k, v in get_state(model).items()}
    train_locally(context(model, examples, "classification", standard_loss), cfg)
    recomputed = get_state(model)

    model.load_state_dict(initial, strict=False)
    probe = collate(examples[:8], pad_token_id=1, task="classification")
    cache, note = build_prefix_cache(model, probe, standard_loss, torch.autocast("cpu",
                                     enabled=False), 1e-10, memory_mb=64, spill_dir=None)
    assert cache is not None, note
    cached_result = train_locally(context(model, examples, "classification",
                                          cache.wrap(standard_loss)), cfg)
    assert relative_gap(get_state(model), recomputed) < 1e-10
    # each of the 40 examples was computed once: the probe's 8 rows, then 6 steps of 8 rows
    # (one full epoch plus one batch) replay everything computed before
    assert cached_result.steps == 6
    assert cache.stats.misses == len(examples)
    assert cache.stats.hits == 8 + 6 * 8 - len(examples)
    cache.detach()


def test_cached_causal_lm_with_top_lora_and_fused_loss_equals_recomputation() -> None:
    bundle = load_model(ModelConfig(name="tiny-llama", config_overrides=LLAMA_3), seed=0)
    adapter = AdapterConfig(kind="lora", r=4, alpha=8,
                            target_modules=["layers.2.self_attn.q_proj",
                                            "layers.2.self_attn.v_proj"])
    model = apply_adapter(bundle, adapter, seed=0).model.double()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    split, _ = find_split(model)
    assert split is not None and split.index == 2
    fused = CausalLMLoss()
    cfg = LocalTrainingConfig(steps=4, batch_size=4, lr=1e-2)
    examples = lm_examples(24)
    packed = pack_examples(examples, 96)
    initial = {k: v.clone() for k, v in get_state(model).items()}
    results = {}
    for label, rows in (("padded", examples), ("packed", packed)):
        model.load_state_dict(initial, strict=False)
        train_locally(context(model, rows, "causal_lm", fused),
                      cfg.model_copy(update={"batch_size": 2 if label == "packed" else 4}))
        reference = get_state(model)
        model.load_state_dict(initial, strict=False)
        probe = collate(rows[:2], pad_token_id=1, task="causal_lm")
        cache, note = build_prefix_cache(model, probe, fused, torch.autocast(
            "cpu", enabled=False), 1e-10, memory_mb=64, spill_dir=None)
        assert cache is not None, note
        train_locally(context(model, rows, "causal_lm", cache.wrap(fused)),
                      cfg.model_copy(update={"batch_size": 2 if label == "packed" else 4}))
        results[label] = relative_gap(get_state(model), reference)
        cache.detach()
    assert results["padded"] < 1e-10 and results["packed"] < 1e-10


def test_cached_evaluation_equals_recomputation_and_disk_spill_changes_nothing() -> None:
    model = bert_bundle(AdapterConfig(kind="last_layers", num_layers=1)).model.double()
    examples = sorted(cls_examples(50, seed=3), key=lambda e: len(e["input_ids"]))

    def evaluate() -> dict[str, float]:
        return evaluate_examples(model, examples, task="classification",
                                 collate_fn=lambda rows: collate(rows, pad_token_id=1,
                                                                 task="classification"),
                                 batch_size=16, device=torch.device("cpu"), num_labels=2)

    reference = evaluate()
    probe = collate(examples[:8], pad_token_id=1, task="classification")
    cache, _ = build_prefix_cache(model, probe, standard_loss, torch.autocast(
        "cpu", enabled=False), 1e-10, memory_mb=0, spill_dir=None)  # everything on disk
    assert cache is not None
    with cache.enabled():
        first = evaluate()
        second = evaluate()
    assert cache.store.bytes_in_memory == 0 and cache.store.bytes_on_disk > 0
    assert cache.stats.misses == len(examples)  # the second pass was all hits
    for metrics in (first, second):
        assert metrics["loss"] == pytest.approx(reference["loss"], rel=1e-12)
        assert metrics["accuracy"] == reference["accuracy"]
    cache.detach()
    assert evaluate()["loss"] == pytest.approx(reference["loss"], rel=1e-12)


def test_a_trainable_parameter_below_the_split_disables_the_cache() -> None:
    model = bert_bundle(AdapterConfig(kind="head")).model
    model.bert.embeddings.LayerNorm.weight.requires_grad_(True)
    probe = collate(cls_examples(8), pad_token_id=1, task="classification")
    cache, why = build_prefix_cache(model, probe, standard_loss, torch.autocast(
        "cpu", enabled=False), 1e-5, memory_mb=64, spill_dir=None)
    assert cache is None and "embeddings.LayerNorm.weight" in why
    # the model is left as it was: no hooks, the original block list
    assert not model.bert._forward_pre_hooks and not model.bert._forward_hooks


# ------------------------------------------------------------------ in a run


def test_run_with_the_cache_matches_the_run_without_it(tmp_path: Path) -> None:
    finals, speeds = {}, {}
    for mode in ("off", "auto"):
        config = config_from_dict(cls_config_dict(
            tmp_path / mode,
            model={"name": "tiny-bert", "max_length": 48, "config_overrides": BERT_4},
            adapter={"kind": "last_layers", "num_layers": 1},
            algorithm={"local": {"steps": 3, "batch_size": 8, "lr": 1e-2,
                                 "optimizer": "sgd"}},
            federation={"num_clients": 4, "clients_per_round": 4, "rounds": 3},
            runtime={"prefix_cache": mode, "precision": "fp32"}))
        result = api.run(config, console=False)
        finals[mode], speeds[mode] = result.final_state, result.summary["speed"]
    assert relative_gap(finals["auto"], finals["off"]) < 1e-5
    stats = speeds["auto"]["prefix_cache_stats"]
    assert speeds["auto"]["prefix_cache"] and stats["split_block"] == 3
    assert stats["hits"] > stats["misses"] > 0  # rounds 2-3 and evaluations replay
    assert not speeds["off"]["prefix_cache"]


def test_prefix_cache_on_without_a_frozen_prefix_is_a_config_error(cls_config) -> None:
    config = cls_config(runtime={"prefix_cache": "on"})  # LoRA in every block
    with pytest.raises(ConfigError, match="runtime.prefix_cache"):
        api.build_workload(config, api.build_algorithm(config))


def test_prefix_cache_on_with_compile_is_rejected() -> None:
    with pytest.raises(ValueError, match="prefix_cache"):
        RuntimeConfig(prefix_cache="on", compile=True)
