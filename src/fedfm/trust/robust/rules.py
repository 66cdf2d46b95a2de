"""Byzantine-robust aggregation rules as plain functions of one round's updates.

Rules that measure work from the round's Gram matrix (inner products in the measuring space, see
``geometry``) or the squared distances derived from it, so LoRA product space never has to be
materialised; coordinate-wise rules take the raw rows. Each returns either per-client
coefficients (the output is ``sum_i c_i raw_i``) or the aggregate vector itself. ``f`` is the
number of Byzantine clients the rule must tolerate.

* Coordinate-wise median and trimmed mean: Yin, Chen, Ramchandran & Bartlett, "Byzantine-Robust
  Distributed Learning: Towards Optimal Statistical Rates", ICML 2018.
* Krum and Multi-Krum: Blanchard, El Mhamdi, Guerraoui & Stainer, "Machine Learning with
  Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017.
* Bulyan: El Mhamdi, Guerraoui & Rouault, "The Hidden Vulnerability of Distributed Learning in
  Byzantium", ICML 2018.
* Geometric median (RFA, smoothed Weiszfeld): Pillutla, Kakade & Harchaoui, "Robust Aggregation
  for Federated Learning", IEEE Transactions on Signal Processing, 2022.
* Centered clipping: Karimireddy, He & Jaggi, "Learning from History for Byzantine Robust
  Optimization", ICML 2021.
* Norm bounding: Sun, Kairouz, Suresh & McMahan, "Can You Really Backdoor Federated Learning?",
  arXiv:1911.07963, 2019.
* FLTrust: Cao, Fang, Liu & Gong, "FLTrust: Byzantine-robust Federated Learning via Trust
  Bootstrapping", NDSS 2021.
* DnC: Shejwalkar & Houmansadr, "Manipulating the Byzantine: Optimizing Model Poisoning Attacks
  and Defenses for Federated Learning", NDSS 2021.
* Clipped clustering: Li, Sun & Zheng, "An Experimental Study of Byzantine-Robust Aggregation
  Schemes in Federated Learning", IEEE Transactions on Big Data, 2023.

Written here rather than taken from a library: the maintained implementations (blades, Flower's
strategies) work on CNN gradient lists and fix one geometry; fedfm needs them on named adapter
States, in LoRA product space or on factors, with the selected clients reported.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform


class AggregationError(ValueError):
    """A rule's precondition on the number of clients does not hold this round."""


def byzantine_count(n: int, fraction: float) -> int:
    return int(math.floor(fraction * n + 1e-9))


def coordinate_median(raw: torch.Tensor) -> torch.Tensor:
    """Per coordinate, the middle value (mean of the two middle values when ``n`` is even)."""
    ordered = raw.sort(dim=0).values
    n = raw.shape[0]
    if n % 2:
        return ordered[n // 2].clone()
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def trimmed_mean(raw: torch.Tensor, trimmed: int) -> torch.Tensor:
    """Per coordinate, drop the ``trimmed`` largest and smallest values and average the rest."""
    n = raw.shape[0]
    if 2 * trimmed >= n:
        raise AggregationError(f"trimmed mean: trimming {trimmed} from each side of {n} "
                               f"updates leaves none (lower algorithm.robust.trim_ratio)")
    return raw.sort(dim=0).values[trimmed:n - trimmed].mean(dim=0)


def krum_scores(distances: torch.Tensor, f: int) -> torch.Tensor:
    """Krum's score of each update from the ``[n, n]`` squared distances: the sum of squared
    distances to its ``n - f - 2`` nearest neighbours."""
    n = distances.shape[0]
    neighbours = n - f - 2
    if neighbours < 1:
        raise AggregationError(f"Krum needs n > f + 2 updates; got n={n}, f={f}")
    others = distances + torch.diag(torch.full((n,), math.inf, dtype=distances.dtype))
    return others.sort(dim=1).values[:, :neighbours].sum(dim=1)


def krum(distances: torch.Tensor, f: int) -> int:
    """Index of the update Krum selects (Blanchard et al. require ``n >= 2f + 3``)."""
    n = distances.shape[0]
    if n < 2 * f + 3:
        raise AggregationError(f"Krum needs n >= 2f + 3 updates; got n={n}, f={f} (lower "
                               f"algorithm.robust.byzantine_fraction or sample more clients)")
    return int(torch.argmin(krum_scores(distances, f)))


def multi_krum(distances: torch.Tensor, f: int, m: int) -> list[int]:
    """The ``m`` updates with the best Krum scores (their mean is Multi-Krum's output)."""
    n = distances.shape[0]
    if n < 2 * f + 3:
        raise AggregationError(f"Multi-Krum needs n >= 2f + 3 updates; got n={n}, f={f}")
    return torch.argsort(krum_scores(distances, f), stable=True)[: min(m, n)].tolist()


def bulyan(distances: torch.Tensor, raw: torch.Tensor, f: int
           ) -> tuple[torch.Tensor, list[int]]:
    """Bulyan over Krum: pick ``theta = n - 2f`` updates by repeated Krum, then per coordinate
    average the ``beta = theta - 2f`` selected values closest to their median."""
    n = distances.shape[0]
    if n < 4 * f + 3:
        raise AggregationError(f"Bulyan needs n >= 4f + 3 updates; got n={n}, f={f}")
    remaining = list(range(n))
    selected: list[int] = []
    while len(selected) < n - 2 * f:
        # Krum on the remaining set; its neighbourhood shrinks with the set (at least 1)
        neighbours = max(1, len(remaining) - f - 2)
        sub = distances[remaining][:, remaining]
        sub = sub + torch.diag(torch.full((len(remaining),), math.inf, dtype=sub.dtype))
        scores = sub.sort(dim=1).values[:, :neighbours].sum(dim=1)
        chosen = remaining[int(torch.argmin(scores))]
        selected.append(chosen)
        remaining.remove(chosen)
    chosen_raw = raw[selected]
    beta = len(selected) - 2 * f
    median = coordinate_median(chosen_raw)
    closest = (chosen_raw - median).abs().argsort(dim=0, stable=True)[:beta]
    return chosen_raw.gather(0, closest).mean(dim=0), selected


def _distances_to(gram: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """``|x_i - sum_j c_j x_j|`` for every point, from the Gram matrix."""
    moved = gram @ coefficients
    return (gram.diagonal() - 2 * moved + coefficients @ moved).clamp(min=0).sqrt()


def geometric_median(gram: torch.Tensor, weights: torch.Tensor, *, iters: int, tol: float,
                     smoothing: float = 1e-8) -> torch.Tensor:
    """Coefficients ``alpha`` (summing to 1) of the weighted geometric median ``sum alpha_i
    x_i``, by the smoothed Weiszfeld iteration of RFA."""
    alpha = weights / weights.sum()
    for _ in range(iters):
        distances = _distances_to(gram, alpha).clamp(min=smoothing)
        updated = weights / distances
        updated = updated / updated.sum()
        step = updated - alpha
        moved = float((step @ gram @ step).clamp(min=0).sqrt())
        center = float((updated @ gram @ updated).clamp(min=0).sqrt())
        alpha = updated
        if moved <= tol * max(1.0, center):
            break
    return alpha


def centered_clipping(gram: torch.Tensor, *, radius: float | None, iters: int
                      ) -> tuple[torch.Tensor, float]:
    """Centered clipping started at point 0 of ``gram`` (the prior center; the updates are
    points ``1..n``): ``v <- v + (1/n) sum_i (x_i - v) min(1, tau / |x_i - v|)``. The
    coefficients over all points and the radius used (None: the median distance of the updates
    to the prior)."""
    n = gram.shape[0] - 1
    coefficients = torch.zeros(n + 1, dtype=torch.float64)
    coefficients[0] = 1.0
    if radius is None:
        radius = float(_distances_to(gram, coefficients)[1:].median())
    for _ in range(iters):
        distances = _distances_to(gram, coefficients)[1:]
        scale = torch.where(distances > 0, (radius / distances.clamp(min=1e-300)).clamp(max=1.0),
                            torch.zeros_like(distances))
        # v + (1/n) sum s_i (x_i - v): v's own coefficients shrink by (1 - mean s)
        coefficients = coefficients * (1 - scale.sum() / n)
        coefficients[1:] += scale / n
    return coefficients, radius


def norm_bounding(norms: torch.Tensor, weights: torch.Tensor, bound: float | None
                  ) -> tuple[torch.Tensor, float]:
    """Coefficients of the weighted mean of updates clipped to norm ``bound`` (None: the
    round's median norm), and the bound used."""
    if bound is None:
        bound = float(norms.median())
    factors = torch.where(norms > 0, (bound / norms.clamp(min=1e-300)).clamp(max=1.0),
                          torch.ones_like(norms))
    return weights * factors, bound


def fltrust(gram: torch.Tensor) -> torch.Tensor:
    """FLTrust's coefficients for points ``1..n`` of ``gram`` (point 0 is the server's root
    update ``g_0``): trust ``ReLU(cos(x_i, g_0))``, each update rescaled to ``|g_0|``,
    normalised by the total trust (all zero: no update)."""
    norms = gram.diagonal().clamp(min=0).sqrt()
    root_norm, client_norms = norms[0], norms[1:]
    if float(root_norm) == 0.0:
        return torch.zeros(len(client_norms), dtype=torch.float64)
    cosine = gram[0, 1:] / (client_norms * root_norm).clamp(min=1e-300)
    trust = torch.relu(torch.where(client_norms > 0, cosine, torch.zeros_like(cosine)))
    if float(trust.sum()) == 0.0:
        return torch.zeros_like(trust)
    return trust * (root_norm / client_norms.clamp(min=1e-300)) / trust.sum()


def dnc(coordinates: Callable[[torch.Tensor], torch.Tensor], n: int, width: int, f: int, *,
        iters: int, dim: int, filter_frac: float, generator: torch.Generator) -> list[int]:
    """Indices DnC keeps: in each iteration, read ``dim`` random coordinates of every update
    (``coordinates(index) -> [n, len(index)]``), score each centered update by its squared
    projection on the top singular vector, drop the ``filter_frac * f`` highest; keep the
    updates no iteration dropped."""
    removed = int(math.floor(filter_frac * f))
    kept = set(range(n))
    if removed == 0:
        return sorted(kept)
    for _ in range(iters):
        columns = torch.randperm(width, generator=generator)[: min(dim, width)]
        sample = coordinates(columns)
        centered = sample - sample.mean(dim=0)
        _, _, right = torch.linalg.svd(centered, full_matrices=False)
        scores = (centered @ right[0]).pow(2)
        survivors = torch.argsort(scores, stable=True)[: n - removed].tolist()
        kept &= set(survivors)
    return sorted(kept)


def clipped_clustering(gram: torch.Tensor, bound: float) -> tuple[torch.Tensor, list[int]]:
    """Clip every update to ``bound``, split the clipped updates in two by agglomerative
    clustering on cosine distance (average linkage; clipping leaves cosines unchanged), and
    average the larger cluster: its coefficients and members."""
    n = gram.shape[0]
    norms = gram.diagonal().clamp(min=0).sqrt()
    factors = torch.where(norms > 0, (bound / norms.clamp(min=1e-300)).clamp(max=1.0),
                          torch.ones_like(norms))
    if n < 3:
        return factors / n, list(range(n))
    cosine = gram / (norms[:, None] * norms[None, :]).clamp(min=1e-300)
    distance = (1 - cosine).clamp(min=0, max=2).numpy()
    np.fill_diagonal(distance, 0.0)
    distance = (distance + distance.T) / 2
    labels = fcluster(linkage(squareform(distance, checks=False), method="average"), t=2,
                      criterion="maxclust")
    sizes = np.bincount(labels)
    largest = int(np.argmax(sizes))  # ties: the cluster numbered first
    members = [i for i in range(n) if labels[i] == largest]
    coefficients = torch.zeros(n, dtype=torch.float64)
    coefficients[members] = factors[members] / len(members)
    return coefficients, members
