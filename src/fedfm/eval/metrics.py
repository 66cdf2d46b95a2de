"""Evaluation metrics as pure functions: accuracy, macro-F1, perplexity and ROUGE-L.

All functions take plain Python sequences, numpy arrays or torch tensors and return a Python float.

- ``accuracy``: share of predictions equal to the label.
- ``macro_f1``: F1 per class, averaged (unweighted) over the classes that occur in the labels or
  the predictions -- the semantics of scikit-learn's ``f1_score(average="macro")`` with
  ``zero_division=0``, written here with numpy so fedfm does not depend on scikit-learn.
- ``perplexity``: ``exp`` of a mean token cross-entropy (nats), ``inf`` on overflow.
- ``rouge_l``: mean ROUGE-L F-measure (longest common subsequence; Chin-Yew Lin, "ROUGE: A Package
  for Automatic Evaluation of Summaries", ACL Workshop on Text Summarization Branches Out, 2004),
  computed with the ``rouge-score`` package with Porter stemming.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch

IntArrayLike = Sequence[int] | np.ndarray | torch.Tensor

__all__ = ["accuracy", "macro_f1", "perplexity", "rouge_l"]


def _as_int_array(values: IntArrayLike, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class ids, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _paired(preds: IntArrayLike, labels: IntArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p = _as_int_array(preds, "preds")
    y = _as_int_array(labels, "labels")
    if p.shape != y.shape:
        raise ValueError(f"preds and labels differ in length: {p.size} vs {y.size}")
    if p.size == 0:
        raise ValueError("cannot compute a metric over zero examples")
    return p, y


def accuracy(preds: IntArrayLike, labels: IntArrayLike) -> float:
    """Fraction of ``preds`` equal to ``labels``."""
    p, y = _paired(preds, labels)
    return float(np.mean(p == y))


def macro_f1(preds: IntArrayLike, labels: IntArrayLike, num_labels: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in ``labels`` or ``preds``.

    A class that is never predicted has precision 0 by convention (``zero_division=0``), so its
    F1 is 0; a class absent from both is not averaged over.
    """
    p, y = _paired(preds, labels)
    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    for name, arr in (("preds", p), ("labels", y)):
        if arr.min() < 0 or arr.max() >= num_labels:
            raise ValueError(f"{name} hold class ids outside [0, {num_labels})")
    tp = np.bincount(y[p == y], minlength=num_labels).astype(np.float64)
    pred_count = np.bincount(p, minlength=num_labels).astype(np.float64)
    true_count = np.bincount(y, minlength=num_labels).astype(np.float64)
    present = (pred_count + true_count) > 0
    denom = pred_count + true_count  # 2TP + FP + FN
    f1 = np.divide(2.0 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(f1[present].mean())


def perplexity(mean_token_loss: float) -> float:
    """``exp(mean_token_loss)``; ``inf`` when it overflows, ``nan`` for a ``nan`` loss."""
    loss = float(mean_token_loss)
    if math.isnan(loss):
        return math.nan
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


@lru_cache(maxsize=1)
def _rouge_l_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure of each prediction against its reference (Lin, 2004)."""
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references differ in length: {len(predictions)} vs {len(references)}"
        )
    if not predictions:
        raise ValueError("cannot compute ROUGE-L over zero examples")
    scorer = _rouge_l_scorer()
    scores = [
        scorer.score(ref, pred)["rougeL"].fmeasure
        for pred, ref in zip(predictions, references, strict=True)
    ]
    return float(np.mean(scores))
