"""Sample-level DP-SGD inside each client's local training.

Abadi et al., "Deep Learning with Differential Privacy", CCS 2016: every local step samples the
client's examples with Poisson rate ``q = batch_size / n``, clips each example's gradient of the
trainable (adapter) parameters to ``max_grad_norm`` in L2, adds ``N(0, (sigma C)^2)`` to their sum
and divides by the expected batch size ``q n``; the optimizer then steps as usual. Only the
adapter's gradients are ever held per example, so memory grows with the adapter, not the base
model.

Per-example gradients come from Opacus' per-sample gradient hooks (Yousefpour et al., "Opacus:
User-Friendly Differential Privacy Library in PyTorch", 2021) over one padded batch whenever every
trainable layer is one Opacus covers (LoRA's A and B and a classifier head are plain ``Linear``
layers, so LoRA always is). Otherwise (IA3's scaling vectors, prompt embeddings, LoRA on an
embedding) they come from one backward pass per example on the example alone, with
``torch.autograd.grad`` restricted to the trainable parameters: ``torch.func.vmap`` over the whole
model cannot trace Hugging Face models, whose attention-mask code branches on tensor values
(``padding_mask.all()``), and Opacus' own ``torch.func`` fallback fails on peft's IA3 layers.
Both paths give the same clipped sums (tested); padding never leaks into another row's gradient
because padded positions carry no loss and are masked out of attention.

Accounting is per client (each client's own examples are what is protected): a client that has
taken ``T`` DP-SGD steps on ``n`` examples has spent the epsilon of ``T`` Poisson-sampled Gaussian
mechanisms with rate ``batch_size / n`` (dp-accounting's RDP accountant). The step count lives in
the client's persistent state, so it survives rounds and resumes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
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
from fedfm.config import ConfigError, DPSGDConfig
from fedfm.core.algorithm import ClientContext, ClientResult
from fedfm.core.update import Broadcast
from fedfm.models.fused_loss import standard_loss
from fedfm.models.per_example import per_example_loss
from fedfm.trust.privacy.accountant import make_accountant, quiet_absl
from fedfm.trust.privacy.client_dp import noise_generator

logger = logging.getLogger(__name__)

STATE_KEY = "dp_sgd"  # client state: {"steps": tensor([T])}


def poisson_batch(num_examples: int, rate: float, generator: torch.Generator) -> list[int]:
    """Indices of the examples this step samples, each independently with probability rate."""
    draws = torch.rand(num_examples, generator=generator)
    return torch.nonzero(draws < rate).flatten().tolist()


def clipped_gradient_sum(ctx: ClientContext, rows: list[dict[str, Any]],
                         params: list[torch.nn.Parameter], clip: float, loss_fn: Any,
                         autocast: Any) -> tuple[list[torch.Tensor], float, int]:
    """Sum over ``rows`` of each example's gradient clipped to ``clip`` in L2 (over all
    trainable tensors together); the mean loss and how many examples were clipped. One backward
    pass per example."""
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


def opacus_covers(model: torch.nn.Module) -> bool:
    """Whether every module that owns a trainable parameter has an Opacus per-sample rule."""
    from opacus.grad_sample import GradSampleModule

    for module in model.modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)) and \
                type(module) not in GradSampleModule.GRAD_SAMPLERS:
            return False
    return True


class OpacusPerSample:
    """Per-example gradients of the trainable parameters from Opacus' hooks, batch by batch; a
    context manager that removes the hooks (and the ``grad_sample`` fields) on exit."""

    def __init__(self, model: torch.nn.Module, params: list[torch.nn.Parameter],
                 microbatch: int) -> None:
        from opacus.grad_sample import GradSampleModule

        self.model = model
        self.params = params
        self.microbatch = max(1, microbatch)
        self.hooks = GradSampleModule(model, batch_first=True, loss_reduction="sum",
                                      strict=True)

    def __enter__(self) -> OpacusPerSample:
        return self

    def __exit__(self, *exc: object) -> None:
        self.hooks._close()

    def clipped_sum(self, ctx: ClientContext, rows: list[dict[str, Any]], clip: float,
                    autocast: Any) -> tuple[list[torch.Tensor], float, int]:
        """Same contract as :func:`clipped_gradient_sum`."""
        sums = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        total_loss, clipped = 0.0, 0
        for start in range(0, len(rows), self.microbatch):
            batch = ctx.collate(rows[start:start + self.microbatch])
            with autocast:
                losses = per_example_loss(self.model, batch)
            with warnings.catch_warnings():
                # the first hooked layer's input (the embeddings) needs no gradient; torch warns
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                losses.sum().backward()
            samples = [self._grad_sample(p, len(losses)) for p in self.params]
            norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in samples))
            factors = _clip_factor(norms, clip)
            for total, g in zip(sums, samples, strict=True):
                total.add_(torch.einsum("b,b...->...", factors, g))
            clipped += int((norms > clip).sum())
            total_loss += float(losses.detach().sum())
            self.hooks.zero_grad(set_to_none=True)
        return sums, total_loss / max(len(rows), 1), clipped

    @staticmethod
    def _grad_sample(param: torch.nn.Parameter, rows: int) -> torch.Tensor:
        sample = getattr(param, "grad_sample", None)
        if sample is None:  # the parameter took no part in this batch's loss
            return torch.zeros((rows, *param.shape), dtype=torch.float32)
        return sample.float()


def _per_sample_engine(ctx: ClientContext, params: list[torch.nn.Parameter],
                       cfg: DPSGDConfig, microbatch: int) -> OpacusPerSample | None:
    """Opacus hooks when configured or covered (``auto``); None: the per-example loop."""
    if cfg.per_sample == "loop":
        return None
    if not opacus_covers(ctx.model):
        if cfg.per_sample == "opacus":
            raise ConfigError("privacy.dp_sgd.per_sample is 'opacus' but a trainable layer of "
                              "this model has no Opacus per-sample rule (e.g. IA3 or prompt "
                              "tuning); use 'auto' or 'loop'")
        logger.info("DP-SGD: a trainable layer has no Opacus per-sample rule; computing "
                    "per-example gradients one example at a time")
        return None
    if ctx.loss_fn is not None and ctx.loss_fn is not standard_loss:
        logger.debug("DP-SGD with Opacus scores examples with their unfused per-example loss")
    return OpacusPerSample(ctx.model, params, microbatch)


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
    engine = _per_sample_engine(ctx, params, cfg, local.batch_size)
    with engine or contextlib.nullcontext():
        while not trainer.done:
            trainer.start_step()
            rows = [examples[i] for i in poisson_batch(len(examples), rate, batches)]
            if engine is not None:
                sums, loss, clipped_now = engine.clipped_sum(ctx, rows, cfg.max_grad_norm,
                                                             autocast)
            else:
                sums, loss, clipped_now = clipped_gradient_sum(
                    ctx, rows, params, cfg.max_grad_norm, loss_fn, autocast)
            _set_noised_gradients(params, sums, rate * len(examples), cfg, noise)
            trainer.record(loss, rows, 0)
            clipped += clipped_now
            sampled += len(rows)
            trainer.finish_step()
    stats = {"dp_sgd_rate": rate, "dp_sgd_clipped_fraction": clipped / max(sampled, 1),
             "dp_sgd_sampled_examples": float(sampled)}
    return trainer.result(), stats


def _set_noised_gradients(params: list[torch.nn.Parameter], sums: list[torch.Tensor],
                          expected_batch: float, cfg: DPSGDConfig,
                          noise: torch.Generator) -> None:
    """``grad = (clipped sum + N(0, (sigma C)^2)) / (q n)``, the DP-SGD step's gradient."""
    for param, total in zip(params, sums, strict=True):
        drawn = torch.randn(total.shape, generator=noise, dtype=torch.float32)
        param.grad = ((total + drawn * cfg.noise_multiplier * cfg.max_grad_norm)
                      / expected_batch).to(param.dtype)


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
