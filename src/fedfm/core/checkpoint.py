"""Checkpoints: everything needed to resume a run exactly, written atomically.

``<dir>/round_0003/`` holds ``global.safetensors`` (the global State, loadable on its own),
``server_state.safetensors`` (server optimizer moments, control variates; keys
``<name>::<param>``), ``client_states/client_<id>.safetensors`` (the per-client store, written
client by client), ``rng.safetensors``
plus ``meta.json`` (round, totals, Python/NumPy RNG states). ``<dir>/LATEST`` names the newest
complete checkpoint; a checkpoint directory only appears once fully written.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fedfm.core import client_store as store_ops
from fedfm.core.client_store import ClientStore
from fedfm.core.loop import LoopSnapshot
from fedfm.core.state import State

GLOBAL_FILE = "global.safetensors"
CLIENT_STATES_DIR = "client_states"
LEGACY_CLIENT_STATES = "client_states.safetensors"  # one flat file, before per-client files


class CheckpointError(RuntimeError):
    """A checkpoint is missing or unreadable."""


def round_dir_name(round_index: int) -> str:
    return f"round_{round_index:04d}"


def _save_states(path: Path, states: State) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in states.items()}, str(path))


def _load_states(path: Path) -> State:
    return OrderedDict(load_file(str(path)).items()) if path.exists() else OrderedDict()


def capture_rng() -> tuple[State, dict[str, Any]]:
    tensors: State = OrderedDict(torch=torch.get_rng_state())
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{index}"] = cuda_state
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    meta = {
        "python": _jsonable(random.getstate()),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
    }
    return tensors, meta


def restore_rng(tensors: State, meta: dict[str, Any]) -> None:
    if "torch" in tensors:
        torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    if "python" in meta:
        version, internal, gauss = meta["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in meta:
        kind, keys, pos, has_gauss, gauss = meta["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


@dataclass
class Checkpoint:
    snapshot: LoopSnapshot
    client_states_dir: Path  # per-client files; load with ``client_store.load_store``
    rng_tensors: State
    rng_meta: dict[str, Any]


class CheckpointManager:
    """Saves loop snapshots under ``directory`` every ``every`` rounds and after the last."""

    def __init__(self, directory: str | Path, *, every: int = 1, keep: int | None = None,
                 client_store: ClientStore | None = None) -> None:
        self.directory = Path(directory)
        self.every = every
        self.keep = keep
        self.client_store = client_store

    def should_save(self, round_index: int, last_round: int) -> bool:
        return round_index % self.every == 0 or round_index == last_round

    def save(self, snapshot: LoopSnapshot) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / round_dir_name(snapshot.round)
        staging = self.directory / (final.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        _save_states(staging / GLOBAL_FILE, snapshot.global_state)
        server_flat: State = OrderedDict()
        for name, named_state in snapshot.server_state.items():
            for key, tensor in named_state.items():
                server_flat[f"{name}::{key}"] = tensor
        _save_states(staging / "server_state.safetensors", server_flat)
        if self.client_store is not None:
            store_ops.save_store(self.client_store, staging / CLIENT_STATES_DIR)
        rng_tensors, rng_meta = capture_rng()
        _save_states(staging / "rng.safetensors", rng_tensors)
        meta = {"round": snapshot.round, "totals": snapshot.totals, "rng": rng_meta}
        (staging / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        _atomic_write(self.directory / "LATEST", final.name)
        self._prune()
        return final

    def _prune(self) -> None:
        if self.keep is None:
            return
        rounds = sorted(p for p in self.directory.glob("round_*") if p.is_dir()
                        and not p.name.endswith(".tmp"))
        for old in rounds[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def latest_checkpoint(directory: str | Path) -> Path | None:
    directory = Path(directory)
    marker = directory / "LATEST"
    if not marker.exists():
        return None
    path = directory / marker.read_text(encoding="utf-8").strip()
    return path if path.is_dir() else None


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.exists() or not (path / GLOBAL_FILE).exists():
        raise CheckpointError(f"{path} is not a complete fedfm checkpoint "
                              f"(expected {GLOBAL_FILE} and meta.json)")
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    server_state: dict[str, State] = OrderedDict()
    for full_key, tensor in _load_states(path / "server_state.safetensors").items():
        name, key = full_key.split("::", 1)
        server_state.setdefault(name, OrderedDict())[key] = tensor
    snapshot = LoopSnapshot(
        round=int(meta["round"]),
        global_state=_load_states(path / GLOBAL_FILE),
        server_state=server_state,
        totals=dict(meta.get("totals", {})),
    )
    return Checkpoint(
        snapshot=snapshot,
        client_states_dir=path / CLIENT_STATES_DIR,
        rng_tensors=_load_states(path / "rng.safetensors"),
        rng_meta=meta.get("rng", {}),
    )


def restore_client_states(store: ClientStore, checkpoint_path: str | Path) -> None:
    """Load a checkpoint's per-client states into ``store`` (replacing its content), from
    ``client_states/`` or, for checkpoints written before it, the flat legacy file."""
    path = Path(checkpoint_path)
    directory, legacy = path / CLIENT_STATES_DIR, path / LEGACY_CLIENT_STATES
    if directory.is_dir() or not legacy.exists():
        store_ops.load_store(store, directory)
        return
    store.clear()
    per_client: dict[int, State] = OrderedDict()
    for full_key, tensor in load_file(str(legacy)).items():
        client_id, key = full_key.split("/", 1)
        per_client.setdefault(int(client_id), OrderedDict())[key] = tensor
    for client_id, flat in per_client.items():
        store.put(client_id, store_ops.unflatten(flat))
