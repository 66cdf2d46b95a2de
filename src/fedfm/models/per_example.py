"""Each example's own loss in a padded batch, differentiable: what ``model(**batch).loss`` would
be on that example alone (cross-entropy for classifiers, token-mean cross-entropy over labelled
positions for causal and seq2seq LMs). DP-SGD clips per example and membership inference scores
per example; both need the batch's losses unreduced."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
TASKS = ("classification", "causal_lm", "seq2seq")


def infer_task(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> str:
    """``classification`` when labels are one per row, else ``seq2seq`` for encoder-decoder
    models and ``causal_lm`` otherwise."""
    if batch["labels"].dim() == 1:
        return "classification"
    config = getattr(model, "config", None)
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal_lm"


def per_example_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                     task: str | None = None) -> torch.Tensor:
    """Shape ``[rows]``: each row's loss, in fp32."""
    if "labels" not in batch:
        raise ValueError("per-example losses need batches that carry `labels`")
    task = task or infer_task(model, batch)
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    inputs: dict[str, Any] = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"]
    if task == "classification":
        logits = model(**inputs).logits.float()
        if logits.shape[-1] == 1:  # regression head: Hugging Face's loss is the squared error
            return (logits.view(-1) - labels.float().view(-1)).pow(2)
        return F.cross_entropy(logits, labels.long().view(-1), reduction="none")
    if task == "seq2seq":
        logits = model(**inputs, labels=labels, use_cache=False).logits.float()
        targets = labels
    else:
        logits = model(**inputs, use_cache=False).logits.float()
        logits = logits[:, -labels.shape[1]:][:, :-1]  # a cached prefix has no labels
        targets = labels[:, 1:]
    token = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none",
                            ignore_index=IGNORE_INDEX)
    counts = (targets != IGNORE_INDEX).sum(1).clamp(min=1)
    return token.sum(1) / counts
