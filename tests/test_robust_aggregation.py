"""Robust aggregators (issue 6, item 2) against their definitions on hand-made inputs, LoRA
product geometry, and closeness to the mean without attackers."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch

from fedfm.config import AlgorithmConfig, RobustAggregationConfig
from fedfm.core.registries import AGGREGATORS
from fedfm.core.update import ClientUpdate
from fedfm.trust.robust import rules
from fedfm.trust.robust.aggregators import FLTrust, RobustAggregator
from fedfm.trust.robust.geometry import (
    gram_distances,
    lora_pairs,
    round_updates,
)


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def product_vector(payload: OrderedDict, global_state: OrderedDict,
                   pairs: list[tuple[str, str]], others: list[str]) -> torch.Tensor:
    """The product-space point, materialised: ``(B + dB)(A + dA) - B A`` per LoRA layer, then
    the other tensors (the rules never build it; the checks do)."""
    parts = []
    for key_a, key_b in pairs:
        a, b = global_state[key_a].double(), global_state[key_b].double()
        parts.append(((b + payload[key_b].double()) @ (a + payload[key_a].double())
                      - b @ a).reshape(-1))
    parts.extend(payload[k].double().reshape(-1) for k in others)
    return torch.cat(parts)


def dist(points: torch.Tensor) -> torch.Tensor:
    return gram_distances(points @ points.T)


def gram_with(first: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    stacked = torch.cat([first[None], points])
    return stacked @ stacked.T


def updates_of(points: torch.Tensor, examples: list[int] | None = None) -> list[ClientUpdate]:
    return [ClientUpdate(client_id=i, payload=OrderedDict(w=row.clone()),
                         num_examples=(examples or [1] * len(points))[i])
            for i, row in enumerate(points)]


def brute_krum_scores(points: torch.Tensor, f: int) -> list[float]:
    n = len(points)
    scores = []
    for i in range(n):
        distances = sorted(float((points[i] - points[j]).pow(2).sum()) for j in range(n) if j != i)
        scores.append(sum(distances[: n - f - 2]))
    return scores


def test_coordinate_median_odd_and_even() -> None:
    assert torch.equal(rules.coordinate_median(t([[1, 9], [5, -3], [100, 2]])), t([[5, 2]])[0])
    assert torch.equal(rules.coordinate_median(t([[1, 0], [2, 0], [3, 10], [1000, 0]])),
                       t([[2.5, 0]])[0])


def test_trimmed_mean_drops_known_outliers() -> None:
    rows = t([[1, 50], [2, -1000], [3, 51], [4, 52], [100, 53]])
    assert torch.allclose(rules.trimmed_mean(rows, 1), t([[3, 51]])[0])
    with pytest.raises(rules.AggregationError, match="leaves none"):
        rules.trimmed_mean(rows, 3)


def test_krum_selects_the_definitions_index() -> None:
    generator = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(6, 4, generator=generator, dtype=torch.float64),
                        t([[40, 40, 40, 40], [-30, 0, 30, 0]])])
    scores = brute_krum_scores(points, 2)
    assert torch.allclose(rules.krum_scores(dist(points), 2), t([scores])[0])
    assert rules.krum(dist(points), 2) == min(range(8), key=scores.__getitem__)
    # a hand-made case: the middle of three collinear close points wins
    line = t([[0.0], [1.0], [2.0], [10.0], [-10.0]])
    assert rules.krum(dist(line), 1) == 1
    with pytest.raises(rules.AggregationError, match="2f \\+ 3"):
        rules.krum(dist(line), 2)


def test_multi_krum_averages_the_best_scored() -> None:
    points = t([[0.0], [1.0], [2.0], [3.0], [50.0], [-60.0], [1.5]])
    chosen = rules.multi_krum(dist(points), 2, 5)
    assert sorted(chosen) == [0, 1, 2, 3, 6]
    agg = AGGREGATORS.get("multi_krum")(AlgorithmConfig(
        robust=RobustAggregationConfig(byzantine_fraction=2 / 7)))
    out = agg.aggregate(updates_of(points))
    assert float(out["w"][0]) == pytest.approx(7.5 / 5)
    assert agg.last_flagged == [4, 5]


def brute_bulyan(points: torch.Tensor, f: int) -> torch.Tensor:
    remaining, selected = list(range(len(points))), []
    while len(selected) < len(points) - 2 * f:
        neighbours = max(1, len(remaining) - f - 2)
        scores = []
        for i in remaining:
            d = sorted(float((points[i] - points[j]).pow(2).sum()) for j in remaining if j != i)
            scores.append(sum(d[:neighbours]))
        pick = remaining[min(range(len(remaining)), key=scores.__getitem__)]
        selected.append(pick)
        remaining.remove(pick)
    beta = len(selected) - 2 * f
    out = []
    for c in range(points.shape[1]):
        values = sorted(float(points[i, c]) for i in selected)
        middle = len(values) // 2
        median = values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2
        closest = sorted(values, key=lambda v: abs(v - median))[:beta]
        out.append(sum(closest) / beta)
    return t([out])[0]


def test_bulyan_matches_its_definition() -> None:
    generator = torch.Generator().manual_seed(1)
    honest = torch.randn(9, 3, generator=generator, dtype=torch.float64)
    points = torch.cat([honest, t([[30, -30, 30], [25, 25, -25]])])  # n = 11 = 4f + 3, f = 2
    vector, selected = rules.bulyan(dist(points), points, 2)
    assert torch.allclose(vector, brute_bulyan(points, 2))
    assert 9 not in selected and 10 not in selected
    with pytest.raises(rules.AggregationError, match="4f \\+ 3"):
        rules.bulyan(dist(points[:10]), points[:10], 2)


def test_geometric_median_known_answers() -> None:
    # odd number of collinear points: the median point
    line = t([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [7.0, 0.0], [100.0, 0.0]])
    alpha = rules.geometric_median(line @ line.T, torch.ones(5, dtype=torch.float64), iters=2000,
                                   tol=1e-14)
    assert float((alpha @ line)[0]) == pytest.approx(2.0, abs=1e-3)
    # square corners plus centre: the centre; an equilateral triangle: its centroid
    square = t([[1, 1], [1, -1], [-1, 1], [-1, -1], [0, 0]])
    alpha = rules.geometric_median(square @ square.T, torch.ones(5, dtype=torch.float64), iters=200,
                                   tol=1e-12)
    assert torch.allclose(alpha @ square, torch.zeros(2, dtype=torch.float64), atol=1e-6)
    triangle = t([[0, 0], [2, 0], [1, math.sqrt(3)]])
    alpha = rules.geometric_median(triangle @ triangle.T, torch.ones(3, dtype=torch.float64),
                                   iters=500, tol=1e-14)
    assert torch.allclose(alpha @ triangle, triangle.mean(0), atol=1e-6)


def test_centered_clipping_one_step_by_hand() -> None:
    points = t([[3.0, 0.0], [0.0, 1.0]])
    prior = t([[0.0, 0.0]])[0]
    coefficients, radius = rules.centered_clipping(gram_with(prior, points), radius=1.0,
                                                   iters=1)
    # v = 0 + 1/2 [(3,0) * 1/3 + (0,1) * 1]
    assert radius == 1.0
    assert torch.allclose(coefficients[0] * prior + coefficients[1:] @ points, t([[0.5, 0.5]])[0])
    # a radius above every distance: the mean after one step
    coefficients, _ = rules.centered_clipping(gram_with(prior, points), radius=100.0, iters=1)
    assert torch.allclose(coefficients[1:] @ points, points.mean(0))


def test_norm_bounding_and_fltrust_formulas() -> None:
    points = t([[3.0, 4.0], [0.0, 1.0], [-6.0, -8.0]])
    weights = torch.full((3,), 1 / 3, dtype=torch.float64)
    coefficients, bound = rules.norm_bounding(points.norm(dim=1), weights, 1.0)
    assert bound == 1.0
    assert torch.allclose(coefficients, t([[1 / 15, 1 / 3, 1 / 30]])[0])
    root = t([[0.0, 2.0]])[0]
    trust = rules.fltrust(gram_with(root, points))
    # cos: 0.8, 1, -0.8 -> ReLU: 0.8, 1, 0; rescaled to |g0| = 2, normalised by 1.8
    assert torch.allclose(trust, t([[0.8 * 2 / 5 / 1.8, 1 * 2 / 1 / 1.8, 0.0]])[0])


def test_dnc_removes_the_outlier_direction() -> None:
    generator = torch.Generator().manual_seed(2)
    honest = torch.randn(8, 50, generator=generator, dtype=torch.float64) * 0.1
    shifted = honest[:2] + 5.0  # two clients far along the all-ones direction
    points = torch.cat([honest[2:], shifted])
    def columns(index: torch.Tensor) -> torch.Tensor:
        return points[:, index]

    kept = rules.dnc(columns, 8, 50, 2, iters=3, dim=20, filter_frac=1.0,
                     generator=torch.Generator().manual_seed(0))
    assert kept == list(range(6))
    assert rules.dnc(columns, 8, 50, 0, iters=3, dim=20, filter_frac=1.0,
                     generator=torch.Generator().manual_seed(0)) == list(range(8))


def test_clipped_clustering_keeps_the_larger_direction() -> None:
    points = t([[1, 0.1], [1, -0.1], [2, 0.0], [0.9, 0.05], [-1, 0.0], [-5, 0.1]])
    coefficients, members = rules.clipped_clustering(points @ points.T, bound=1.0)
    assert members == [0, 1, 2, 3]
    assert float(coefficients[4]) == 0.0 and float(coefficients[2]) == pytest.approx(0.5 / 4)


def test_lora_product_geometry() -> None:
    generator = torch.Generator().manual_seed(3)
    a, b = (torch.randn(2, 5, generator=generator, dtype=torch.float64),
            torch.randn(4, 2, generator=generator, dtype=torch.float64))
    global_state = OrderedDict([("m.lora_A.default.weight", a), ("m.lora_B.default.weight", b),
                                ("head.weight", torch.zeros(3, dtype=torch.float64))])
    da, db = torch.randn(2, 5, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    payload = OrderedDict([("m.lora_A.default.weight", da), ("m.lora_B.default.weight", db),
                           ("head.weight", torch.ones(3, dtype=torch.float64))])
    keys = sorted(payload)
    pairs = lora_pairs(keys)
    assert pairs == [("m.lora_A.default.weight", "m.lora_B.default.weight")]
    vector = product_vector(payload, global_state, pairs, ["head.weight"])
    expected = torch.cat([((b + db) @ (a + da) - b @ a).reshape(-1), torch.ones(3)])
    assert torch.allclose(vector, expected.double())
    other = OrderedDict((k, -2 * v) for k, v in payload.items())
    view = round_updates([ClientUpdate(0, payload, 1), ClientUpdate(1, other, 1)],
                         global_state, space="product", weighting="uniform")
    assert view.raw.shape == (2, 10 + 8 + 3) and view.width == 20 + 3
    # the Gram matrix built from 2r x 2r blocks equals the materialised products'
    points = torch.stack([vector, product_vector(other, global_state, pairs, ["head.weight"])])
    assert torch.allclose(view.gram, points @ points.T)
    index = torch.tensor([0, 7, 19, 20, 22])
    assert torch.allclose(view.coordinates(index), points[:, index])
    cross, own = view.measure([other])
    assert torch.allclose(cross[:, 0], points @ points[1]) and torch.allclose(
        own[0, 0], points[1] @ points[1])


def test_a_lora_sybil_that_only_moves_a_is_invisible_in_round_one_products() -> None:
    """With B = 0 (round 1), a change of A moves no layer: product geometry sees it as no
    change at all, while factor geometry calls it the farthest update."""
    zeros_b = torch.zeros(3, 2, dtype=torch.float64)
    a = torch.randn(2, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    global_state = OrderedDict([("l.lora_A.default.weight", a), ("l.lora_B.default.weight",
                                                                 zeros_b)])
    def payload(da: float, db: float) -> OrderedDict:
        return OrderedDict([("l.lora_A.default.weight", torch.full((2, 3), da).double()),
                            ("l.lora_B.default.weight", torch.full((3, 2), db).double())])
    updates = [ClientUpdate(i, payload(0.0, 0.1 + 0.01 * i), 1) for i in range(4)]
    updates.append(ClientUpdate(4, payload(50.0, 0.1), 1))
    product = round_updates(updates, global_state, space="product", weighting="uniform")
    factors = round_updates(updates, global_state, space="factors", weighting="uniform")
    assert int(torch.argmax(factors.sq_norms)) == 4
    # in products, client 4 changes the layer by 0.1 * (A + 50): it is the outlier for the
    # change it makes, not for the size of its A
    changes = product.sq_norms
    assert float(changes[4]) > float(changes[:4].max())


ROBUST = ["median", "trimmed_mean", "krum", "multi_krum", "bulyan", "geometric_median",
          "centered_clipping", "norm_bounding", "fltrust", "dnc", "clipped_clustering"]


def iid_updates(n: int = 15, width: int = 40, seed: int = 5) -> list[ClientUpdate]:
    generator = torch.Generator().manual_seed(seed)
    centre = torch.randn(width, generator=generator, dtype=torch.float64)
    rows = centre + 0.1 * torch.randn(n, width, generator=generator, dtype=torch.float64)
    return updates_of(rows)


@pytest.mark.parametrize("name", ROBUST)
def test_without_attackers_every_aggregator_stays_near_the_mean(name: str) -> None:
    updates = iid_updates()
    rows = torch.stack([u.payload["w"] for u in updates])
    mean, spread = rows.mean(0), float((rows - rows.mean(0)).norm(dim=1).mean())
    aggregator: RobustAggregator = AGGREGATORS.get(name)(AlgorithmConfig(
        robust=RobustAggregationConfig(byzantine_fraction=0.2, dnc_dim=40)))
    if isinstance(aggregator, FLTrust):
        aggregator.bind_root(lambda g: OrderedDict(w=mean.clone()))
    global_state = OrderedDict(w=torch.zeros_like(mean))
    out = aggregator.aggregate_robust(global_state, updates, 1)["w"]
    error = float((out - mean).norm())
    # never farther than a typical single client (Krum returns one), a tenth of the mean
    assert error < 1.2 * spread and error < 0.15 * float(mean.norm())
    if name != "krum":  # rules that average several updates: well inside the spread
        assert error < 0.5 * spread


@pytest.mark.parametrize("name", ROBUST)
def test_every_aggregator_resists_a_far_outlier(name: str) -> None:
    updates = iid_updates()
    rows = torch.stack([u.payload["w"] for u in updates])
    mean = rows.mean(0)
    attacked = list(updates)
    for index in (0, 1):  # 2 of 15 send a huge update
        attacked[index] = ClientUpdate(index, OrderedDict(w=-100 * mean), 1)
    aggregator: RobustAggregator = AGGREGATORS.get(name)(AlgorithmConfig(
        robust=RobustAggregationConfig(byzantine_fraction=0.2, dnc_dim=40)))
    if isinstance(aggregator, FLTrust):
        aggregator.bind_root(lambda g: OrderedDict(w=mean.clone()))
    out = aggregator.aggregate_robust(OrderedDict(w=torch.zeros_like(mean)), attacked, 1)["w"]
    plain = torch.stack([u.payload["w"] for u in attacked]).mean(0)
    assert float((out - mean).norm()) < 0.1 * float((plain - mean).norm())
    if aggregator.last_flagged is not None:
        assert {0, 1} <= set(aggregator.last_flagged)


def test_robust_aggregators_are_refused_next_to_secure_aggregation(cls_config) -> None:
    from fedfm.config import ConfigError

    for name in ROBUST:
        config = cls_config(algorithm={"aggregator": name},
                            privacy={"secure_aggregation": {}})
        with pytest.raises(ConfigError, match="secure aggregation reveals only the sum"):
            from fedfm.api import check_components
            check_components(config)


def test_centered_clipping_state_survives_a_checkpoint() -> None:
    aggregator = AGGREGATORS.get("centered_clipping")(AlgorithmConfig())
    updates = iid_updates(n=5)
    aggregator.aggregate_robust(None, updates, 1)
    saved = aggregator.state_dict()
    again = AGGREGATORS.get("centered_clipping")(AlgorithmConfig())
    again.load_state_dict(saved)
    first = aggregator.aggregate_robust(None, updates, 2)["w"]
    second = again.aggregate_robust(None, updates, 2)["w"]
    assert torch.equal(first, second)
