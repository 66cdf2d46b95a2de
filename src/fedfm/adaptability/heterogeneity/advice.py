"""What ``fedfm data stats`` suggests when a split is skewed.

The suggestion for label skew is the ``algorithm`` section of ``recipes/label_skew.yaml``
(``LABEL_SKEW_ALGORITHM``; a test keeps the two equal): FedLC, which ``bench/heterogeneity.py``
measured best on SST-2 Dirichlet(0.3) (+3 points over FedAvg, tied with FedProx). FedLC gives a
client that holds a single class no loss, and cost 11 points on Dirichlet(0.1), so when a fifth
of the clients or more hold one class the suggestion is FedRS, which keeps them training.
Feature skew (clusters, lengths, a metadata column) is left to FedAvg, which the adaptability
bench found hard to beat there; personalization (``eval.finetune_steps``) is offered instead."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from fedfm.config import RunConfig
from fedfm.data.stats import DataStats

STRONG_SKEW = 0.25  # mean total-variation distance from the pooled histogram
SINGLE_CLASS_SHARE = 0.2  # this share of single-class clients or more: FedRS, not FedLC
SINGLE_CLASS_ALGORITHM: dict[str, Any] = {
    "name": "fedavg",
    "local": {"steps": 10, "batch_size": 16, "lr": 5.0e-3, "max_grad_norm": 1.0},
    "skew": [{"name": "fedrs", "alpha": 0.5}],
}
LABEL_SKEW_ALGORITHM: dict[str, Any] = {
    "name": "fedavg",
    "local": {"steps": 10, "batch_size": 16, "lr": 5.0e-3, "max_grad_norm": 1.0},
    "skew": [{"name": "fedlc", "tau": 1.0}],
}


@dataclass(frozen=True)
class Advice:
    headline: str
    snippet: str  # YAML to merge into the run config

    def render(self) -> str:
        return f"{self.headline}\n{self.snippet}"


def single_class_share(stats: DataStats) -> float:
    """The share of clients (with training rows) whose histogram has one nonzero value."""
    counted = [c for c in stats.clients if sum(c.histogram.values()) > 0]
    single = [c for c in counted if sum(1 for v in c.histogram.values() if v > 0) == 1]
    return len(single) / len(counted) if counted else 0.0


def skew_advice(stats: DataStats, config: RunConfig) -> Advice | None:
    """A suggestion when the split's skew is strong and the config does not already counter
    it; None otherwise."""
    skew = stats.skew
    if skew is None or skew < STRONG_SKEW:
        return None
    by_label = stats.label_names is not None and stats.histogram_key == config.data.label_field
    measured = f"strong {stats.histogram_key} skew ({skew:.3f} >= {STRONG_SKEW})"
    if by_label:
        if config.algorithm.skew:
            return None
        if single_class_share(stats) >= SINGLE_CLASS_SHARE:
            snippet = yaml.safe_dump({"algorithm": SINGLE_CLASS_ALGORITHM}, sort_keys=False)
            return Advice(f"{measured}, and {single_class_share(stats):.0%} of the clients "
                          f"hold a single class, which FedLC would leave without a loss; "
                          f"the restricted softmax (FedRS) keeps them training; merge into "
                          f"the config:", snippet)
        snippet = yaml.safe_dump({"algorithm": LABEL_SKEW_ALGORITHM}, sort_keys=False)
        return Advice(f"{measured}: the label-skew recipe (recipes/label_skew.yaml) trains "
                      f"with logit calibration (FedLC); merge into the config:", snippet)
    if config.eval.finetune_steps > 0:
        return None
    snippet = yaml.safe_dump({"eval": {"finetune_steps": 10}}, sort_keys=False)
    return Advice(f"{measured}: plain FedAvg is the strongest global model under feature "
                  f"skew in bench/heterogeneity.py; to also measure each client's own "
                  f"fine-tuned model, add:", snippet)
