"""Token recovery from a client's update (issue 5, item 5): the embedding, a LoRA embedding
factor, and the first layer's query/key/value update (DAGER's span check)."""

from __future__ import annotations

import pytest
import torch

from fedfm.algorithms.local_train import train_locally
from fedfm.config import AdapterConfig, LocalTrainingConfig, ModelConfig
from fedfm.core.algorithm import ClientContext
from fedfm.data import collate
from fedfm.models import apply_adapter, get_state, load_model
from fedfm.trust.attacks.token_recovery import (
    first_layer_updates,
    recover_tokens,
    span_basis,
)

LENGTH = 12


def lora_llama(targets: list[str] | None = None) -> torch.nn.Module:
    bundle = load_model(ModelConfig(name="tiny-llama"), seed=0)
    bundle = apply_adapter(bundle, AdapterConfig(kind="lora", r=8, target_modules=targets),
                           seed=0)
    with torch.no_grad():  # a later round: B is no longer zero, so A receives gradients
        for name, param in bundle.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return bundle.model


def client_update(model: torch.nn.Module, rows: int, optimizer: str, steps: int
                  ) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Train ``model`` like a client; its update and the batches it fed."""
    generator = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(rows):
        ids = torch.randint(10, 8000, (LENGTH,), generator=generator).tolist()
        examples.append({"input_ids": ids, "attention_mask": [1] * LENGTH, "labels": ids})
    seen: list[dict[str, torch.Tensor]] = []

    def recording(batch_rows: list[dict]) -> dict[str, torch.Tensor]:
        seen.append(collate(batch_rows, pad_token_id=0, task="causal_lm"))
        return seen[-1]

    before = get_state(model)
    ctx = ClientContext(client_id=0, round=2, seed=0, model=model,
                        get_state=lambda: get_state(model), set_state=lambda s: None,
                        train_examples=examples, device=torch.device("cpu"), collate=recording)
    train_locally(ctx, LocalTrainingConfig(steps=steps, batch_size=4, optimizer=optimizer,
                                           lr=1e-2, group_by_length=False))
    after = get_state(model)
    return {key: after[key] - before[key] for key in before}, seen


def test_one_sgd_step_gives_the_fed_tokens_exactly() -> None:
    model = lora_llama()
    update, batches = client_update(model, rows=1, optimizer="sgd", steps=1)
    found = recover_tokens(model, update, batches, max_positions=16)
    assert found["method"] == "first_layer_span"
    # q and v of layer 0 only, every input projection the attack knows
    assert all(".layers.0." in module for module in found["modules"])
    assert len(found["modules"]) == 2
    # a causal LM's last token predicts nothing, so its input gets no gradient: 11 of 12 are
    # in the span, and nothing else is
    assert found["span_rank"] == LENGTH - 1
    assert found["precision"] == 1.0
    assert found["recall"] == pytest.approx((LENGTH - 1) / LENGTH)


def test_several_adam_steps_still_rank_fed_tokens_first() -> None:
    model = lora_llama()
    update, batches = client_update(model, rows=8, optimizer="adamw", steps=5)
    found = recover_tokens(model, update, batches, max_positions=16)
    assert found["span_rank"] == 16  # two projections x r=8, fewer rows than tokens fed
    assert found["auc"] > 0.8 and found["r_precision"] > 0.3


def test_lora_on_the_embedding_moves_only_fed_columns() -> None:
    model = lora_llama(["embed_tokens", "q_proj"])
    update, batches = client_update(model, rows=2, optimizer="adamw", steps=2)
    found = recover_tokens(model, update, batches)
    assert found["method"] == "lora_embedding"
    assert found["precision"] == 1.0 and found["recall"] >= (2 * LENGTH - 2) / (2 * LENGTH)


def test_updates_without_token_traces_are_not_attacked() -> None:
    model = lora_llama(["down_proj"])  # reads the MLP's input, after attention mixed tokens
    update, batches = client_update(model, rows=1, optimizer="sgd", steps=1)
    found = recover_tokens(model, update, batches)
    assert found["applicable"] is False and "first-layer" in found["why"]


def test_first_layer_is_the_lowest_index_and_the_encoder_side() -> None:
    rows = torch.ones(2, 4)
    payload = {
        "m.encoder.layer.1.attention.self.query.lora_A.default.weight": rows,
        "m.encoder.layer.0.attention.self.query.lora_A.default.weight": rows,
        "m.encoder.layer.0.attention.self.value.lora_B.default.weight": rows,
        "m.decoder.layer.0.attention.self.query.lora_A.default.weight": rows,
        "m.encoder.layer.0.intermediate.dense.lora_A.default.weight": rows,
    }
    assert list(first_layer_updates(payload)) == ["m.encoder.layer.0.attention.self.query"]


def test_span_basis_is_orthonormal_with_the_update_rank() -> None:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(3, 10, generator=generator, dtype=torch.float64)
    rows = [torch.randn(4, 3, generator=generator, dtype=torch.float64) @ inputs,
            torch.randn(2, 3, generator=generator, dtype=torch.float64) @ inputs]
    basis = span_basis(rows)
    assert basis.shape == (10, 3)
    assert torch.allclose(basis.T @ basis, torch.eye(3, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(inputs @ basis @ basis.T, inputs, atol=1e-10)  # inputs in the span
