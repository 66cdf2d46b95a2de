"""Data heterogeneity: methods against label, quantity and feature skew, layered on any core
algorithm through ``algorithm.skew`` (a list, composed): FedLC (logit calibration), FedRS
(restricted softmax), MOON (model-contrastive regularization), FedBABU (frozen head) and
FedNova (normalized averaging). FedProx and SCAFFOLD, the classic drift corrections, are
algorithms of their own (``fedfm.algorithms``). Importing this package registers the methods."""

from fedfm.adaptability.heterogeneity import fedbabu, fedlc, fednova, fedrs, moon  # noqa: F401
from fedfm.adaptability.heterogeneity.base import apply_skew, check_skew

__all__ = ["apply_skew", "check_skew"]
