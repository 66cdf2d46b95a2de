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


def without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model.train()  # Opacus records activations only in training mode


@pytest.mark.parametrize(("model_name", "task"), [("tiny-bert", "classification"),
                                                  ("tiny-llama", "causal_lm")])
def test_opacus_per_sample_sums_equal_the_per_example_loop(model_name, task) -> None:
    bundle = load_model(ModelConfig(name=model_name), seed=0, num_labels=2)
    bundle = apply_adapter(bundle, AdapterConfig(kind="lora", r=4, train_head=True), seed=0)
    model = without_dropout(bundle.model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    # rows of different lengths: the batched path pads, the loop never does
    ids = [[1, 5 + i, 60 + i, 7, 2][: 2 + i % 4] for i in range(10)]
    rows = [{"input_ids": row, "attention_mask": [1] * len(row),
             "labels": i % 2 if task == "classification" else row}
            for i, row in enumerate(ids)]
    ctx = ClientContext(client_id=0, round=1, seed=0, model=model,
                        get_state=lambda: get_state(model), set_state=lambda s: None,
                        train_examples=rows, device=torch.device("cpu"),
                        collate=lambda r: collate(r, pad_token_id=0, task=task))
    params = [p for _, p in trainable_parameters(model)]
    assert dp_sgd.opacus_covers(model)
    off = torch.autocast("cpu", enabled=False)
    loop_sums, loop_loss, _ = clipped_gradient_sum(ctx, rows, params, 1e9, standard_loss, off)
    norms = []
    for row in rows:
        grads = torch.autograd.grad(standard_loss(model, ctx.collate([row])), params,
                                    allow_unused=True)
        norms.append(float(torch.sqrt(sum(g.pow(2).sum() for g in grads if g is not None))))
    clip = statistics.median(norms)
    wanted = {bound: clipped_gradient_sum(ctx, rows, params, bound, standard_loss, off)
              for bound in (1e9, clip)}
    with dp_sgd.OpacusPerSample(model, params, microbatch=4) as engine:
        for bound, (want, want_loss, want_clipped) in wanted.items():
            got, got_loss, got_clipped = engine.clipped_sum(ctx, rows, bound, off)
            assert got_clipped == want_clipped and got_loss == pytest.approx(want_loss, rel=1e-5)
            for g, w in zip(got, want, strict=True):
                assert torch.allclose(g, w, atol=1e-5, rtol=1e-4)
        assert engine.clipped_sum(ctx, [], clip, off)[0][0].abs().sum() == 0
    assert loop_loss > 0 and any(s.abs().sum() > 0 for s in loop_sums)
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in params)


def test_layers_opacus_does_not_cover_fall_back_to_the_loop() -> None:
    bundle = load_model(ModelConfig(name="tiny-bert"), seed=0, num_labels=2)
    bundle = apply_adapter(bundle, AdapterConfig(kind="ia3"), seed=0)
    ctx = context()
    ctx.model = bundle.model
    params = [p for _, p in trainable_parameters(bundle.model)]
    assert not dp_sgd.opacus_covers(bundle.model)
    assert dp_sgd._per_sample_engine(ctx, params, DPSGDConfig(noise_multiplier=1.0), 4) is None
    with pytest.raises(ConfigError, match="per_sample is 'opacus'"):
        dp_sgd._per_sample_engine(ctx, params,
                                  DPSGDConfig(noise_multiplier=1.0, per_sample="opacus"), 4)


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
