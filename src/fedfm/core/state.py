"""``State``: the communicated parameters of a federated run, and the arithmetic on them.

A ``State`` is an ordered ``dict[str, torch.Tensor]`` holding only what crosses the wire (LoRA
A/B, prompt embeddings, biases, or every weight for full fine-tuning): CPU, contiguous, named
exactly as in the model, so it can be saved as safetensors. The frozen base model is never part
of a State. All functions here are pure: they return new tensors and never modify inputs.
"""

from __future__ import annotations

import json
import struct
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

State = dict[str, torch.Tensor]


class StateMismatchError(ValueError):
    """Two States that must share keys, shapes and dtypes do not."""


def check_compatible(reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor],
                     what: str = "state", *, check_dtype: bool = True) -> None:
    """Raise ``StateMismatchError`` naming the first differing key, shape or (with
    ``check_dtype``) dtype."""
    missing = [k for k in reference if k not in other]
    extra = [k for k in other if k not in reference]
    if missing or extra:
        raise StateMismatchError(
            f"{what}: keys differ (missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''})"
        )
    for key, ref in reference.items():
        got = other[key]
        if not isinstance(got, torch.Tensor):
            raise StateMismatchError(f"{what}: {key} is {type(got).__name__}, expected a tensor")
        if got.shape != ref.shape:
            raise StateMismatchError(
                f"{what}: {key} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
            )
        if check_dtype and got.dtype != ref.dtype:
            raise StateMismatchError(f"{what}: {key} has dtype {got.dtype}, expected {ref.dtype}")


def clone(state: Mapping[str, torch.Tensor]) -> State:
    """Detached CPU contiguous copy, keeping key order."""
    return OrderedDict((k, v.detach().to("cpu", copy=True).contiguous()) for k, v in state.items())


def zeros_like(state: Mapping[str, torch.Tensor]) -> State:
    return OrderedDict((k, torch.zeros_like(v)) for k, v in state.items())


def add(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], alpha: float = 1.0) -> State:
    """``a + alpha * b``."""
    return OrderedDict((k, a[k] + alpha * b[k]) for k in a)


def sub(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> State:
    """``a - b``."""
    return OrderedDict((k, a[k] - b[k]) for k in a)


def scale(a: Mapping[str, torch.Tensor], factor: float) -> State:
    return OrderedDict((k, v * factor) for k, v in a.items())


def weighted_mean(states: Iterable[Mapping[str, torch.Tensor]],
                  weights: Sequence[float]) -> State:
    """``sum_i w_i s_i / sum_i w_i``, accumulated in float64 for exactness, cast back.

    ``states`` is read once, in order, one State at a time (a generator of States read from
    disk keeps only the running sum in memory); each element is summed in client order."""
    total = float(sum(weights))
    out: State = OrderedDict()
    dtypes: dict[str, torch.dtype] = {}
    count = 0
    for state, weight in zip(states, weights, strict=False):
        if count == 0:
            if total <= 0:
                raise ValueError(f"weights must sum to a positive number, got {total}")
            out.update((k, torch.zeros(v.shape, dtype=torch.float64)) for k, v in state.items())
            dtypes = {k: v.dtype for k, v in state.items()}
        for key, acc in out.items():
            acc += state[key].to(torch.float64) * (float(weight) / total)
        count += 1
    if count == 0:
        raise ValueError("weighted_mean of no states")
    if count != len(weights):
        raise ValueError(f"{count} states but {len(weights)} weights")
    return OrderedDict((k, v.to(dtypes[k])) for k, v in out.items())


class RunningSum:
    """``sum_i w_i s_i`` and ``sum_i w_i`` in float64, folded in one State at a time: the
    coordinator's O(model) aggregation memory, however many clients report."""

    def __init__(self) -> None:
        self.sum: State = OrderedDict()
        self.total = 0.0
        self.dtypes: dict[str, torch.dtype] = {}

    def add(self, state: Mapping[str, torch.Tensor], weight: float) -> None:
        if not self.sum:
            self.sum.update((k, torch.zeros(v.shape, dtype=torch.float64))
                            for k, v in state.items())
            self.dtypes = {k: v.dtype for k, v in state.items()}
        for key, acc in self.sum.items():
            acc += state[key].to(torch.float64) * float(weight)
        self.total += float(weight)

    def mean(self) -> State:
        if self.total <= 0:
            raise ValueError(f"weights must sum to a positive number, got {self.total}")
        return OrderedDict((k, (v / self.total).to(self.dtypes[k])) for k, v in self.sum.items())


def global_norm(state: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of all tensors together."""
    total = sum(float(v.double().pow(2).sum()) for v in state.values())
    return total ** 0.5


def num_parameters(state: Mapping[str, torch.Tensor]) -> int:
    return sum(v.numel() for v in state.values())


def equal(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    """Bitwise equality of keys, shapes, dtypes and values."""
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k])
        for k in a
    )


def max_abs_diff(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    check_compatible(a, b)
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in a), default=0.0)


_ORDER_KEY = "fedfm.key_order"


def to_bytes(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialize with safetensors (what goes over the wire and into checkpoints). The key
    order is kept in the metadata, since safetensors itself stores tensors sorted."""
    meta = dict(metadata or {})
    meta[_ORDER_KEY] = json.dumps(list(state))
    return _st_save({k: v.detach().cpu().contiguous() for k, v in state.items()}, metadata=meta)


def read_metadata(payload: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors buffer (8-byte little-endian header length, then
    the JSON header)."""
    if len(payload) < 8:
        raise ValueError("not a safetensors payload: shorter than its 8-byte header length")
    header_length = struct.unpack("<Q", payload[:8])[0]
    if header_length > len(payload) - 8:
        raise ValueError("not a safetensors payload: header length exceeds the buffer")
    header = json.loads(payload[8:8 + header_length])
    return dict(header.get("__metadata__") or {})


def from_bytes(payload: bytes) -> State:
    """Inverse of ``to_bytes``: the same keys, in the same order, bit for bit."""
    tensors = _st_load(payload)
    order = json.loads(read_metadata(payload).get(_ORDER_KEY, "[]"))
    if sorted(order) != sorted(tensors):
        order = list(tensors)
    return OrderedDict((k, tensors[k]) for k in order)


def num_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes this State takes on the wire (its safetensors serialization)."""
    return len(to_bytes(state))


def select(state: Mapping[str, torch.Tensor], keys: Iterable[str]) -> State:
    return OrderedDict((k, state[k]) for k in keys)


def flatten(state: Mapping[str, torch.Tensor], keys: Sequence[str]) -> torch.Tensor:
    """The tensors under ``keys``, in that order, as one float64 vector."""
    return torch.cat([state[k].detach().reshape(-1).to(torch.float64) for k in keys])


def unflatten(vector: torch.Tensor, like: Mapping[str, torch.Tensor], keys: Sequence[str]
              ) -> State:
    """Inverse of :func:`flatten`: a State with ``like``'s key order, shapes and dtypes."""
    pieces: dict[str, torch.Tensor] = {}
    offset = 0
    for key in keys:
        size = like[key].numel()
        pieces[key] = vector[offset:offset + size].reshape(like[key].shape).to(like[key].dtype)
        offset += size
    return OrderedDict((key, pieces[key]) for key in like)
