"""Zeroth-order steps shared by FedKSeed and FedZO: Gaussian directions regenerated from a seed
(never stored), the two-point estimate, and the in-place update (the MeZO recipe: Malladi,
Gao, Nichani, Damian, Lee, Chen & Arora, "Fine-Tuning Language Models with Just Forward Passes",
NeurIPS 2023). Only forward passes under ``torch.no_grad``: no activations are kept for a
backward pass, so memory stays near inference.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedfm.config import LocalTrainingConfig
from fedfm.core.algorithm import ClientContext
from fedfm.core.state import State

Named = Sequence[tuple[str, torch.Tensor]]


def directions(seed: int, shapes: Iterable[tuple[str, torch.Size]]
               ) -> Iterable[tuple[str, torch.Tensor]]:
    """``z ~ N(0, I)`` over the named tensors, drawn in sorted-name order from ``seed``: the
    client and the server regenerate the same ``z`` whatever order they hold the tensors in."""
    generator = torch.Generator().manual_seed(seed)
    for name, shape in sorted(shapes, key=lambda item: item[0]):
        yield name, torch.randn(shape, generator=generator, dtype=torch.float32)


def add_direction(named: Named, seed: int, scale: float) -> None:
    """``theta += scale * z(seed)`` in place."""
    params = dict(named)
    with torch.no_grad():
        for name, z in directions(seed, ((n, p.shape) for n, p in named)):
            param = params[name]
            param.add_(z.to(device=param.device, dtype=param.dtype), alpha=scale)


def dense_step(like: Mapping[str, torch.Tensor], steps: Iterable[tuple[int, float]],
               lr: float) -> State:
    """``-lr sum_t g_t z(seed_t)`` shaped like ``like`` (float32): what a sequence of
    zeroth-order steps did to the parameters, replayed from seeds and scalars."""
    total: State = OrderedDict((k, torch.zeros(v.shape, dtype=torch.float32))
                               for k, v in like.items())
    shapes = [(k, v.shape) for k, v in like.items()]
    for seed, grad in steps:
        for name, z in directions(seed, shapes):
            total[name].add_(z, alpha=-lr * grad)
    return total


def two_point(ctx: ClientContext, named: Named, batch: dict[str, torch.Tensor], seed: int,
              eps: float, loss_of: Callable[[dict[str, torch.Tensor]], torch.Tensor]
              ) -> tuple[float, float]:
    """``((L(theta + eps z) - L(theta - eps z)) / 2 eps, mean of the two losses)``; the
    parameters are back at ``theta`` afterwards (up to float rounding, as in MeZO)."""
    add_direction(named, seed, eps)
    plus = float(loss_of(batch))
    add_direction(named, seed, -2.0 * eps)
    minus = float(loss_of(batch))
    add_direction(named, seed, eps)
    return (plus - minus) / (2.0 * eps), 0.5 * (plus + minus)


def loss_function(ctx: ClientContext) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    from fedfm.algorithms.local_train import client_autocast
    from fedfm.models.fused_loss import standard_loss

    loss_fn = ctx.loss_fn or standard_loss
    autocast = client_autocast(ctx)

    def loss_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad(), autocast:
            return loss_fn(ctx.model, batch)

    return loss_of


def device_batch(ctx: ClientContext, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    batch = ctx.collate(rows)
    if ctx.device.type == "cpu":
        return batch
    return {k: v.to(ctx.device, non_blocking=True) for k, v in batch.items()}


@dataclass
class ZerothOrderRun:
    """What a client's zeroth-order round works with: its trainable tensors, the loss, its
    seeded generator and its batches (one per step, as local training would draw them)."""

    named: Named
    loss_of: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    generator: torch.Generator
    batches: Iterator[dict[str, torch.Tensor]]
    steps: int


def start_run(ctx: ClientContext, local: LocalTrainingConfig) -> ZerothOrderRun:
    from fedfm.algorithms.local_train import (
        batch_indices,
        num_optimizer_steps,
        trainable_parameters,
        training_examples,
    )

    if not ctx.train_examples:
        raise ValueError(f"client {ctx.client_id} has no training examples")
    examples = training_examples(ctx, local)
    steps = num_optimizer_steps(local, len(examples))
    generator = torch.Generator().manual_seed(ctx.seed)
    ctx.model.eval()  # both passes of a step must see the same function (no dropout)
    rows = batch_indices(len(examples), local.batch_size, steps, generator)
    batches = (device_batch(ctx, [examples[i] for i in chunk]) for chunk in rows)
    return ZerothOrderRun(trainable_parameters(ctx.model), loss_function(ctx), generator,
                          batches, steps)
