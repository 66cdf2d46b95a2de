"""Logit distillation on public batches: the teacher's logits once, then Adam steps on the
student's trainable parameters against the temperature-softened teacher (Hinton, Vinyals &
Dean, "Distilling the Knowledge in a Neural Network", NIPS Deep Learning Workshop 2015)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedfm.core.state import State

Batch = dict[str, torch.Tensor]


@dataclass
class ModelView:
    """A model and how to run it: its device, autocast dtype and State setter."""

    model: torch.nn.Module
    device: torch.device
    autocast_dtype: torch.dtype | None
    set_state: Callable[[Mapping[str, torch.Tensor]], None]

    def autocast(self) -> object:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def logits(self, batch: Batch) -> torch.Tensor:
        moved = {k: v.to(self.device) for k, v in batch.items()}
        with self.autocast():
            return self.model(**moved).logits.float()


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None,
            temperature: float) -> torch.Tensor:
    """``T^2 KL(softmax(teacher / T) || softmax(student / T))``, averaged over examples
    (classification logits ``[B, C]``) or over the tokens ``mask`` keeps (``[B, L, V]``)."""
    log_student = F.log_softmax(student / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    per_row = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
    if student.dim() == 3:
        keep = mask.to(per_row.dtype) if mask is not None else torch.ones_like(per_row)
        return per_row.mul(keep).sum() / keep.sum().clamp_min(1.0) * temperature ** 2
    return per_row.mean() * temperature ** 2


def _storage_dtype(logits: torch.Tensor) -> torch.dtype:
    # token-level logits are [B, L, V]: bfloat16 halves what the round holds in memory
    return torch.bfloat16 if logits.dim() == 3 else torch.float32


@torch.no_grad()
def ensemble_logits(view: ModelView, states: Sequence[State], batches: Sequence[Batch],
                    weights: Sequence[float] | None = None) -> list[torch.Tensor]:
    """Per batch, the (weighted) mean of the logits of the model under each State."""
    if not states:
        raise ValueError("an ensemble needs at least one member")
    share = [1.0 / len(states)] * len(states) if weights is None else \
        [w / sum(weights) for w in weights]
    view.model.eval()
    sums: list[torch.Tensor | None] = [None] * len(batches)
    for state, weight in zip(states, share, strict=True):
        view.set_state(state)
        for index, batch in enumerate(batches):
            part = view.logits(batch).cpu() * weight
            sums[index] = part if sums[index] is None else sums[index] + part
    return [total.to(_storage_dtype(total)) for total in sums if total is not None]


@torch.no_grad()
def mean_kd_loss(view: ModelView, batches: Sequence[Batch], teacher: Sequence[torch.Tensor],
                 temperature: float) -> float:
    """The distillation loss of the model as it is, over every public batch."""
    view.model.eval()
    total, count = 0.0, 0
    for batch, target in zip(batches, teacher, strict=True):
        mask = batch["attention_mask"].to(view.device)
        loss = kd_loss(view.logits(batch), target.to(view.device), mask, temperature)
        total += float(loss) * len(batch["input_ids"])
        count += len(batch["input_ids"])
    return total / max(count, 1)


def distill(view: ModelView, batches: Sequence[Batch], teacher: Sequence[torch.Tensor], *,
            steps: int, lr: float, temperature: float, seed: int) -> dict[str, float]:
    """``steps`` Adam steps on the trainable parameters of ``view.model`` towards the teacher's
    logits, one shuffled public batch per step. The model stays in eval mode (no dropout): the
    teacher's logits were taken that way, and at matching logits the gradient is then exactly
    zero."""
    params = [p for p in view.model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("distillation: the student has no trainable parameter")
    before = mean_kd_loss(view, batches, teacher, temperature)
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    view.model.eval()
    for _ in range(steps):
        if not order:
            order = torch.randperm(len(batches), generator=generator).tolist()
        index = order.pop()
        batch = batches[index]
        optimizer.zero_grad(set_to_none=True)
        loss = kd_loss(view.logits(batch), teacher[index].to(view.device),
                       batch["attention_mask"].to(view.device), temperature)
        loss.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    after = mean_kd_loss(view, batches, teacher, temperature)
    return {"kd_loss_before": before, "kd_loss_after": after, "steps": float(steps)}
