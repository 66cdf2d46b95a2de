"""QSGD: unbiased quantization to sign + magnitude levels scaled by the L2 norm.

Alistarh, Grubic, Li, Tomioka & Vojnovic, "QSGD: Communication-Efficient SGD via Gradient
Quantization and Encoding", NeurIPS 2017. With ``s = 2**(bits-1) - 1`` levels, each value ``v_i``
of a block ``v`` becomes ``||v|| sign(v_i) l_i / s`` where ``l_i`` is ``s |v_i| / ||v||`` rounded up
with probability equal to its fractional part: unbiased, with variance at most
``min(n / s**2, sqrt(n) / s) ||v||**2`` for a block of ``n`` values (their Lemma 3.1). Blocks are
the paper's "bucketing" (``block_size``); the sign and level travel as one ``bits``-bit code
``l_i sign(v_i) + s`` and the norm as float32 per block.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedfm.config import CompressorConfig
from fedfm.core.registries import COMPRESSORS
from fedfm.core.registry import MethodInfo
from fedfm.efficiency.compression.base import (
    Parts,
    PartSpec,
    as_blocks,
    num_blocks,
    pack_codes,
    packed_length,
    require_finite,
    uniform_noise,
    unpack_codes,
)


class QSGDQuantizer:
    value_part = None

    def __init__(self, bits: int, block_size: int | None) -> None:
        self.bits = bits
        self.levels = (1 << (bits - 1)) - 1
        self.block_size = block_size

    def spec(self, numel: int) -> dict[str, PartSpec]:
        return {"codes": ((packed_length(numel, self.bits),), torch.uint8),
                "norm": ((num_blocks(numel, self.block_size),), torch.float32)}

    def encode(self, vector: torch.Tensor, generator: torch.Generator) -> Parts:
        blocks = as_blocks(vector, self.block_size, pad="zero")
        norm = torch.linalg.vector_norm(blocks, dim=1)
        safe = torch.where(norm > 0, norm, torch.ones_like(norm))
        scaled = blocks.abs() / safe[:, None] * self.levels  # in [0, s]
        level = torch.floor(scaled + uniform_noise(scaled.shape, generator))
        level = level.clamp_(0, self.levels) * torch.sign(blocks)
        codes = (level + self.levels).reshape(-1)[: vector.numel()]
        return {"codes": pack_codes(codes, self.bits), "norm": norm.contiguous()}

    def decode(self, parts: Mapping[str, torch.Tensor], numel: int) -> torch.Tensor:
        level = unpack_codes(parts["codes"], self.bits, numel).to(torch.float32) - self.levels
        block = (torch.zeros(numel, dtype=torch.int64) if self.block_size is None
                 else torch.arange(numel) // self.block_size)
        return parts["norm"][block] * level / self.levels

    def check(self, parts: Mapping[str, torch.Tensor], numel: int) -> None:
        require_finite(parts, ["norm"])
        if (parts["norm"] < 0).any():
            raise ValueError("part 'norm' holds a negative norm")
        codes = unpack_codes(parts["codes"], self.bits, numel)
        if numel and int(codes.max()) > 2 * self.levels:
            raise ValueError(f"part 'codes' holds a code above {2 * self.levels}, which no "
                             f"{self.bits}-bit QSGD encoder emits")


@COMPRESSORS.register("qsgd", MethodInfo(
    "efficiency.communication.compression",
    "QSGD: Communication-Efficient SGD via Gradient Quantization and Encoding "
    "(Alistarh et al., NeurIPS 2017)",
    "algorithm: {compression: {chain: [{kind: qsgd, bits: 4, block_size: 512}]}}",
    "unbiased sign + magnitude levels scaled by each block's L2 norm"))
def build_qsgd(cfg: CompressorConfig) -> QSGDQuantizer:
    return QSGDQuantizer(cfg.bits, cfg.block_size)
