"""Affine (min-max) quantization of an update to 8, 4 or 2 bits, per tensor or per block.

Each block of values is mapped onto ``L = 2**bits - 1`` evenly spaced levels between its minimum
and maximum, and each value is sent as the index of a level, packed ``8 / bits`` to a byte, with
the block's minimum and step as float32. ``rounding: nearest`` picks the closest level (error at
most half a step, biased); ``rounding: stochastic`` rounds up with probability equal to the
fractional part, so the decoded value is an unbiased estimate of the input (Gupta et al., "Deep
Learning with Limited Numerical Precision", ICML 2015). Smaller blocks follow the local range of
the values at the cost of two float32 per block (block-wise quantization: Dettmers et al.,
"8-bit Optimizers via Block-wise Quantization", ICLR 2022). The use of quantized updates in
federated learning follows Konečný et al., "Federated Learning: Strategies for Improving
Communication Efficiency", NIPS Workshop on Private Multi-Party Machine Learning, 2016.
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


class AffineQuantizer:
    value_part = None

    def __init__(self, bits: int, rounding: str, block_size: int | None) -> None:
        self.bits = bits
        self.levels = (1 << bits) - 1
        self.stochastic = rounding == "stochastic"
        self.block_size = block_size

    def spec(self, numel: int) -> dict[str, PartSpec]:
        blocks = num_blocks(numel, self.block_size)
        return {"codes": ((packed_length(numel, self.bits),), torch.uint8),
                "offset": ((blocks,), torch.float32),
                "step": ((blocks,), torch.float32)}

    def encode(self, vector: torch.Tensor, generator: torch.Generator) -> Parts:
        blocks = as_blocks(vector, self.block_size, pad="edge")
        low = blocks.amin(dim=1)
        step = (blocks.amax(dim=1) - low) / self.levels
        safe = torch.where(step > 0, step, torch.ones_like(step))
        position = (blocks - low[:, None]) / safe[:, None]  # in [0, L]
        if self.stochastic:
            codes = torch.floor(position + uniform_noise(position.shape, generator))
        else:
            codes = torch.round(position)
        codes = codes.clamp_(0, self.levels).reshape(-1)[: vector.numel()]
        return {"codes": pack_codes(codes, self.bits), "offset": low.contiguous(),
                "step": step.contiguous()}

    def decode(self, parts: Mapping[str, torch.Tensor], numel: int) -> torch.Tensor:
        codes = unpack_codes(parts["codes"], self.bits, numel).to(torch.float32)
        block = self._block_of(numel)
        return parts["offset"][block] + codes * parts["step"][block]

    def check(self, parts: Mapping[str, torch.Tensor], numel: int) -> None:
        require_finite(parts, ["offset", "step"])
        if (parts["step"] < 0).any():
            raise ValueError("part 'step' holds a negative quantization step")

    def _block_of(self, numel: int) -> torch.Tensor:
        if self.block_size is None:
            return torch.zeros(numel, dtype=torch.int64)
        return torch.arange(numel) // self.block_size


@COMPRESSORS.register("quantize", MethodInfo(
    "efficiency.communication.compression",
    "Deep Learning with Limited Numerical Precision (Gupta et al., ICML 2015); 8-bit "
    "Optimizers via Block-wise Quantization (Dettmers et al., ICLR 2022)",
    "algorithm: {compression: {chain: [{kind: quantize, bits: 8, rounding: stochastic, "
    "block_size: 256}]}}",
    "min-max quantization to 8/4/2 bits, per tensor or per block; nearest or unbiased "
    "stochastic rounding"))
def build_quantizer(cfg: CompressorConfig) -> AffineQuantizer:
    return AffineQuantizer(cfg.bits, cfg.rounding, cfg.block_size)
