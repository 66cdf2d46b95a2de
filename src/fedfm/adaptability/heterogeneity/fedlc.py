"""FedLC: logit calibration by each client's label distribution.

Zhang, Li, Li, Xu & Wang, "Federated Learning with Label Distribution Skew via Logits
Calibration", ICML 2022. A client with ``n_c`` training rows of class ``c`` trains on the
calibrated logits ``f_c(x) - tau * n_c^(-1/4)``: the cross-entropy
``-log softmax(f(x) - tau n^(-1/4))_y``. Rare classes get a larger offset, so the raw logits
the model learns for them grow to compensate, which cancels the pull of a skewed local
distribution toward its frequent classes. A class the client lacks (``n_c = 0``) has an
infinite offset: it leaves the softmax (the limit of the formula), so local training never
pushes its logit down. Evaluation uses the raw logits.
"""

from __future__ import annotations

import torch

from fedfm.adaptability.heterogeneity.base import LogitAdjustment, LossOnly
from fedfm.config import ConfigError, RunConfig, SkewConfig
from fedfm.core.registries import SKEW
from fedfm.core.registry import MethodInfo


def calibrated_logits(logits: torch.Tensor, class_counts: torch.Tensor,
                      tau: float) -> torch.Tensor:
    """``logits - tau * n^(-1/4)`` per class; ``-inf`` for classes with no rows."""
    counts = class_counts.to(logits.dtype)
    offsets = tau * counts.clamp_min(1.0).pow(-0.25)
    offsets = torch.where(counts > 0, offsets, torch.full_like(offsets, float("inf")))
    return logits - offsets


class LogitCalibration:
    name = "fedlc"

    def __init__(self, tau: float) -> None:
        self.tau = tau

    def loss(self, logits: torch.Tensor, labels: torch.Tensor,
             class_counts: torch.Tensor) -> torch.Tensor:
        calibrated = calibrated_logits(logits.float(), class_counts, self.tau)
        return torch.nn.functional.cross_entropy(calibrated, labels)


def check_classification(cfg: SkewConfig, config: RunConfig, why: str) -> None:
    from fedfm.api import resolve_task

    task = resolve_task(config)
    if task != "classification":
        raise ConfigError(f"invalid config: algorithm.skew {cfg.name!r} {why}, so it needs a "
                          f"classification model (this one is {task})")


@SKEW.register("fedlc", MethodInfo(
    "adaptability.heterogeneity",
    "Federated Learning with Label Distribution Skew via Logits Calibration "
    "(Zhang et al., ICML 2022)",
    "algorithm: {skew: [{name: fedlc, tau: 1.0}]}",
    "local cross-entropy on logits shifted by -tau n_c^(-1/4) of the client's class counts"))
class FedLC(LossOnly):
    name = "fedlc"

    def __init__(self, cfg: SkewConfig, config: RunConfig) -> None:
        self.tau = cfg.tau

    @staticmethod
    def check(cfg: SkewConfig, config: RunConfig) -> None:
        check_classification(cfg, config, "calibrates class logits by label counts")

    def adjustment(self) -> LogitAdjustment | None:
        return LogitCalibration(self.tau)
