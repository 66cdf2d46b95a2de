"""Sparsification: send a ``fraction`` of each tensor's entries.

``topk`` keeps the entries of largest magnitude and sends their values and int32 indices
(Aji & Heafield, "Sparse Communication for Distributed Gradient Descent", EMNLP 2017; with error
feedback it is Stich, Cordonnier & Jaggi, "Sparsified SGD with Memory", NeurIPS 2018).
``randk`` keeps a uniformly random subset drawn from a seed and sends the values and that one
seed, from which the server regenerates the indices (the random mask of Konečný et al.,
"Federated Learning: Strategies for Improving Communication Efficiency", NIPS Workshop on
Private Multi-Party Machine Learning, 2016); with ``unbiased`` the kept values are scaled by
``n / k`` so that the decoded update is an unbiased estimate. The kept values are the part a
following quantizer of the chain encodes.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedfm.config import CompressorConfig
from fedfm.core.registries import COMPRESSORS
from fedfm.core.registry import MethodInfo
from fedfm.efficiency.compression.base import Parts, PartSpec, require_finite

_INT32_LIMIT = 2**31 - 1


def kept_count(numel: int, fraction: float) -> int:
    """``round(fraction * numel)``, at least one entry and at most all of them."""
    return max(1, min(numel, round(fraction * numel)))


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel <= _INT32_LIMIT else torch.int64


def _scatter(values: torch.Tensor, indices: torch.Tensor, numel: int) -> torch.Tensor:
    dense = torch.zeros(numel, dtype=torch.float32)
    dense[indices.to(torch.int64)] = values.to(torch.float32)
    return dense


class TopK:
    value_part = "values"

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction

    def spec(self, numel: int) -> dict[str, PartSpec]:
        kept = kept_count(numel, self.fraction)
        return {"values": ((kept,), torch.float32), "indices": ((kept,), _index_dtype(numel))}

    def encode(self, vector: torch.Tensor, generator: torch.Generator) -> Parts:
        kept = kept_count(vector.numel(), self.fraction)
        indices = torch.topk(vector.abs(), kept, sorted=False).indices.sort().values
        return {"values": vector[indices].contiguous(),
                "indices": indices.to(_index_dtype(vector.numel()))}

    def decode(self, parts: Mapping[str, torch.Tensor], numel: int) -> torch.Tensor:
        return _scatter(parts["values"], parts["indices"], numel)

    def check(self, parts: Mapping[str, torch.Tensor], numel: int) -> None:
        require_finite(parts, ["values"])
        indices = parts["indices"].to(torch.int64)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= numel):
            raise ValueError(f"part 'indices' points outside the tensor's {numel} entries")
        if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
            raise ValueError("part 'indices' must be strictly increasing (sorted, no repeats)")


class RandK:
    value_part = "values"

    def __init__(self, fraction: float, unbiased: bool) -> None:
        self.fraction = fraction
        self.unbiased = unbiased

    def spec(self, numel: int) -> dict[str, PartSpec]:
        return {"values": ((kept_count(numel, self.fraction),), torch.float32),
                "seed": ((1,), torch.int64)}

    def indices(self, seed: int, numel: int) -> torch.Tensor:
        """The kept entries of a tensor of ``numel`` values for ``seed``: what the client drew
        and the server regenerates (torch's CPU generator; same torch version both sides)."""
        drawn = torch.randperm(numel, generator=torch.Generator().manual_seed(seed))
        return drawn[: kept_count(numel, self.fraction)].sort().values

    def encode(self, vector: torch.Tensor, generator: torch.Generator) -> Parts:
        seed = torch.randint(0, 2**62, (1,), generator=generator, dtype=torch.int64)
        values = vector[self.indices(int(seed), vector.numel())]
        if self.unbiased:
            values = values * (vector.numel() / values.numel())
        return {"values": values.contiguous(), "seed": seed}

    def decode(self, parts: Mapping[str, torch.Tensor], numel: int) -> torch.Tensor:
        return _scatter(parts["values"], self.indices(int(parts["seed"]), numel), numel)

    def check(self, parts: Mapping[str, torch.Tensor], numel: int) -> None:
        require_finite(parts, ["values"])
        if int(parts["seed"]) < 0:
            raise ValueError("part 'seed' must be a non-negative 64-bit integer")


@COMPRESSORS.register("topk", MethodInfo(
    "efficiency.communication.compression",
    "Sparse Communication for Distributed Gradient Descent (Aji & Heafield, EMNLP 2017); "
    "Sparsified SGD with Memory (Stich et al., NeurIPS 2018)",
    "algorithm: {compression: {chain: [{kind: topk, fraction: 0.05}], error_feedback: true}}",
    "largest-magnitude entries of each tensor: values + int32 indices"))
def build_topk(cfg: CompressorConfig) -> TopK:
    assert cfg.fraction is not None
    return TopK(cfg.fraction)


@COMPRESSORS.register("randk", MethodInfo(
    "efficiency.communication.compression",
    "Federated Learning: Strategies for Improving Communication Efficiency (Konečný et al., "
    "NIPS Workshop on Private Multi-Party ML, 2016)",
    "algorithm: {compression: {chain: [{kind: randk, fraction: 0.1, unbiased: true}]}}",
    "a random subset of each tensor from a seed: values + one seed"))
def build_randk(cfg: CompressorConfig) -> RandK:
    assert cfg.fraction is not None
    return RandK(cfg.fraction, cfg.unbiased)
