"""Local training on one client: the loop every client procedure shares.

Steps or epochs, batch size, gradient accumulation, AdamW or SGD, a warmup + constant / linear /
cosine schedule, gradient-norm clipping, and bf16 autocast when the runtime asks for it.
Algorithms hook in without copying the loop: ``grad_hook`` edits the accumulated gradients
before clipping and the optimizer step (FedProx's proximal gradient, SCAFFOLD's correction).
Batches are drawn with a generator seeded by the client's round seed, so a client's round is
reproducible bit for bit. Each micro-batch's loss is the model's mean over that batch; with
gradient accumulation the micro-batch means are averaged (as Hugging Face's Trainer does), and
the learning-rate schedule runs over one client's local steps (it restarts every round).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from fedfm.config import LocalTrainingConfig
from fedfm.core.algorithm import ClientContext
from fedfm.data.packing import pack_examples
from fedfm.models.fused_loss import standard_loss

NamedParams = list[tuple[str, torch.nn.Parameter]]
GradHook = Callable[[NamedParams], None]


@dataclass
class LocalTrainingResult:
    steps: int
    examples_seen: int
    mean_loss: float
    lr_sum: float  # sum of the learning rates actually applied (SCAFFOLD's K * lr)
    final_lr: float
    useful_tokens: int = 0  # real (non-padding) tokens fed to the model
    processed_tokens: int = 0  # tokens the model computed on, padding included

    def metrics(self) -> dict[str, float]:
        return {"train_loss": self.mean_loss, "steps": float(self.steps),
                "examples_seen": float(self.examples_seen),
                "useful_tokens": float(self.useful_tokens),
                "processed_tokens": float(self.processed_tokens)}


def trainable_parameters(model: torch.nn.Module) -> NamedParams:
    seen: set[int] = set()
    named: NamedParams = []
    for name, param in model.named_parameters():
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            named.append((name, param))
    return named


def batches_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches in one shuffled pass (``batch_indices`` drops the ragged tail)."""
    return max(1, num_examples // batch_size)


def num_optimizer_steps(cfg: LocalTrainingConfig, num_examples: int) -> int:
    """``cfg.steps`` when set, else ``ceil(epochs * batches_per_epoch) / grad_accum`` (>= 1)."""
    if cfg.steps is not None:
        return cfg.steps
    assert cfg.epochs is not None
    micro_batches = math.ceil(cfg.epochs * batches_per_epoch(num_examples, cfg.batch_size))
    return max(1, micro_batches // cfg.grad_accum)


def group_by_length(order: list[int], lengths: Sequence[int], batch_size: int,
                    generator: torch.Generator, window: int = 50) -> list[int]:
    """Reorder one shuffled epoch so each batch holds examples of similar length (less padding,
    as Hugging Face Trainer's ``group_by_length``): sort windows of ``window`` batches by
    length, cut them into batches, shuffle the full batches; a ragged batch goes last."""
    span = batch_size * window
    full: list[list[int]] = []
    ragged: list[int] = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start:start + span], key=lambda i: -lengths[i])
        for offset in range(0, len(chunk), batch_size):
            batch = chunk[offset:offset + batch_size]
            if len(batch) == batch_size:
                full.append(batch)
            else:
                ragged.extend(batch)
    shuffled = torch.randperm(len(full), generator=generator).tolist()
    return [i for b in shuffled for i in full[b]] + ragged


def batch_indices(num_examples: int, batch_size: int, num_batches: int,
                  generator: torch.Generator,
                  lengths: Sequence[int] | None = None) -> Iterator[list[int]]:
    """Shuffled epochs, concatenated; every batch is full unless the data set is smaller.
    With ``lengths``, each epoch is grouped by length (``group_by_length``)."""
    produced = 0
    while produced < num_batches:
        order = torch.randperm(num_examples, generator=generator).tolist()
        if lengths is not None:
            order = group_by_length(order, lengths, batch_size, generator)
        for start in range(0, num_examples, batch_size):
            chunk = order[start:start + batch_size]
            if len(chunk) < batch_size and num_examples >= batch_size:
                break  # drop the ragged tail: full batches keep steps comparable
            yield chunk
            produced += 1
            if produced == num_batches:
                return


def build_optimizer(params: Sequence[torch.nn.Parameter],
                    cfg: LocalTrainingConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas,
                                 weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


def lr_factor(step: int, total_steps: int, cfg: LocalTrainingConfig) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step`` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    if cfg.schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def training_examples(ctx: ClientContext, cfg: LocalTrainingConfig) -> list[dict[str, Any]]:
    """The client's examples as batches will draw them: packed rows when ``cfg.packing``."""
    examples = ctx.train_examples
    if not cfg.packing:
        return examples
    if ctx.max_length is None:
        raise ValueError("algorithm.local.packing needs the model's max_length")
    if examples and "labels" in examples[0] and not isinstance(examples[0]["labels"], list):
        raise ValueError("algorithm.local.packing applies to causal LM data only")
    return pack_examples(examples, ctx.max_length)


class LocalTrainer:
    """One client's local optimization, step by step: the ``local`` runtime drives it alone
    (``train_locally``), the ``batched`` runtime drives K of them in lockstep and computes
    their losses in one joint forward/backward. Batches, optimizer, schedule, gradient hook
    and clipping are this object's, so both runtimes train each client identically."""

    def __init__(self, ctx: ClientContext, cfg: LocalTrainingConfig, named: NamedParams, *,
                 grad_hook: GradHook | None = None) -> None:
        if not ctx.train_examples:
            raise ValueError(f"client {ctx.client_id} has no training examples")
        self.ctx, self.cfg, self.named, self.grad_hook = ctx, cfg, named, grad_hook
        self.examples = training_examples(ctx, cfg)
        self.params = [p for _, p in named]
        self.optimizer = build_optimizer(self.params, cfg)
        self.total_steps = num_optimizer_steps(cfg, len(self.examples))
        generator = torch.Generator().manual_seed(ctx.seed)
        self.has_tokens = "input_ids" in self.examples[0]
        lengths = ([len(ex["input_ids"]) for ex in self.examples]
                   if cfg.group_by_length and self.has_tokens else None)
        self._batches = batch_indices(len(self.examples), cfg.batch_size,
                                      self.total_steps * cfg.grad_accum, generator, lengths)
        self.step = 0
        self.lr = cfg.lr
        self._loss_sum, self._loss_count, self._examples_seen, self._lr_sum = 0.0, 0, 0, 0.0
        self._useful, self._processed = 0, 0

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    def start_step(self) -> None:
        self.lr = self.cfg.lr * lr_factor(self.step, self.total_steps, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    def next_rows(self) -> list[dict[str, Any]]:
        """The next micro-batch's examples."""
        return [self.examples[i] for i in next(self._batches)]

    def record(self, loss: float, rows: list[dict[str, Any]], processed_tokens: int) -> None:
        self._loss_sum += loss
        self._loss_count += 1
        self._examples_seen += sum(int(row.get("num_examples", 1)) for row in rows)
        if self.has_tokens:
            self._useful += sum(len(row["input_ids"]) for row in rows)
            self._processed += processed_tokens

    def finish_step(self) -> None:
        """Gradient hook, clipping, optimizer step (gradients already accumulated)."""
        if self.grad_hook is not None:
            self.grad_hook(self.named)
        if self.cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._lr_sum += self.lr
        self.step += 1

    def result(self) -> LocalTrainingResult:
        return LocalTrainingResult(
            steps=self.total_steps, examples_seen=self._examples_seen,
            mean_loss=self._loss_sum / max(self._loss_count, 1), lr_sum=self._lr_sum,
            final_lr=self.lr, useful_tokens=self._useful, processed_tokens=self._processed)


def train_locally(ctx: ClientContext, cfg: LocalTrainingConfig, *,
                  grad_hook: GradHook | None = None) -> LocalTrainingResult:
    """Run the configured local optimization on ``ctx.model`` in place."""
    trainer = LocalTrainer(ctx, cfg, trainable_parameters(ctx.model), grad_hook=grad_hook)
    torch.manual_seed(ctx.seed)  # dropout and any other stochastic layers
    autocast = client_autocast(ctx)
    loss_fn = ctx.loss_fn or standard_loss
    ctx.model.train()
    while not trainer.done:
        trainer.start_step()
        for _ in range(cfg.grad_accum):
            rows = trainer.next_rows()
            batch = _to_device(ctx.collate(rows), ctx.device)
            with autocast:
                loss = loss_fn(ctx.model, batch)
            (loss / cfg.grad_accum).backward()
            trainer.record(float(loss.detach()), rows,
                           batch["input_ids"].numel() if trainer.has_tokens else 0)
        trainer.finish_step()
    return trainer.result()


def client_autocast(ctx: ClientContext) -> Any:
    """The client's autocast context (bf16 when the runtime asks for it, else none)."""
    if ctx.autocast_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=ctx.device.type, dtype=ctx.autocast_dtype)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def ensure_grads(named: NamedParams) -> None:
    """Give every trainable parameter a gradient tensor (zeros where backward left None)."""
    for _, param in named:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
