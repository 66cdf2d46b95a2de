"""Membership inference as an evaluation tool: how well can an attacker tell a client's training
examples from examples the federation never saw?

* **Loss threshold** (Yeom, Giacomelli, Fredrikson & Jha, "Privacy Risk in Machine Learning:
  Analyzing the Connection to Overfitting", CSF 2018): score = -loss under the attacked model.
* **Reference-calibrated** (Watson, Guo, Cormode & Sablayrolles, "On the Importance of
  Difficulty Calibration in Membership Inference Attacks", ICLR 2022): score = loss under a
  reference model - loss under the attacked model, which removes how hard an example is by
  itself. The reference is trained by the attacker like a client, from the run's starting
  model, on population data the federation never saw (half of the global validation set; the
  other half are the non-members). ``start_calibrated`` also reports the cheaper variant whose
  reference is the untrained starting model.

Members are training examples of the clients; non-members are the global validation set, never
trained on. Reported: ROC AUC (the Mann-Whitney statistic) and TPR at 1% FPR. The global model is
attacked on all clients' examples; a client's model (the final global model fine-tuned locally on
that client, as the server sees it through the client's update) on that client's examples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fedfm.models.per_example import per_example_loss


@torch.no_grad()
def per_example_losses(model: torch.nn.Module, examples: Sequence[dict[str, Any]], collate: Any,
                       task: str, batch_size: int = 32) -> np.ndarray:
    """Mean loss of each example (token-mean for LMs, cross-entropy for classifiers)."""
    was_training = model.training
    model.eval()
    losses: list[float] = []
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate(list(examples[start:start + batch_size]))
            losses.extend(per_example_loss(model, batch, task).tolist())
    finally:
        model.train(was_training)
    return np.asarray(losses, dtype=np.float64)


def roc_auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """P(member score > non-member score) + half the ties (the Mann-Whitney U statistic)."""
    scores = np.concatenate([member_scores, nonmember_scores])
    ranks = _average_ranks(scores)
    n_in, n_out = len(member_scores), len(nonmember_scores)
    u_stat = ranks[:n_in].sum() - n_in * (n_in + 1) / 2
    return float(u_stat / (n_in * n_out))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def tpr_at_fpr(member_scores: np.ndarray, nonmember_scores: np.ndarray,
               fpr: float = 0.01) -> float:
    """Share of members flagged at the threshold that flags at most ``fpr`` of non-members."""
    threshold = np.quantile(nonmember_scores, 1 - fpr, method="higher")
    if float(np.mean(nonmember_scores > threshold)) > fpr:  # ties at the top
        threshold = np.nextafter(threshold, math.inf)
    return float(np.mean(member_scores > threshold))


def attack_report(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> dict[str, float]:
    return {"auc": roc_auc(member_scores, nonmember_scores),
            "tpr_at_1pct_fpr": tpr_at_fpr(member_scores, nonmember_scores),
            "members": float(len(member_scores)), "nonmembers": float(len(nonmember_scores))}


def membership_inference(target_member: np.ndarray, target_nonmember: np.ndarray,
                         reference_member: np.ndarray, reference_nonmember: np.ndarray
                         ) -> dict[str, dict[str, float]]:
    """Both attacks from per-example losses under the target and the reference model."""
    return {
        "loss_threshold": attack_report(-target_member, -target_nonmember),
        "reference_calibrated": attack_report(reference_member - target_member,
                                              reference_nonmember - target_nonmember),
    }
