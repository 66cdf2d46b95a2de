"""FedRS: restricted softmax for the classes a client lacks.

Li & Zhan, "FedRS: Federated Learning with Restricted Softmax for Label Distribution Non-IID
Data", KDD 2021. A client trains on logits in which every class it has no training row of is
scaled by ``alpha`` in [0, 1] (``alpha = 1`` is plain cross-entropy): the softmax cannot push
the missing classes' logits, and so their classifier weights, as hard as a class that is
present, which keeps one client's missing labels from erasing what others taught. Evaluation
uses the unrestricted logits.
"""

from __future__ import annotations

import torch

from fedfm.adaptability.heterogeneity.base import LogitAdjustment, LossOnly
from fedfm.adaptability.heterogeneity.fedlc import check_classification
from fedfm.config import RunConfig, SkewConfig
from fedfm.core.registries import SKEW
from fedfm.core.registry import MethodInfo


def restricted_logits(logits: torch.Tensor, class_counts: torch.Tensor,
                      alpha: float) -> torch.Tensor:
    """``logits`` with the columns of absent classes (no rows) multiplied by ``alpha``."""
    scale = torch.where(class_counts > 0, torch.ones_like(class_counts),
                        torch.full_like(class_counts, alpha)).to(logits.dtype)
    return logits * scale


class RestrictedSoftmax:
    name = "fedrs"

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha

    def loss(self, logits: torch.Tensor, labels: torch.Tensor,
             class_counts: torch.Tensor) -> torch.Tensor:
        restricted = restricted_logits(logits.float(), class_counts, self.alpha)
        return torch.nn.functional.cross_entropy(restricted, labels)


@SKEW.register("fedrs", MethodInfo(
    "adaptability.heterogeneity",
    "FedRS: Federated Learning with Restricted Softmax for Label Distribution Non-IID Data "
    "(Li & Zhan, KDD 2021)",
    "algorithm: {skew: [{name: fedrs, alpha: 0.5}]}",
    "logits of the classes a client lacks scaled by alpha in its local softmax"))
class FedRS(LossOnly):
    name = "fedrs"

    def __init__(self, cfg: SkewConfig, config: RunConfig) -> None:
        self.alpha = cfg.alpha

    @staticmethod
    def check(cfg: SkewConfig, config: RunConfig) -> None:
        check_classification(cfg, config, "restricts the softmax to the client's classes")

    def adjustment(self) -> LogitAdjustment | None:
        return RestrictedSoftmax(self.alpha)
