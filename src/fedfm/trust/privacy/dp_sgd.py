"""Sample-level DP-SGD inside each client's local training.

Abadi et al., "Deep Learning with Differential Privacy", CCS 2016: every local step samples the
client's examples with Poisson rate ``q = batch_size / n``, clips each example's gradient of the
trainable (adapter) parameters to ``max_grad_norm`` in L2, adds ``N(0, (sigma C)^2)`` to their sum
and divides by the expected batch size ``q n``; the optimizer then steps as usual. Only the
adapter's gradients are ever held per example, so memory grows with the adapter, not the base
model.

Per-example gradients come from one backward pass per sampled example, on the example alone (no
padding), with ``torch.autograd.grad`` restricted to the trainable parameters. Written here
rather than taken from a library: Opacus' per-sample hooks do not cover peft's LoRA / IA3 layers
on every architecture fedfm trains, and ``torch.func.vmap`` cannot trace Hugging Face models,
whose attention-mask code branches on tensor values (``padding_mask.all()``).

Accounting is per client (each client's own examples are what is protected): a client that has
taken ``T`` DP-SGD steps on ``n`` examples has spent the epsilon of ``T`` Poisson-sampled Gaussian
mechanisms with rate ``batch_size / n`` (dp-accounting's RDP accountant). The step count lives in
the client's persistent state, so it survives rounds and resumes.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import dp_accounting
import torch

from fedfm.algorithms.local_train import (
    LocalTrainer,
    LocalTrainingResult,
    client_autocast,
    trainable_parameters,
)
from fedfm.config import DPSGDConfig
from fedfm.core.algorithm import ClientContext, ClientResult
from fedfm.core.update import Broadcast
from fedfm.models.fused_loss import standard_loss
from fedfm.trust.privacy.accountant import make_accountant, quiet_absl
from fedfm.trust.privacy.client_dp import noise_generator

STATE_KEY = "dp_sgd"  # client state: {"steps": tensor([T])}


def poisson_batch(num_examples: int, rate: float, generator: torch.Generator) -> list[int]:
    """Indices of the examples this step samples, each independently with probability rate."""
    draws = torch.rand(num_examples, generator=generator)
    return torch.nonzero(draws < rate).flatten().tolist()


def clipped_gradient_sum(ctx: ClientContext, rows: list[dict[str, Any]],
                         params: list[torch.nn.Parameter], clip: float, loss_fn: Any,
                         autocast: Any) -> tuple[list[torch.Tensor], float, int]:
    """Sum over ``rows`` of each example's gradient clipped to ``clip`` in L2 (over all
    trainable tensors together); the mean loss and how many examples were clipped."""
    sums = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    total_loss, clipped = 0.0, 0
    for row in rows:
        batch = ctx.collate([row])
        with autocast:
            loss = loss_fn(ctx.model, batch)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [g if g is not None else torch.zeros_like(p)
                 for g, p in zip(grads, params, strict=True)]
        norm = torch.sqrt(sum(g.float().pow(2).sum() for g in grads))
        factor = _clip_factor(norm, clip)
        clipped += int(float(norm) > clip)
        for total, g in zip(sums, grads, strict=True):
            total.add_(g.float() * factor)
        total_loss += float(loss.detach())
    return sums, total_loss / max(len(rows), 1), clipped


def _clip_factor(norm: torch.Tensor, clip: float) -> torch.Tensor:
    return torch.clamp(clip / (norm + 1e-12), max=1.0)


def train_dp_sgd(ctx: ClientContext, local: Any, cfg: DPSGDConfig, *,
                 grad_hook: Any = None) -> tuple[LocalTrainingResult, dict[str, float]]:
    """DP-SGD local training on ``ctx.model`` in place; the result and DP statistics."""
    named = trainable_parameters(ctx.model)
    trainer = LocalTrainer(ctx, local, named, grad_hook=grad_hook)
    params = [p for _, p in named]
    examples = trainer.examples
    rate = min(1.0, local.batch_size / len(examples))
    batches = torch.Generator().manual_seed(ctx.seed + 1)
    noise = noise_generator(ctx.seed + 2, cfg.secure_noise)
    torch.manual_seed(ctx.seed)
    loss_fn = ctx.loss_fn or standard_loss
    autocast = client_autocast(ctx)
    ctx.model.train()
    clipped = sampled = 0
    while not trainer.done:
        trainer.start_step()
        rows = [examples[i] for i in poisson_batch(len(examples), rate, batches)]
        sums, loss, clipped_now = clipped_gradient_sum(
            ctx, rows, params, cfg.max_grad_norm, loss_fn, autocast)
        expected = rate * len(examples)
        for param, total in zip(params, sums, strict=True):
            drawn = torch.randn(total.shape, generator=noise, dtype=torch.float32)
            param.grad = ((total + drawn * cfg.noise_multiplier * cfg.max_grad_norm)
                          / expected).to(param.dtype)
        trainer.record(loss, rows, 0)
        clipped += clipped_now
        sampled += len(rows)
        trainer.finish_step()
    stats = {"dp_sgd_rate": rate, "dp_sgd_clipped_fraction": clipped / max(sampled, 1),
             "dp_sgd_sampled_examples": float(sampled)}
    return trainer.result(), stats


class DPSGDClient:
    """Wraps a delta client (FedAvg, FedProx, SCAFFOLD, FedOpt): its local training becomes
    DP-SGD; its update and state are built from the result as usual; per-client accounting."""

    def __init__(self, inner: Any, cfg: DPSGDConfig, delta: float) -> None:
        self.inner = inner
        self.cfg = cfg
        self.delta = delta

    def run(self, ctx: ClientContext, broadcast: Broadcast) -> ClientResult:
        result, stats = train_dp_sgd(ctx, self.inner.local, self.cfg,
                                     grad_hook=self.inner.grad_hook(ctx, broadcast))
        finished = self.inner.finish(ctx, broadcast, result)
        previous = (ctx.client_state or {}).get(STATE_KEY)
        steps = (int(previous["steps"]) if previous is not None else 0) + result.steps
        epsilon = client_epsilon(stats["dp_sgd_rate"], self.cfg.noise_multiplier, steps,
                                 self.delta)
        finished.update.metrics.update(stats)
        finished.update.metrics["dp_sgd_epsilon"] = epsilon
        finished.update.metrics["dp_sgd_steps_total"] = float(steps)
        state = dict(finished.client_state or {})
        state[STATE_KEY] = OrderedDict(steps=torch.tensor([float(steps)]))
        return ClientResult(update=finished.update, client_state=state)


def client_epsilon(rate: float, noise_multiplier: float, steps: int, delta: float) -> float:
    """Epsilon of ``steps`` DP-SGD steps at Poisson rate ``rate`` (the per-client budget)."""
    if steps == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    accountant = make_accountant("rdp", "poisson")
    with quiet_absl():
        accountant.compose(dp_accounting.PoissonSampledDpEvent(
            rate, dp_accounting.GaussianDpEvent(noise_multiplier)), steps)
        return float(accountant.get_epsilon(delta))


def dp_sgd_budgets(metrics: list[dict[str, Any]]) -> dict[str, float]:
    """Each client's latest reported DP-SGD epsilon (clients that never trained: absent)."""
    latest: dict[str, float] = {}
    for record in metrics:
        for client, entry in record.get("clients", {}).items():
            if "dp_sgd_epsilon" in entry:
                latest[client] = entry["dp_sgd_epsilon"]
    return latest
