"""What every update compressor shares: the per-vector codec protocol, chaining, bit packing
and blocks.

A ``Compressor`` encodes one flat float32 vector into named parts (codes, scales, indices,
kept values) and decodes them given only the vector's length: every part's shape follows from
that length, so the server knows exactly what a well-formed encoding looks like before it
reads one (``spec``) and refuses anything else. A compressor that keeps some of the values
(top-k, random-k) names that part ``value_part``; the next compressor of a chain encodes it in
turn (sparsify, then quantize the kept values).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol

import torch

from fedfm.core.registries import COMPRESSORS

Parts = dict[str, torch.Tensor]
PartSpec = tuple[tuple[int, ...], torch.dtype]
PART_SEP = "."  # a chained part: "<value part>.<part of the next compressor>"


class Compressor(Protocol):
    """One lossy codec of flat float32 vectors."""

    value_part: str | None  # the part a following compressor may encode (None: codes only)

    def spec(self, numel: int) -> dict[str, PartSpec]:
        """Shape and dtype of every part of an encoded vector of ``numel`` values."""
        ...

    def encode(self, vector: torch.Tensor, generator: torch.Generator) -> Parts: ...

    def decode(self, parts: Mapping[str, torch.Tensor], numel: int) -> torch.Tensor: ...

    def check(self, parts: Mapping[str, torch.Tensor], numel: int) -> None:
        """Raise ValueError for well-shaped parts a decoder must not trust (an index out of
        range, a code no encoder emits, a negative scale)."""
        ...


class CompressionChain:
    """Compressors applied in order, each after the first to the previous one's kept values."""

    def __init__(self, steps: Sequence[Compressor]) -> None:
        if not steps:
            raise ValueError("a compression chain needs at least one compressor")
        for index, step in enumerate(steps[:-1]):
            if step.value_part is None:
                raise ValueError(f"compression.chain[{index + 1}] follows "
                                 f"{type(step).__name__}, whose output is final codes; put "
                                 f"sparsifiers (topk, randk) before quantizers")
        self.steps = list(steps)

    def spec(self, numel: int) -> dict[str, PartSpec]:
        head, rest = self.steps[0], self.steps[1:]
        found = dict(head.spec(numel))
        if rest:
            assert head.value_part is not None
            kept_shape, _ = found.pop(head.value_part)
            inner = CompressionChain(rest).spec(math.prod(kept_shape))
            found.update({f"{head.value_part}{PART_SEP}{k}": v for k, v in inner.items()})
        return found

    def encode(self, vector: torch.Tensor, generator: torch.Generator) -> Parts:
        head, rest = self.steps[0], self.steps[1:]
        parts = head.encode(vector, generator)
        if rest:
            assert head.value_part is not None
            kept = parts.pop(head.value_part)
            inner = CompressionChain(rest).encode(kept, generator)
            parts.update({f"{head.value_part}{PART_SEP}{k}": v for k, v in inner.items()})
        return parts

    def _split(self, parts: Mapping[str, torch.Tensor], numel: int
               ) -> tuple[Parts, Parts, int]:
        """(the head's own parts, the rest's parts, the kept values' length)."""
        head = self.steps[0]
        prefix = f"{head.value_part}{PART_SEP}"
        own = {k: v for k, v in parts.items() if not k.startswith(prefix)}
        nested = {k[len(prefix):]: v for k, v in parts.items() if k.startswith(prefix)}
        kept_shape, _ = head.spec(numel)[head.value_part]  # type: ignore[index]
        return own, nested, math.prod(kept_shape)

    def decode(self, parts: Mapping[str, torch.Tensor], numel: int) -> torch.Tensor:
        head, rest = self.steps[0], self.steps[1:]
        if not rest:
            return head.decode(parts, numel)
        own, nested, kept = self._split(parts, numel)
        own[head.value_part] = CompressionChain(rest).decode(nested, kept)  # type: ignore[index]
        return head.decode(own, numel)

    def check(self, parts: Mapping[str, torch.Tensor], numel: int) -> None:
        head, rest = self.steps[0], self.steps[1:]
        if not rest:
            head.check(parts, numel)
            return
        own, nested, kept = self._split(parts, numel)
        inner = CompressionChain(rest)
        inner.check(nested, kept)
        own[head.value_part] = inner.decode(nested, kept)  # type: ignore[index]
        head.check(own, numel)

    @property
    def lossy(self) -> bool:
        return True  # every registered compressor is lossy


def build_chain(configs: Sequence[object]) -> CompressionChain:
    """The chain of ``algorithm.compression.chain`` (each entry a ``CompressorConfig``)."""
    return CompressionChain([COMPRESSORS.get(cfg.kind)(cfg) for cfg in configs])  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- helpers


def num_blocks(numel: int, block_size: int | None) -> int:
    return 1 if block_size is None else max(1, math.ceil(numel / block_size))


def as_blocks(vector: torch.Tensor, block_size: int | None, pad: str) -> torch.Tensor:
    """``[blocks, size]``: the whole vector as one block, or blocks of ``block_size`` with the
    last one padded (``pad="edge"`` repeats the last value, which leaves min and max alone;
    ``"zero"`` leaves norms alone)."""
    numel = vector.numel()
    if block_size is None:
        return vector.reshape(1, numel)
    blocks = num_blocks(numel, block_size)
    missing = blocks * block_size - numel
    if missing:
        fill = vector[-1:].expand(missing) if pad == "edge" else vector.new_zeros(missing)
        vector = torch.cat([vector, fill])
    return vector.reshape(blocks, block_size)


def packed_length(numel: int, bits: int) -> int:
    return math.ceil(numel * bits / 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes in ``[0, 2**bits)`` packed ``8 // bits`` to a byte (uint8, low bits first)."""
    per_byte = 8 // bits
    flat = codes.reshape(-1).to(torch.uint8)
    missing = (-flat.numel()) % per_byte
    if missing:
        flat = torch.cat([flat, flat.new_zeros(missing)])
    shifts = torch.arange(per_byte, dtype=torch.uint8) * bits
    return (flat.reshape(-1, per_byte) << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.uint8) * bits
    mask = (1 << bits) - 1
    codes = (packed.reshape(-1, 1) >> shifts) & mask
    return codes.reshape(-1)[:numel].to(torch.int64)


def uniform_noise(shape: torch.Size | tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """U[0, 1) draws for stochastic rounding."""
    return torch.rand(shape, generator=generator, dtype=torch.float32)


def require_finite(parts: Mapping[str, torch.Tensor], names: Sequence[str]) -> None:
    for name in names:
        if not torch.isfinite(parts[name]).all():
            raise ValueError(f"part {name!r} holds non-finite values")
