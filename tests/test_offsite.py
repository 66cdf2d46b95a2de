"""Offsite tuning (FedOT): clients train bottom/top adapters through a layer-dropped emulator that
shares the full model's tensors; the full model (adapters plugged in) and the emulator are
evaluated side by side; the client side never holds a dropped block."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

import fedfm
from fedfm.api import build_algorithm, build_workload, check_components, seed_everything
from fedfm.config import AdapterConfig, ConfigError, ModelConfig, OffsiteConfig, config_from_dict
from fedfm.core.client_store import MemoryClientStore
from fedfm.core.update import Broadcast
from fedfm.models import apply_adapter, count_parameters, find_blocks, load_model
from fedfm.runtime.local import LocalRuntime
from fedfm.trust.ip import offsite
from fedfm.trust.ip.offsite import (
    EMULATOR_VIEW,
    build_emulator,
    check_offsite,
    emulator_layers,
    prepare_offsite,
    save_emulator,
)
from tests.conftest import SMALL_LLAMA, cls_config_dict, deep_update, lm_config_dict

LLAMA6 = {**SMALL_LLAMA, "num_hidden_layers": 6}
OFFSITE = {"drop": 0.5, "bottom": 2, "top": 1}  # 6 blocks: kept [0, 1, 2, 4, 5]; tuned 0, 1, 5
LIST = "base_model.model.model.layers"


def lm_config(tmp_path: Path, **changes: Any):
    fedot = {"model": {"config_overrides": LLAMA6, "max_length": 48},
             "runtime": {"attention": "sdpa", "fused_loss": False}, "data": {"max_rows": 60},
             "algorithm": {"name": "fedot", "offsite": OFFSITE, "local": {"steps": 2}}}
    return config_from_dict(lm_config_dict(tmp_path, **deep_update(fedot, changes)))


def workload_of(config) -> Any:
    check_components(config)
    check_offsite(config)
    seed_everything(config.seed)
    return build_workload(config, build_algorithm(config))


def block_of(name: str, list_name: str = LIST) -> int | None:
    prefix = f"{list_name}."
    return int(name[len(prefix):].split(".", 1)[0]) if name.startswith(prefix) else None


def randomise_lora_b(model: torch.nn.Module) -> None:
    """LoRA B starts at zero (the adapter is the identity): make the adapters matter."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


# --------------------------------------------------------------------------- pure math


@pytest.mark.parametrize(("blocks", "bottom", "top", "drop", "kept"), [
    (12, 2, 2, 0.0, list(range(12))),
    (12, 2, 2, 0.5, [0, 1, 2, 4, 7, 9, 10, 11]),  # middle 2..9: linspace(2, 9, 4) rounded
    (12, 2, 2, 0.99, [0, 1, 10, 11]),
    (6, 2, 1, 0.5, [0, 1, 2, 4, 5]),
    (6, 1, 1, 0.75, [0, 3, 5]),  # round(0.25 * 4) = 1 middle block: the centre of 1..4
])
def test_emulator_layers_keep_bottom_top_and_a_uniform_middle(blocks, bottom, top, drop,
                                                              kept) -> None:
    got = emulator_layers(blocks, bottom, top, drop)
    assert got[:bottom] == list(range(bottom))
    assert got[len(got) - top:] == list(range(blocks - top, blocks))
    assert got == kept == emulator_layers(blocks, bottom, top, drop)  # deterministic
    assert got == sorted(set(got))


def test_emulator_layers_need_middle_blocks() -> None:
    with pytest.raises(ValueError, match="below the 4 blocks"):
        emulator_layers(4, 2, 2, 0.5)


def tiny(name: str, **overrides: Any) -> Any:
    labels = 2 if name == "tiny-bert" else None
    bundle = load_model(ModelConfig(name=name, config_overrides=overrides), num_labels=labels)
    return apply_adapter(bundle, AdapterConfig(kind="lora", r=4, alpha=8))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
def test_emulator_with_drop_0_computes_the_full_models_logits(name: str) -> None:
    bundle = tiny(name, **(LLAMA6 if name == "tiny-llama" else {"num_hidden_layers": 4}))
    model = bundle.model
    randomise_lora_b(model)
    _, blocks = find_blocks(model)
    emulator = build_emulator(model, emulator_layers(len(blocks), 1, 1, 0.0))
    ids = torch.randint(3, 8000, (2, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        emulated = emulator(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(full, emulated)
    # a real emulator is smaller, computes something else, and the full model is untouched
    small = build_emulator(model, [0, len(blocks) - 1])
    with torch.no_grad():
        assert not torch.allclose(small(input_ids=ids).logits, model(input_ids=ids).logits)
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, full)
    assert len(find_blocks(small)[1]) == 2 and len(find_blocks(model)[1]) == len(blocks)


# --------------------------------------------------------------------------- the State


def test_state_holds_full_model_names_of_the_bottom_and_top_adapters_only(tmp_path) -> None:
    workload = workload_of(lm_config(tmp_path))
    state = workload.get_state()
    assert {block_of(k) for k in state} == {0, 1, 5}
    assert all(".lora_A." in k or ".lora_B." in k for k in state)
    emulator = workload.client.emulator
    assert emulator.kept == [0, 1, 2, 4, 5]
    assert list(emulator.get_state()) == list(state)  # full-model names, same order
    emulated_names = {n for n, p in emulator.model.named_parameters() if p.requires_grad}
    assert {block_of(n) for n in emulated_names} == {0, 1, 4}  # block 5 is the emulator's 4
    assert workload.views[EMULATOR_VIEW] is emulator.model
    from fedfm.runtime.batched import unsupported_reason

    assert "no batched form" in (unsupported_reason(workload) or "")


def test_classification_state_adds_the_head(tmp_path) -> None:
    raw = cls_config_dict(tmp_path, model={"config_overrides": {"num_hidden_layers": 4}},
                          algorithm={"name": "fedot", "offsite": {"drop": 0.5}},
                          runtime={"attention": "sdpa"})
    workload = workload_of(config_from_dict(raw))
    names = list(workload.get_state())
    bert_list = "base_model.model.bert.encoder.layer"
    assert {block_of(n, bert_list) for n in names} == {0, 3, None}
    assert [n for n in names if block_of(n, bert_list) is None] == [
        "base_model.model.classifier.modules_to_save.default.weight",
        "base_model.model.classifier.modules_to_save.default.bias"]


# --------------------------------------------------------------------------- client side


def test_client_trains_the_emulator_and_its_update_moves_only_bottom_top_adapters(
        tmp_path, monkeypatch) -> None:
    workload = workload_of(lm_config(tmp_path))
    trained: list[torch.nn.Module] = []
    real = offsite.train_locally

    def spy(ctx, cfg, **kwargs):
        trained.append(ctx.model)
        return real(ctx, cfg, **kwargs)

    monkeypatch.setattr(offsite, "train_locally", spy)
    global_state = workload.get_state()
    before = {n: p.detach().clone() for n, p in workload.model.named_parameters()}
    runtime = LocalRuntime(workload, MemoryClientStore())
    update = next(iter(runtime.run_clients([0], Broadcast(global_state), 1))).update
    assert trained == [workload.client.emulator.model]
    assert list(update.payload) == list(global_state)
    moved = {k for k, v in update.payload.items() if v.abs().max() > 0}
    assert {block_of(k) for k in moved} == {0, 1, 5}

    workload.set_state({k: global_state[k] + update.payload[k] for k in global_state})
    changed = {n for n, p in workload.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == moved  # the full model: exactly the tuned adapters, no base weight


def test_client_side_holds_only_emulator_tensors(tmp_path) -> None:
    workload = workload_of(lm_config(tmp_path))
    full = workload.model
    emulator = workload.client.context(runtime_context(workload)).model
    assert emulator is workload.client.emulator.model
    _, blocks = find_blocks(full)
    kept = workload.client.emulator.kept
    dropped = [b for i, b in enumerate(blocks) if i not in kept]
    dropped_ptrs = {p.data_ptr() for b in dropped for p in b.parameters()}
    dropped_ids = {id(p) for b in dropped for p in b.parameters()}
    held = list(emulator.parameters())
    assert dropped_ptrs and not dropped_ptrs & {p.data_ptr() for p in held}
    assert not dropped_ids & {id(p) for p in held}
    assert not any(any(m is b for b in dropped) for m in emulator.modules())
    # exactly the embeddings, kept blocks, norm and head (with their adapters): shared, not copied
    base = full.get_base_model()
    expected = [base.model.embed_tokens, base.model.norm, base.lm_head,
                *(blocks[i] for i in kept)]
    assert {id(p) for p in held} == {id(p) for m in expected for p in m.parameters()}
    _, total = count_parameters(full)
    dropped_count = sum(p.numel() for b in dropped for p in b.parameters())
    assert count_parameters(emulator)[1] == total - dropped_count


def runtime_context(workload: Any) -> Any:
    return LocalRuntime(workload, MemoryClientStore()).client_context(0, 1)


def test_save_emulator_round_trip(tmp_path) -> None:
    workload = workload_of(lm_config(tmp_path))
    randomise_lora_b(workload.model)  # the export is the base: adapters are left out
    out = save_emulator(workload, tmp_path / "emulator")
    kept = workload.client.emulator.kept
    with safe_open(str(out / "model.safetensors"), "pt") as saved:
        keys = list(saved.keys())
        layer_keys = [k for k in keys if k.startswith("model.layers.")]
        assert {int(k.split(".")[2]) for k in layer_keys} == set(range(len(kept)))
        assert not any("lora" in k or "base_layer" in k for k in keys)
        full_blocks = find_blocks(workload.model)[1]
        for j, i in enumerate(kept):  # block j of the file is block kept[j] of the full model
            assert torch.equal(saved.get_tensor(f"model.layers.{j}.self_attn.q_proj.weight"),
                               full_blocks[i].self_attn.q_proj.base_layer.weight)
    assert json.loads((out / "offsite.json").read_text())["kept_blocks"] == kept
    loaded = load_model(ModelConfig(name=str(out))).model
    local = workload.config.model.model_copy(update={"name": str(out), "config_overrides": {}})
    algorithm = workload.config.algorithm.model_copy(
        update={"offsite": OffsiteConfig(bottom=2, top=3)})
    shipped = workload.config.model_copy(update={"model": local, "algorithm": algorithm})
    with pytest.raises(ConfigError, match="below the model's 5 blocks"):  # its config.json
        check_offsite(shipped)
    assert loaded.config.num_hidden_layers == len(kept)
    ids = torch.randint(3, 8000, (2, 9), generator=torch.Generator().manual_seed(1))
    emulator = workload.client.emulator.model
    with torch.no_grad(), emulator.disable_adapter():
        assert torch.equal(loaded(input_ids=ids).logits, emulator(input_ids=ids).logits)


# --------------------------------------------------------------------------- a run


def test_a_fedot_run_reports_full_and_emulator_metrics_and_full_names(tmp_path) -> None:
    config = lm_config(tmp_path, federation={"rounds": 2}, runtime={"fused_loss": True},
                       eval={"per_client": True, "max_examples": 8})
    check_offsite(config)
    result = fedfm.run(config)
    evals = [r["eval"] for r in result.metrics if "eval" in r]
    assert len(evals) == 2
    for found in evals:
        metrics = found["global"]
        for key in ("loss", "perplexity"):
            assert key in metrics and f"emulator_{key}" in metrics
        assert metrics["loss"] != metrics["emulator_loss"]
        assert all("emulator_loss" in m for m in found["per_client"].values())
    assert {block_of(k) for k in result.final_state} == {0, 1, 5}
    assert result.summary["final_metrics"]["val_emulator_loss"] == evals[-1]["global"][
        "emulator_loss"]


# --------------------------------------------------------------------------- config errors


def test_config_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"adapter.kind is 'ia3' \(allowed: lora\)"):
        check_offsite(lm_config(tmp_path, adapter={"kind": "ia3"}))
    with pytest.raises(ConfigError, match=r"offsite.bottom \(2\) \+ algorithm.offsite.top "
                                          r"\(1\) must be below the model's 3 blocks"):
        check_offsite(lm_config(tmp_path, model={"config_overrides": {"num_hidden_layers": 3}}))
    with pytest.raises(ConfigError, match="privacy.dp_sgd"):
        check_offsite(lm_config(tmp_path, privacy={"dp_sgd": {"noise_multiplier": 1.0}}))
    with pytest.raises(ConfigError, match="privacy.client_dp"):
        check_offsite(lm_config(tmp_path, privacy={"client_dp": {"noise_multiplier": 1.0}}))
    check_offsite(lm_config(tmp_path))  # fine
    bundle = tiny("tiny-llama", **LLAMA6)
    with pytest.raises(ConfigError, match=r"algorithm.offsite.bottom \(3\) \+ "
                                          r"algorithm.offsite.top \(3\) must be below the "
                                          r"model's 6 blocks"):
        prepare_offsite(bundle.model, OffsiteConfig(bottom=3, top=3))
