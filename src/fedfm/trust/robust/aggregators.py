"""Robust aggregators, registered under ``algorithm.aggregator`` and configured by
``algorithm.robust``; the rules themselves (and their papers) are in ``rules``.

Each aggregator sees the global State too (LoRA product geometry needs the current factors) and
reports the round's ``f``, parameters and, when it selects clients, which it left out
(``last_flagged``), so that attack simulations can score detection.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch

from fedfm.config import AlgorithmConfig
from fedfm.core.registries import AGGREGATORS
from fedfm.core.registry import MethodInfo
from fedfm.core.state import State
from fedfm.core.update import ClientUpdate
from fedfm.trust.robust import rules
from fedfm.trust.robust.geometry import RoundUpdates, round_updates

LEAF = "trust.robustness.aggregation"
Selection = tuple[State, list[int] | None, dict[str, float]]


class RobustAggregator:
    """Shared plumbing: stack the round, count ``f``, run the rule, keep what it flagged."""

    sum_compatible = False
    uses_factors_only = False  # coordinate-wise rules: geometry never enters

    def __init__(self, cfg: AlgorithmConfig | None = None) -> None:
        cfg = cfg or AlgorithmConfig()
        self.options = cfg.robust
        self.weighting = cfg.weighting
        self.last_flagged: list[int] | None = None
        self.last_info: dict[str, float] = {}

    def aggregate(self, updates: list[ClientUpdate]) -> State:
        """Without the global State (factor geometry)."""
        return self.aggregate_robust(None, updates, 0)

    def aggregate_robust(self, global_state: State | None, updates: list[ClientUpdate],
                         round_index: int) -> State:
        if not updates:
            raise rules.AggregationError("no updates to aggregate")
        space = "factors" if self.uses_factors_only else self.options.lora_space
        view = round_updates(updates, global_state, space=space, weighting=self.weighting)
        f = rules.byzantine_count(view.n, self.options.byzantine_fraction)
        state, dropped, info = self.rule(view, f, global_state, round_index)
        self.last_flagged = None if dropped is None else sorted(view.client_ids[i]
                                                                 for i in dropped)
        self.last_info = {"clients": float(view.n), "f": float(f), **info}
        return state

    def rule(self, view: RoundUpdates, f: int, global_state: State | None,
             round_index: int) -> Selection:
        raise NotImplementedError

    def round_metrics(self) -> dict[str, Any]:
        found: dict[str, Any] = dict(self.last_info)
        if self.last_flagged is not None:
            found["flagged"] = list(self.last_flagged)
        return {"robust_aggregation": found}

    def state_dict(self) -> dict[str, State]:
        return {}

    def load_state_dict(self, states: Mapping[str, State]) -> None:
        return None


def with_point(view: RoundUpdates, payload: State) -> torch.Tensor:
    """``[n + 1, n + 1]`` Gram matrix of ``payload`` (index 0) and the round's updates, in the
    round's measuring space."""
    cross, own = view.measure([payload])
    top = torch.cat([own, cross.T], dim=1)
    return torch.cat([top, torch.cat([cross, view.gram], dim=1)], dim=0)


def _left_out(n: int, kept: list[int]) -> list[int]:
    chosen = set(kept)
    return [i for i in range(n) if i not in chosen]


def _register(name: str, paper: str, snippet: str, summary: str) -> Callable[[type], type]:
    return AGGREGATORS.register(name, MethodInfo(LEAF, paper, snippet, summary))


YIN = ("Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates (Yin et al., "
       "ICML 2018)")
BLANCHARD = ("Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent "
             "(Blanchard et al., NeurIPS 2017)")


@_register("median", YIN, "algorithm: {aggregator: median}",
           "coordinate-wise median of the updates")
class CoordinateMedian(RobustAggregator):
    uses_factors_only = True

    def rule(self, view: RoundUpdates, f: int, global_state: State | None,
             round_index: int) -> Selection:
        return view.state(rules.coordinate_median(view.raw)), None, {}


@_register("trimmed_mean", YIN,
           "algorithm: {aggregator: trimmed_mean, robust: {trim_ratio: 0.2}}",
           "coordinate-wise mean after dropping the largest and smallest share of values")
class TrimmedMean(RobustAggregator):
    uses_factors_only = True

    def rule(self, view: RoundUpdates, f: int, global_state: State | None,
             round_index: int) -> Selection:
        ratio = self.options.trim_ratio
        trimmed = rules.byzantine_count(view.n, ratio) if ratio is not None else f
        return view.state(rules.trimmed_mean(view.raw, trimmed)), None, {
            "trimmed_per_side": float(trimmed)}


@_register("krum", BLANCHARD, "algorithm: {aggregator: krum, robust: {byzantine_fraction: 0.2}}",
           "the update with the smallest summed distance to its n - f - 2 nearest neighbours")
class Krum(RobustAggregator):
    def rule(self, view: RoundUpdates, f: int, global_state: State | None,
             round_index: int) -> Selection:
        chosen = rules.krum(view.distances(), f)
        coefficients = torch.zeros(view.n, dtype=torch.float64)
        coefficients[chosen] = 1.0
        return view.combine(coefficients), _left_out(view.n, [chosen]), {}


@_register("multi_krum", BLANCHARD,
           "algorithm: {aggregator: multi_krum, robust: {multi_krum_m: null}}",
           "mean of the m updates with the best Krum scores (m = n - f by default)")
class MultiKrum(RobustAggregator):
    def rule(self, view: RoundUpdates, f: int, global_state: State | None,
             round_index: int) -> Selection:
        m = self.options.multi_krum_m or view.n - f
        chosen = rules.multi_krum(view.distances(), f, m)
        coefficients = torch.zeros(view.n, dtype=torch.float64)
        coefficients[chosen] = 1.0 / len(chosen)
        return view.combine(coefficients), _left_out(view.n, chosen), {"m": float(len(chosen))}


@_register("bulyan", "The Hidden Vulnerability of Distributed Learning in Byzantium "
           "(El Mhamdi et al., ICML 2018)", "algorithm: {aggregator: bulyan}",
           "repeated Krum picks n - 2f updates; per coordinate, mean of the n - 4f nearest the "
           "median")
class Bulyan(RobustAggregator):
    def rule(self, view: RoundUpdates, f: int, global_state: State | None,
             round_index: int) -> Selection:
        vector, selected = rules.bulyan(view.distances(), view.raw, f)
        return view.state(vector), _left_out(view.n, selected), {}


@_register("geometric_median", "Robust Aggregation for Federated Learning (Pillutla et al., "
           "IEEE Transactions on Signal Processing, 2022)",
           "algorithm: {aggregator: geometric_median}",
           "RFA: weighted geometric median by the smoothed Weiszfeld iteration")
class GeometricMedian(RobustAggregator):
    def rule(self, view: RoundUpdates, f: int, global_state: State | None,
             round_index: int) -> Selection:
        alpha = rules.geometric_median(view.gram, view.weights,
                                       iters=self.options.geomed_iters,
                                       tol=self.options.geomed_tol)
        return view.combine(alpha), None, {}


@_register("centered_clipping", "Learning from History for Byzantine Robust Optimization "
           "(Karimireddy et al., ICML 2021)",
           "algorithm: {aggregator: centered_clipping, robust: {cc_radius: null, cc_iters: 3}}",
           "clip each update's distance to a center started at the last aggregate, iterate")
class CenteredClipping(RobustAggregator):
    def __init__(self, cfg: AlgorithmConfig | None = None) -> None:
        super().__init__(cfg)
        self.previous: torch.Tensor | None = None  # the last aggregate, as a raw row

    def rule(self, view: RoundUpdates, f: int, global_state: State | None,
             round_index: int) -> Selection:
        prior = self.previous
        if prior is None or prior.shape != view.raw.shape[1:]:
            prior = torch.zeros(view.raw.shape[1], dtype=torch.float64)
        coefficients, radius = rules.centered_clipping(with_point(view, view.state(prior)),
                                                       radius=self.options.cc_radius,
                                                       iters=self.options.cc_iters)
        vector = coefficients[0] * prior + coefficients[1:] @ view.raw
        self.previous = vector
        return view.state(vector), None, {"radius": radius}

    def state_dict(self) -> dict[str, State]:
        return {} if self.previous is None else {"previous": OrderedDict(raw=self.previous)}

    def load_state_dict(self, states: Mapping[str, State]) -> None:
        found = states.get("previous")
        self.previous = None if found is None else found["raw"].to(torch.float64)


@_register("norm_bounding", "Can You Really Backdoor Federated Learning? (Sun et al., "
           "arXiv:1911.07963, 2019)",
           "algorithm: {aggregator: norm_bounding, robust: {norm_bound: null}}",
           "weighted mean of updates clipped to a norm bound (default: the round's median)")
class NormBounding(RobustAggregator):
    def rule(self, view: RoundUpdates, f: int, global_state: State | None,
             round_index: int) -> Selection:
        coefficients, bound = rules.norm_bounding(view.sq_norms.sqrt(), view.weights,
                                                  self.options.norm_bound)
        return view.combine(coefficients), None, {"norm_bound": bound}


RootUpdate = Callable[[State], State]


@_register("fltrust", "FLTrust: Byzantine-robust Federated Learning via Trust Bootstrapping "
           "(Cao et al., NDSS 2021)",
           "algorithm: {aggregator: fltrust, robust: {root_rows: 100}}",
           "trust = ReLU(cosine) with the server's own update on root data; updates rescaled "
           "to its norm")
class FLTrust(RobustAggregator):
    """The server's update comes from ``root_update(global_state)``: the run binds it to local
    training on ``root_rows`` rows held out of the global validation set (``bind_root``)."""

    def __init__(self, cfg: AlgorithmConfig | None = None) -> None:
        super().__init__(cfg)
        self.root_update: RootUpdate | None = None

    def bind_root(self, root_update: RootUpdate) -> None:
        self.root_update = root_update

    def rule(self, view: RoundUpdates, f: int, global_state: State | None,
             round_index: int) -> Selection:
        if self.root_update is None or global_state is None:
            raise rules.AggregationError("FLTrust needs the server's root-data update; the run "
                                         "binds it (bind_root) when it builds the workload")
        gram = with_point(view, self.root_update(global_state))
        coefficients = rules.fltrust(gram)
        dropped = [i for i in range(view.n) if float(coefficients[i]) == 0.0]
        return view.combine(coefficients), dropped, {
            "root_norm": float(gram[0, 0].clamp(min=0).sqrt())}


@_register("dnc", "Manipulating the Byzantine: Optimizing Model Poisoning Attacks and Defenses "
           "for Federated Learning (Shejwalkar & Houmansadr, NDSS 2021)",
           "algorithm: {aggregator: dnc, robust: {dnc_iters: 5, dnc_dim: 10000}}",
           "Divide-and-Conquer: drop updates with large projections on the top singular "
           "direction of random coordinate subsets")
class DivideAndConquer(RobustAggregator):
    def rule(self, view: RoundUpdates, f: int, global_state: State | None,
             round_index: int) -> Selection:
        generator = torch.Generator().manual_seed(10007 * round_index + 1)
        kept = rules.dnc(view.coordinates, view.n, view.width, f, iters=self.options.dnc_iters,
                         dim=self.options.dnc_dim, filter_frac=self.options.dnc_filter,
                         generator=generator)
        coefficients = torch.zeros(view.n, dtype=torch.float64)
        coefficients[kept] = 1.0 / len(kept)
        return view.combine(coefficients), _left_out(view.n, kept), {}


@_register("clipped_clustering", "An Experimental Study of Byzantine-Robust Aggregation "
           "Schemes in Federated Learning (Li et al., IEEE Transactions on Big Data, 2023)",
           "algorithm: {aggregator: clipped_clustering}",
           "clip to the median of all norms seen so far, cluster by cosine in two, average "
           "the larger cluster")
class ClippedClustering(RobustAggregator):
    def __init__(self, cfg: AlgorithmConfig | None = None) -> None:
        super().__init__(cfg)
        self.norm_history = torch.zeros(0, dtype=torch.float64)

    def rule(self, view: RoundUpdates, f: int, global_state: State | None,
             round_index: int) -> Selection:
        self.norm_history = torch.cat([self.norm_history, view.sq_norms.sqrt()])
        bound = float(self.norm_history.median())
        coefficients, members = rules.clipped_clustering(view.gram, bound)
        return view.combine(coefficients), _left_out(view.n, members), {"clip": bound}

    def state_dict(self) -> dict[str, State]:
        return {"history": OrderedDict(norms=self.norm_history)}

    def load_state_dict(self, states: Mapping[str, State]) -> None:
        found = states.get("history")
        if found is not None:
            self.norm_history = found["norms"].to(torch.float64)
