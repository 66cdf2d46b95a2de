"""Aggregators: turn the round's client payloads into one pseudo-gradient.

``mean``: the example-weighted (or uniform) average of FedAvg (McMahan et al., AISTATS 2017),
computed in float64 so that the aggregation identities hold to the last bit that matters.
Robust and secure aggregators plug in here under their own names.
"""

from __future__ import annotations

from typing import Literal, Protocol

from fedfm.core import state as state_ops
from fedfm.core.registries import AGGREGATORS
from fedfm.core.registry import MethodInfo
from fedfm.core.state import State
from fedfm.core.update import ClientUpdate

Weighting = Literal["examples", "uniform"]


class Aggregator(Protocol):
    """``sum_compatible``: the result is a function of (weighted) sums of the updates only, so
    secure aggregation, which releases nothing but sums, can compute it. A median, Krum or a
    non-linear LoRA rule sets it False and is refused next to secure aggregation."""

    sum_compatible: bool

    def aggregate(self, updates: list[ClientUpdate]) -> State: ...


def update_weights(updates: list[ClientUpdate], weighting: Weighting) -> list[float]:
    if weighting == "uniform":
        return [1.0] * len(updates)
    return [float(u.num_examples) for u in updates]


@AGGREGATORS.register("mean", MethodInfo(
    "efficiency.systems.optimization",
    "Communication-Efficient Learning of Deep Networks from Decentralized Data "
    "(McMahan et al., AISTATS 2017)",
    "algorithm: {weighting: examples}  # or uniform",
    "weighted mean of client updates (by examples, or uniform)"))
class WeightedMean:
    sum_compatible = True

    def __init__(self, weighting: Weighting = "examples") -> None:
        self.weighting = weighting

    def aggregate(self, updates: list[ClientUpdate]) -> State:
        folded = getattr(updates, "folded_mean", None)  # summed as they arrived (remote)
        mean = folded(self.weighting) if folded is not None else None
        if mean is not None:
            return mean
        return state_ops.weighted_mean((u.payload for u in updates),
                                       update_weights(updates, self.weighting))
