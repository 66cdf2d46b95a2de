"""What crosses the network between coordinator and client agents, as safetensors files.

* A **broadcast** (coordinator -> client): the global State under ``global::<key>`` and each
  named extra State under ``extra::<name>::<key>``; the round in the metadata.
* An **update** (client -> coordinator): the payload under ``payload::<key>``, each aux State
  under ``aux::<name>::<key>``, and the scalars (client id, round, task, example count, metrics,
  metadata) as JSON in the metadata.

Parsing an upload never trusts it: the header is read and checked (names, shapes, dtypes, sizes)
before any tensor is materialised, values must be finite, and every problem is a ``WireError``
naming the field. ``SpilledUpdate`` is an accepted update left on disk: its payload is read
each time it is asked for, so a round's updates never have to be in memory together.
"""

from __future__ import annotations

import json
import math
import struct
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from fedfm.core import state as state_ops
from fedfm.core.state import State
from fedfm.core.update import Broadcast, ClientUpdate

SEP = "::"
UPDATE_META = "fedfm.update"
MAX_HEADER_BYTES = 16 * 2**20
MAX_AUX_STATES = 16
MAX_EXAMPLES = 2**53  # an example count beyond this would be exact neither in float64 nor fair
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class WireError(ValueError):
    """An upload or download is malformed; the message names what and where."""


# --------------------------------------------------------------------------- broadcast


def broadcast_to_bytes(broadcast: Broadcast) -> bytes:
    tensors: State = OrderedDict((f"global{SEP}{k}", v) for k, v in broadcast.global_state.items())
    for name, extra in broadcast.extras.items():
        tensors.update((f"extra{SEP}{name}{SEP}{k}", v) for k, v in extra.items())
    return state_ops.to_bytes(tensors, {"fedfm.round": str(broadcast.round)})


def broadcast_from_bytes(payload: bytes) -> Broadcast:
    try:
        tensors = state_ops.from_bytes(payload)
        round_index = int(state_ops.read_metadata(payload).get("fedfm.round", "0"))
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a bad download
        raise WireError(f"the broadcast is not a fedfm safetensors file: {exc}") from None
    global_state: State = OrderedDict()
    extras: dict[str, State] = OrderedDict()
    for key, tensor in tensors.items():
        kind, _, rest = key.partition(SEP)
        if kind == "global":
            global_state[rest] = tensor
        elif kind == "extra":
            name, _, inner = rest.partition(SEP)
            extras.setdefault(name, OrderedDict())[inner] = tensor
    return Broadcast(global_state=global_state, extras=extras, round=round_index)


# --------------------------------------------------------------------------- update


def update_to_bytes(update: ClientUpdate, *, round_index: int, task_id: str) -> bytes:
    tensors: State = OrderedDict((f"payload{SEP}{k}", v) for k, v in update.payload.items())
    for name, extra in update.aux.items():
        tensors.update((f"aux{SEP}{name}{SEP}{k}", v) for k, v in extra.items())
    facts = {"client_id": update.client_id, "round": round_index, "task_id": task_id,
             "num_examples": update.num_examples, "metrics": update.metrics,
             "metadata": update.metadata}
    return state_ops.to_bytes(tensors, {UPDATE_META: json.dumps(facts)})


def read_header(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensor entries, metadata) of a safetensors file, checked for internal consistency."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise WireError("upload: not a safetensors file (shorter than 8 bytes)")
        length = struct.unpack("<Q", head)[0]
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise WireError(f"upload: safetensors header length {length} is larger than the "
                            f"file or the {MAX_HEADER_BYTES}-byte limit")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise WireError(f"upload: safetensors header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise WireError("upload: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise WireError("upload: safetensors __metadata__ is not an object")
    for key, entry in header.items():
        _check_entry(key, entry, size - 8 - length)
    return header, metadata


def _check_entry(key: str, entry: Any, data_bytes: int) -> None:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise WireError(f"upload: tensor {key!r} has a malformed header entry")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if entry["dtype"] not in _DTYPES:
        raise WireError(f"upload: tensor {key!r} has unsupported dtype {entry['dtype']!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise WireError(f"upload: tensor {key!r} has a malformed shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(
            isinstance(o, int) for o in offsets) and 0 <= offsets[0] <= offsets[1] <= data_bytes):
        raise WireError(f"upload: tensor {key!r} has data offsets outside the file")


def _split_keys(header: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """payload key -> file key, and aux name -> (key -> file key)."""
    payload: dict[str, str] = {}
    aux: dict[str, dict[str, str]] = {}
    for file_key in header:
        kind, _, rest = file_key.partition(SEP)
        if kind == "payload" and rest:
            payload[rest] = file_key
        elif kind == "aux" and SEP in rest:
            name, _, inner = rest.partition(SEP)
            aux.setdefault(name, {})[inner] = file_key
        else:
            raise WireError(f"upload: unexpected tensor {file_key!r} (expected 'payload::<name>' "
                            f"or 'aux::<state>::<name>')")
    if len(aux) > MAX_AUX_STATES:
        raise WireError(f"upload: {len(aux)} aux States, at most {MAX_AUX_STATES} are allowed")
    return payload, aux


def _facts(metadata: Mapping[str, str]) -> dict[str, Any]:
    raw = metadata.get(UPDATE_META)
    if raw is None:
        raise WireError(f"upload: metadata {UPDATE_META!r} is missing")
    try:
        facts = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise WireError(f"upload: metadata {UPDATE_META!r} is not JSON ({exc})") from None
    if not isinstance(facts, dict):
        raise WireError(f"upload: metadata {UPDATE_META!r} is not an object")
    for name in ("client_id", "round", "num_examples"):
        value = facts.get(name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise WireError(f"upload: {name} must be an integer, got {value!r}")
    if not 0 < facts["num_examples"] <= MAX_EXAMPLES:
        raise WireError(f"upload: num_examples must be in 1..{MAX_EXAMPLES}, got "
                        f"{str(facts['num_examples'])[:40]}")
    check_scalars(facts.get("metrics", {}), "metrics")
    check_metadata(facts.get("metadata", {}))
    if not isinstance(facts.get("task_id"), str):
        raise WireError("upload: task_id must be a string")
    return facts


def check_scalars(values: Any, what: str) -> None:
    """``values`` maps names to finite numbers (huge integers included: they overflow)."""
    if not isinstance(values, dict):
        raise WireError(f"upload: {what} must map names to finite numbers")
    for key, value in values.items():
        if not isinstance(key, str) or isinstance(value, bool) or not isinstance(
                value, int | float) or not _finite(value):
            raise WireError(f"upload: {what}[{key!r}] must be a finite number, got "
                            f"{str(value)[:40]!r}")


def check_metadata(metadata: Any) -> None:
    """The update's metadata: an object; ``wall_time`` (if any) a finite number >= 0, ``eval``
    (if any) names -> finite numbers."""
    if not isinstance(metadata, dict):
        raise WireError("upload: metadata must be an object")
    if "wall_time" in metadata:
        wall = metadata["wall_time"]
        if isinstance(wall, bool) or not isinstance(wall, int | float) or not _finite(wall) \
                or wall < 0:
            raise WireError(f"upload: metadata.wall_time must be a finite number >= 0, got "
                            f"{str(wall)[:40]!r}")
    if "eval" in metadata:
        check_scalars(metadata["eval"], "metadata.eval")


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def check_header(path: Path, expected: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Validate an uploaded update's structure against the global State without reading any
    tensor data; returns its scalar facts."""
    header, metadata = read_header(path)
    facts = _facts(metadata)
    payload, _ = _split_keys(header)
    missing = [k for k in expected if k not in payload]
    extra = [k for k in payload if k not in expected]
    if missing or extra:
        raise WireError(f"upload: payload tensors differ from the global State (missing "
                        f"{missing[:3]}, unexpected {extra[:3]})")
    for key, reference in expected.items():
        entry = header[payload[key]]
        if list(entry["shape"]) != list(reference.shape):
            raise WireError(f"upload: payload {key} has shape {tuple(entry['shape'])}, "
                            f"expected {tuple(reference.shape)}")
        if _DTYPES[entry["dtype"]] != reference.dtype:
            raise WireError(f"upload: payload {key} has dtype {entry['dtype']}, expected "
                            f"{reference.dtype}")
    return facts


def load_update(path: Path) -> ClientUpdate:
    """The full update in a (header-checked) file; tensors must be finite."""
    header, metadata = read_header(path)
    facts = _facts(metadata)
    payload_keys, aux_keys = _split_keys(header)
    tensors = _load_tensors(path)
    try:
        order = json.loads(metadata.get("fedfm.key_order", "[]"))
    except (json.JSONDecodeError, RecursionError):
        order = None
    if not isinstance(order, list) or not all(isinstance(k, str) for k in order):
        raise WireError("upload: metadata fedfm.key_order must be a JSON list of tensor names")
    payload_order = [k.partition(SEP)[2] for k in order if k.startswith(f"payload{SEP}")]
    if sorted(payload_order) != sorted(payload_keys):
        payload_order = list(payload_keys)
    payload: State = OrderedDict((k, tensors[payload_keys[k]]) for k in payload_order)
    aux = {name: OrderedDict((k, tensors[file_key]) for k, file_key in keys.items())
           for name, keys in aux_keys.items()}
    for where, state in [("payload", payload), *((f"aux {n}", s) for n, s in aux.items())]:
        for key, tensor in state.items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise WireError(f"upload: {where} {key} has non-finite values (nan or inf)")
    return ClientUpdate(client_id=facts["client_id"], payload=payload,
                        num_examples=facts["num_examples"],
                        metrics={k: float(v) for k, v in facts.get("metrics", {}).items()},
                        aux=aux, metadata=dict(facts.get("metadata", {})))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except Exception as exc:  # noqa: BLE001 - a corrupt body is the client's error
        raise WireError(f"upload: tensor data could not be read ({exc})") from None


def update_facts(path: Path) -> dict[str, Any]:
    return _facts(read_header(path)[1])


class SpilledUpdate(ClientUpdate):
    """An accepted update that stays on disk: ``payload`` and ``aux`` are read from the file
    on each access and not kept, so holding many of these costs no memory."""

    def __init__(self, path: Path, facts: Mapping[str, Any]) -> None:  # noqa: D107
        self.path = Path(path)
        self.client_id = int(facts["client_id"])
        self.num_examples = int(facts["num_examples"])
        self.metrics = {k: float(v) for k, v in facts.get("metrics", {}).items()}
        self.metadata = dict(facts.get("metadata", {}))

    @property  # type: ignore[override]
    def payload(self) -> State:
        return load_update(self.path).payload

    @property  # type: ignore[override]
    def aux(self) -> dict[str, State]:
        return load_update(self.path).aux

    def num_bytes(self) -> int:
        return self.path.stat().st_size
