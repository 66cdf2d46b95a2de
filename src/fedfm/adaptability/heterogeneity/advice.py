"""What ``fedfm data stats`` suggests when a split is skewed.

The suggestion for label skew is ``recipes/label_skew.yaml``'s model pooling and ``algorithm``
section (``LABEL_SKEW_ALGORITHM``; a test keeps the two equal): the classifier reads the mean of
the token states (``model.pooling``; ``auto`` here, which picks it for checkpoints trained for it
and keeps other models as they are) and trains with plain FedAvg. ``bench/heterogeneity.py``
measured it above FedAvg on every partition it runs, ahead of every ``algorithm.skew`` method
(FedLC, the best of them on Dirichlet(0.3) through the pooler, falls 14 points behind it on
Dirichlet(0.1), where clients holding one class get no loss from it). Feature skew (clusters,
lengths, a metadata column) is left to FedAvg, which the adaptability bench found hard to beat
there; personalization (``eval.finetune_steps``) is offered instead.

"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from fedfm.config import RunConfig
from fedfm.data.stats import DataStats

STRONG_SKEW = 0.25  # mean total-variation distance from the pooled histogram
LABEL_SKEW_MODEL: dict[str, Any] = {"pooling": "auto"}
LABEL_SKEW_ALGORITHM: dict[str, Any] = {
    "name": "fedavg",
    "local": {"steps": 10, "batch_size": 16, "lr": 5.0e-3, "max_grad_norm": 1.0},
}


@dataclass(frozen=True)
class Advice:
    headline: str
    snippet: str  # YAML to merge into the run config

    def render(self) -> str:
        return f"{self.headline}\n{self.snippet}"


def skew_advice(stats: DataStats, config: RunConfig) -> Advice | None:
    """A suggestion when the split's skew is strong and the config does not already counter
    it; None otherwise."""
    skew = stats.skew
    if skew is None or skew < STRONG_SKEW:
        return None
    by_label = stats.label_names is not None and stats.histogram_key == config.data.label_field
    measured = f"strong {stats.histogram_key} skew ({skew:.3f} >= {STRONG_SKEW})"
    if by_label:
        if config.algorithm.skew or config.model.pooling != "native":
            return None
        snippet = yaml.safe_dump({"model": LABEL_SKEW_MODEL, "algorithm": LABEL_SKEW_ALGORITHM},
                                 sort_keys=False)
        return Advice(f"{measured}: the label-skew recipe (recipes/label_skew.yaml) reads the "
                      f"mean of the token states (the sentence embedding an encoder such as "
                      f"MiniLM is trained for) and trains with plain FedAvg; merge into the "
                      f"config:", snippet)
    if config.eval.finetune_steps > 0:
        return None
    snippet = yaml.safe_dump({"eval": {"finetune_steps": 10}}, sort_keys=False)
    return Advice(f"{measured}: plain FedAvg is the strongest global model under feature "
                  f"skew in bench/heterogeneity.py; to also measure each client's own "
                  f"fine-tuned model, add:", snippet)
