"""The compression transform around any delta-based algorithm: the client half encodes its
update (after error-feedback correction), the server half decodes it back to a dense delta
before validation, aggregation and the server optimizer.

An encoding is a State of parts named ``"<tensor>::<part>"`` (``lora_A.weight::codes``,
``...::values.offset``) whose exact names, shapes and dtypes follow from the global State and
the chain (``encoded_spec``). Because the server knows that layout, the parts travel as one
uint8 tensor (``pack``: their bytes back to back in spec order), so the update's safetensors
header holds one entry instead of two or three per tensor (on W1's LoRA, 12% of an int8
upload). ``bytes_up`` is the serialized size of that State. The server refuses a blob of the
wrong length, and anything a decoder must not trust, with a ValueError naming the tensor: the
round loop then rejects that client's update.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

from fedfm.config import CompressionConfig
from fedfm.core import state as state_ops
from fedfm.core.algorithm import (
    Algorithm,
    ClientContext,
    ClientProcedure,
    ClientResult,
    ClientState,
    ServerRule,
    ServerWrapper,
)
from fedfm.core.loop import derive_seed
from fedfm.core.state import State
from fedfm.core.update import Broadcast, ClientUpdate
from fedfm.efficiency.compression import error_feedback
from fedfm.efficiency.compression.base import CompressionChain, PartSpec, build_chain

KEY_SEP = "::"
BLOB_KEY = "compressed"  # the one tensor of a compressed payload
_COMPRESSION_STREAM = 11  # the client's compression randomness, apart from its training's


def encode_state(chain: CompressionChain, state: Mapping[str, torch.Tensor],
                 generator: torch.Generator) -> State:
    """Every floating-point tensor encoded by ``chain``; other tensors as they are."""
    encoded: State = OrderedDict()
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            encoded[key] = tensor
            continue
        flat = tensor.detach().reshape(-1).to(torch.float32)
        for part, value in chain.encode(flat, generator).items():
            encoded[f"{key}{KEY_SEP}{part}"] = value
    return encoded


def encoded_spec(chain: CompressionChain, like: Mapping[str, torch.Tensor]
                 ) -> dict[str, PartSpec]:
    """Name, shape and dtype of every tensor of a well-formed encoding of a State like
    ``like``."""
    found: dict[str, PartSpec] = {}
    for key, tensor in like.items():
        if not tensor.is_floating_point():
            found[key] = (tuple(tensor.shape), tensor.dtype)
            continue
        for part, spec in chain.spec(tensor.numel()).items():
            found[f"{key}{KEY_SEP}{part}"] = spec
    return found


def _check_layout(encoded: Mapping[str, Any], spec: Mapping[str, PartSpec]) -> None:
    missing = [k for k in spec if k not in encoded]
    extra = [k for k in encoded if k not in spec]
    if missing or extra:
        raise ValueError(f"compressed payload: tensors differ from the encoding of the global "
                         f"State (missing {missing[:3]}, unexpected {extra[:3]})")
    for key, (shape, dtype) in spec.items():
        got = encoded[key]
        if not isinstance(got, torch.Tensor):
            raise ValueError(f"compressed payload {key}: {type(got).__name__}, not a tensor")
        if tuple(got.shape) != shape or got.dtype != dtype:
            raise ValueError(f"compressed payload {key}: {got.dtype} {tuple(got.shape)}, "
                             f"expected {dtype} {shape}")


def pack(encoded: Mapping[str, torch.Tensor], spec: Mapping[str, PartSpec]) -> State:
    """The encoding as one uint8 tensor: each part's bytes in spec order."""
    blob = torch.cat([encoded[key].contiguous().reshape(-1).view(torch.uint8) for key in spec])
    return OrderedDict([(BLOB_KEY, blob)])


def unpack(payload: Mapping[str, Any], spec: Mapping[str, PartSpec]) -> State:
    """The parts of a packed encoding; a ValueError when it is not one of ``spec``'s size."""
    blob = payload.get(BLOB_KEY) if set(payload) == {BLOB_KEY} else None
    if not isinstance(blob, torch.Tensor) or blob.dtype != torch.uint8 or blob.dim() != 1:
        raise ValueError(f"compressed payload: expected one 1-D uint8 tensor {BLOB_KEY!r}, got "
                         f"{sorted(payload)[:3]}")
    sizes = {k: math.prod(shape) * dtype.itemsize for k, (shape, dtype) in spec.items()}
    if blob.numel() != sum(sizes.values()):
        raise ValueError(f"compressed payload: {blob.numel()} bytes, expected "
                         f"{sum(sizes.values())} for this chain and global State")
    parts: State = OrderedDict()
    offset = 0
    for key, (shape, dtype) in spec.items():
        piece = blob[offset:offset + sizes[key]].clone()  # its own storage: aligned for view
        parts[key] = piece.view(dtype).reshape(shape)
        offset += sizes[key]
    return parts


def decode_state(chain: CompressionChain, encoded: Mapping[str, torch.Tensor],
                 like: Mapping[str, torch.Tensor]) -> State:
    """The dense State (``like``'s names, shapes and dtypes) an encoding stands for; a
    ValueError naming the tensor for an encoding that is malformed or untrustworthy."""
    _check_layout(encoded, encoded_spec(chain, like))
    decoded: State = OrderedDict()
    for key, reference in like.items():
        if not reference.is_floating_point():
            decoded[key] = encoded[key]
            continue
        prefix = f"{key}{KEY_SEP}"
        parts = {k[len(prefix):]: v for k, v in encoded.items() if k.startswith(prefix)}
        try:
            chain.check(parts, reference.numel())
        except ValueError as exc:
            raise ValueError(f"compressed payload {key}: {exc}") from None
        dense = chain.decode(parts, reference.numel())
        decoded[key] = dense.reshape(reference.shape).to(reference.dtype)
    return decoded


class CompressedClient:
    """Wraps a client half: error-feedback correction, then encoding of the update."""

    def __init__(self, inner: ClientProcedure, chain: CompressionChain,
                 use_error_feedback: bool) -> None:
        self.inner = inner
        self.chain = chain
        self.use_error_feedback = use_error_feedback

    def run(self, ctx: ClientContext, broadcast: Broadcast) -> ClientResult:
        own = dict(ctx.client_state or {})
        residual = own.pop(error_feedback.RESIDUAL_KEY, None)
        inner_state = own or None
        result = self.inner.run(dataclasses.replace(ctx, client_state=inner_state), broadcast)
        update = result.update
        target = (error_feedback.corrected(update.payload, residual)
                  if self.use_error_feedback else update.payload)
        generator = torch.Generator().manual_seed(derive_seed(ctx.seed, _COMPRESSION_STREAM))
        encoded = encode_state(self.chain, target, generator)
        decoded = decode_state(self.chain, encoded, target)  # exactly what the server will see
        target_norm = state_ops.global_norm(target)
        error_norm = state_ops.global_norm(state_ops.sub(target, decoded))
        update.metrics["compression_error"] = error_norm / target_norm if target_norm else 0.0
        update.metrics["bytes_dense"] = float(state_ops.num_bytes(update.payload))
        update.payload = pack(encoded, encoded_spec(self.chain, target))
        client_state: ClientState | None = (result.client_state if result.client_state
                                            is not None else inner_state)
        if self.use_error_feedback:
            client_state = {**(client_state or {}),
                            error_feedback.RESIDUAL_KEY: error_feedback.next_residual(
                                target, decoded)}
        return ClientResult(update=update, client_state=client_state)


class CompressedServer(ServerWrapper):
    """Wraps a server half: decodes each update (``decode_update``, called by the round loop
    before validation); everything else is the inner rule's."""

    def __init__(self, inner: ServerRule, chain: CompressionChain) -> None:
        super().__init__(inner)
        self.chain = chain

    def decode_update(self, update: ClientUpdate, global_state: State) -> ClientUpdate:
        spec = encoded_spec(self.chain, global_state)
        payload = decode_state(self.chain, unpack(update.payload, spec), global_state)
        return dataclasses.replace(update, payload=payload)


def compress_algorithm(algorithm: Algorithm, cfg: CompressionConfig) -> Algorithm:
    """Both halves of ``algorithm`` wrapped with ``algorithm.compression``."""
    chain = build_chain(cfg.chain)
    info = {**algorithm.info, "compression": [c.kind for c in cfg.chain],
            "error_feedback": cfg.error_feedback}
    return dataclasses.replace(
        algorithm, client=CompressedClient(algorithm.client, chain, cfg.error_feedback),
        server=CompressedServer(algorithm.server, chain), info=info)
