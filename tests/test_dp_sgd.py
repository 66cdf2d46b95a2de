"""Sample-level DP-SGD on clients (issue 5, item 2): per-example clipping, noise scale, Poisson
batches and per-client accounting against dp-accounting."""

from __future__ import annotations

import statistics

import dp_accounting
import pytest
import torch
from dp_accounting import rdp

from fedfm import api
from fedfm.algorithms.local_train import trainable_parameters
from fedfm.config import AdapterConfig, ConfigError, DPSGDConfig, LocalTrainingConfig, ModelConfig
from fedfm.core.algorithm import ClientContext
from fedfm.data import collate
from fedfm.models import apply_adapter, get_state, load_model, set_state
from fedfm.models.fused_loss import standard_loss
from fedfm.trust.privacy import dp_sgd
from fedfm.trust.privacy.dp_sgd import client_epsilon, clipped_gradient_sum, poisson_batch

ROWS = [{"input_ids": [1, 5 + i, 60 + i, 7, 2], "attention_mask": [1] * 5, "labels": i % 2}
        for i in range(12)]


def context(seed: int = 3) -> ClientContext:
    bundle = load_model(ModelConfig(name="tiny-bert"), seed=0, num_labels=2)
    bundle = apply_adapter(bundle, AdapterConfig(kind="lora", r=4), seed=0)
    with torch.no_grad():  # move LoRA B off zero so every gradient is informative
        for name, param in bundle.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    model = bundle.model.eval()  # no dropout: per-example gradients are deterministic
    return ClientContext(
        client_id=0, round=1, seed=seed, model=model, get_state=lambda: get_state(model),
        set_state=lambda s: set_state(model, s), train_examples=list(ROWS),
        collate=lambda r: collate(r, pad_token_id=0, task="classification"),
        device=torch.device("cpu"))


def per_example_grads(ctx: ClientContext) -> list[list[torch.Tensor]]:
    params = [p for _, p in trainable_parameters(ctx.model)]
    found = []
    for row in ROWS:
        loss = standard_loss(ctx.model, ctx.collate([row]))
        found.append(list(torch.autograd.grad(loss, params)))
    return found


def test_clipped_sum_is_the_sum_of_clipped_per_example_gradients() -> None:
    ctx = context()
    params = [p for _, p in trainable_parameters(ctx.model)]
    grads = per_example_grads(ctx)
    norms = [float(torch.sqrt(sum(g.pow(2).sum() for g in gs))) for gs in grads]
    clip = statistics.median(norms)
    sums, _, clipped = clipped_gradient_sum(ctx, ROWS, params, clip, standard_loss,
                                            torch.autocast("cpu", enabled=False))
    expected = [sum(gs[i] * min(1.0, clip / n) for gs, n in zip(grads, norms, strict=True))
                for i in range(len(params))]
    for got, want in zip(sums, expected, strict=True):
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)
    assert clipped == sum(n > clip for n in norms)
    # a clip above every norm gives the plain summed gradient of the batch
    unclipped, _, none = clipped_gradient_sum(ctx, ROWS, params, 10 * max(norms),
                                              standard_loss,
                                              torch.autocast("cpu", enabled=False))
    assert none == 0
    for got, gs in zip(unclipped, zip(*grads, strict=True), strict=True):
        assert torch.allclose(got, sum(gs), atol=1e-6)


def test_noise_scale_of_a_step(monkeypatch) -> None:
    ctx = context()
    params = [p for _, p in trainable_parameters(ctx.model)]
    monkeypatch.setattr(dp_sgd, "clipped_gradient_sum", lambda c, rows, ps, *a: (
        [torch.zeros_like(p) for p in ps], 0.0, 0))
    before = [p.detach().clone() for p in params]
    local = LocalTrainingConfig(steps=1, batch_size=4, optimizer="sgd", lr=1.0,
                                group_by_length=False)
    cfg = DPSGDConfig(noise_multiplier=2.0, max_grad_norm=0.5)
    dp_sgd.train_dp_sgd(ctx, local, cfg)
    moved = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, params,
                                                                     strict=True)])
    expected = 2.0 * 0.5 / 4  # sigma C over the expected batch q n = 4
    assert float(moved.std()) == pytest.approx(expected, rel=0.05)


def test_poisson_batches_have_rate_q() -> None:
    generator = torch.Generator().manual_seed(0)
    sizes = [len(poisson_batch(200, 0.05, generator)) for _ in range(500)]
    assert statistics.mean(sizes) == pytest.approx(10, rel=0.05)
    assert min(sizes) < 7 and max(sizes) > 13


@pytest.mark.parametrize(("rate", "sigma", "steps", "delta"),
                         [(0.01, 1.0, 1000, 1e-5), (0.1, 1.5, 50, 1e-6), (0.25, 0.9, 12, 1e-3)])
def test_client_epsilon_matches_dp_accounting(rate, sigma, steps, delta) -> None:
    library = rdp.RdpAccountant()
    library.compose(dp_accounting.PoissonSampledDpEvent(
        rate, dp_accounting.GaussianDpEvent(sigma)), steps)
    expected = library.get_epsilon(delta)
    ours = client_epsilon(rate, sigma, steps, delta)
    assert ours <= expected * (1 + 1e-9) and ours == pytest.approx(expected, rel=0.02)


def test_end_to_end_per_client_accounting_accumulates(cls_config) -> None:
    config = cls_config(federation={"num_clients": 3, "clients_per_round": 2, "rounds": 3},
                        algorithm={"local": {"steps": 2, "batch_size": 4}},
                        privacy={"dp_sgd": {"noise_multiplier": 1.1, "max_grad_norm": 0.5,
                                            "delta": 1e-4}})
    result = api.run(config)
    sizes = result.summary["client_train_sizes"]
    taken: dict[str, int] = {}
    for record in result.metrics:
        for client, entry in record["clients"].items():
            taken[client] = taken.get(client, 0) + 2
            assert entry["dp_sgd_steps_total"] == taken[client]
            rate = min(1.0, 4 / sizes[int(client)])
            assert entry["dp_sgd_epsilon"] == pytest.approx(
                client_epsilon(rate, 1.1, taken[client], 1e-4), rel=1e-12)
    budgets = result.summary["privacy"]["dp_sgd"]
    assert budgets["max_client_epsilon"] == max(budgets["client_epsilon"].values())
    assert set(budgets["client_epsilon"]) == set(taken)


def test_dp_sgd_config_rules(cls_config, lm_config) -> None:
    with pytest.raises(ConfigError, match="grad_accum: 1"):
        cls_config(algorithm={"local": {"grad_accum": 2}},
                   privacy={"dp_sgd": {"noise_multiplier": 1.0}})
    with pytest.raises(ConfigError, match="cannot be combined with algorithm.local.packing"):
        lm_config(algorithm={"local": {"packing": True}},
                  privacy={"dp_sgd": {"noise_multiplier": 1.0}})
