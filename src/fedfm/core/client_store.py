"""Per-client state that survives between rounds (SCAFFOLD controls, residuals, personal heads).

Two stores with one interface: ``MemoryClientStore`` for simulations that fit in RAM and
``DiskClientStore`` (one safetensors file per client) for many clients. Both serialize to a
flat State for checkpoints, so a resumed run sees exactly the same per-client state.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from safetensors.torch import load_file, save_file

from fedfm.core import state as state_ops
from fedfm.core.algorithm import ClientState
from fedfm.core.state import State

_SEP = "::"


class ClientStore(Protocol):
    def get(self, client_id: int) -> ClientState | None: ...
    def put(self, client_id: int, client_state: ClientState) -> None: ...
    def client_ids(self) -> list[int]: ...
    def clear(self) -> None: ...


def flatten(client_state: ClientState) -> State:
    """``{"control": {"w": t}}`` -> ``{"control::w": t}`` (safetensors wants one flat dict)."""
    flat: State = OrderedDict()
    for name, named_state in client_state.items():
        if _SEP in name:
            raise ValueError(f"client state name {name!r} must not contain {_SEP!r}")
        for key, tensor in named_state.items():
            flat[f"{name}{_SEP}{key}"] = tensor
    return flat


def unflatten(flat: State) -> ClientState:
    nested: ClientState = OrderedDict()
    for full_key, tensor in flat.items():
        name, key = full_key.split(_SEP, 1)
        nested.setdefault(name, OrderedDict())[key] = tensor
    return nested


class MemoryClientStore:
    def __init__(self) -> None:
        self._states: dict[int, ClientState] = {}

    def get(self, client_id: int) -> ClientState | None:
        return self._states.get(client_id)

    def put(self, client_id: int, client_state: ClientState) -> None:
        self._states[client_id] = {k: state_ops.clone(v) for k, v in client_state.items()}

    def client_ids(self) -> list[int]:
        return sorted(self._states)

    def clear(self) -> None:
        self._states.clear()


class DiskClientStore:
    """One ``client_<id>.safetensors`` per client under ``directory``; written atomically."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, client_id: int) -> Path:
        return self.directory / f"client_{client_id}.safetensors"

    def get(self, client_id: int) -> ClientState | None:
        path = self._path(client_id)
        if not path.exists():
            return None
        return unflatten(OrderedDict(load_file(str(path)).items()))

    def put(self, client_id: int, client_state: ClientState) -> None:
        flat = {k: v.detach().cpu().contiguous() for k, v in flatten(client_state).items()}
        tmp = self._path(client_id).with_suffix(".tmp")
        save_file(flat, str(tmp))
        os.replace(tmp, self._path(client_id))

    def client_ids(self) -> list[int]:
        ids = (p.stem.removeprefix("client_") for p in self.directory.glob("client_*.safetensors"))
        return sorted(int(i) for i in ids)

    def clear(self) -> None:
        for path in self.directory.glob("client_*.safetensors"):
            path.unlink()


def iter_items(store: ClientStore) -> Iterator[tuple[int, ClientState]]:
    for client_id in store.client_ids():
        client_state = store.get(client_id)
        if client_state is not None:
            yield client_id, client_state


def export_store(store: ClientStore) -> State:
    """All clients' states as one flat State: ``"<id>/<name>::<param>"``."""
    flat: State = OrderedDict()
    for client_id, client_state in iter_items(store):
        for key, tensor in flatten(client_state).items():
            flat[f"{client_id}/{key}"] = tensor
    return flat


def import_store(store: ClientStore, flat: State) -> None:
    """Replace the store's content with ``export_store``'s output."""
    store.clear()
    per_client: dict[int, State] = {}
    for full_key, tensor in flat.items():
        client_id, key = full_key.split("/", 1)
        per_client.setdefault(int(client_id), OrderedDict())[key] = tensor
    for client_id, client_flat in per_client.items():
        store.put(client_id, unflatten(client_flat))
