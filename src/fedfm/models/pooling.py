"""Sentence pooling of encoder classifiers (``model.pooling``).

Method: mean pooling of the token states, as trained by Sentence-BERT ("Sentence-BERT: Sentence
Embeddings using Siamese BERT-Networks", Reimers & Gurevych, EMNLP 2019) and declared by every
sentence-transformers checkpoint in its ``1_Pooling/config.json``.

A BERT-family classifier reads the backbone's pooler: dense + tanh on the [CLS] state, trained
for next-sentence prediction. A sentence-transformers checkpoint such as the packaged
all-MiniLM-L6-v2 was trained to be read as the mean of its token states instead, and through the
untrained pooler its sentences look alike: on 2,000 SST-2 sentences the pooler's features vary
by 0.036 (mean std across dimensions) against 0.24 for the mean of the token states, and a
logistic-regression probe on them scores 0.70 against 0.80. A head on features that hardly vary
learns mostly a bias, and under label skew each client pushes that bias toward its own majority
class, so the averaged model predicts one class (docs/heterogeneity.md).

``pooling: mean`` replaces the pooler by the masked mean of the last hidden states (real tokens
only; the classifier then reads that); ``auto`` does so when the checkpoint declares mean pooling
in its sentence-transformers files, and keeps the architecture's own pooler otherwise; ``native``
(the default) always keeps it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fedfm.config import ConfigError


class MaskedMeanPooler(torch.nn.Module):
    """Mean of the last hidden states over the real tokens of each row. The attention mask is
    handed over by a pre-hook on the backbone (the pooler itself is only given the states)."""

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask = self.mask
        if mask is None:
            return hidden_states.mean(dim=1)
        # prefix tuning prepends its virtual positions to the mask but not to the states
        weights = mask[:, -hidden_states.shape[1]:].unsqueeze(-1).to(hidden_states.dtype)
        return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def declared_pooling(source: str | Path | None) -> str | None:
    """The pooling a sentence-transformers checkpoint directory declares (``mean``, ``cls``,
    ...), or None when it declares none."""
    if source is None or not Path(source).is_dir():
        return None
    root = Path(source)
    pooling_dir = root / "1_Pooling"
    modules = root / "modules.json"
    if modules.is_file():
        try:
            entries = json.loads(modules.read_text())
            paths = [e.get("path", "") for e in entries
                     if str(e.get("type", "")).endswith("models.Pooling")]
        except (ValueError, AttributeError):
            paths = []
        if paths:
            pooling_dir = root / paths[0]
    config = pooling_dir / "config.json"
    if not config.is_file():
        return None
    try:
        modes = json.loads(config.read_text())
    except ValueError:
        return None
    for mode in ("mean_tokens", "cls_token", "max_tokens", "mean_sqrt_len_tokens"):
        if modes.get(f"pooling_mode_{mode}"):
            return mode.removesuffix("_tokens").removesuffix("_token")
    return None


def apply_pooling(model: torch.nn.Module, pooling: str, *, task: str, family: str,
                  source: str | Path | None) -> str:
    """Apply ``model.pooling`` to a freshly loaded model in place; returns what was applied
    (``native`` or ``mean``)."""
    if pooling == "native":
        return "native"
    if pooling == "auto" and (task != "classification" or declared_pooling(source) != "mean"):
        return "native"
    if task != "classification":
        raise ConfigError(f"invalid config: model.pooling {pooling!r} applies to classification "
                          f"models (this one is {task})")
    backbone = getattr(model, "base_model", None)
    if backbone is None or getattr(backbone, "pooler", None) is None:
        raise ConfigError(f"invalid config: model.pooling {pooling!r} replaces the backbone's "
                          f"pooler that a BERT-family classifier reads; {family!r} classifies "
                          f"without one (use native)")
    pooler = MaskedMeanPooler()
    backbone.pooler = pooler
    backbone.register_forward_pre_hook(_mask_handover(pooler), with_kwargs=True)
    return "mean"


def _mask_handover(pooler: MaskedMeanPooler) -> Any:
    def hand_over(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                  ) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            mask = args[1]
        if mask is not None and mask.dim() != 2:
            raise ValueError(f"model.pooling 'mean' needs a (batch, tokens) attention mask; "
                             f"got one of shape {tuple(mask.shape)}")
        pooler.mask = mask

    return hand_over
