"""Per-client state that survives between rounds (SCAFFOLD controls, residuals, personal heads).

Three stores with one interface: ``MemoryClientStore`` for simulations that fit in RAM,
``DiskClientStore`` (one safetensors file per client) and ``TieredClientStore``, which keeps the
most recently used states in memory up to a byte budget and the rest on disk -- so a run with
thousands of registered clients holds only about the budget, whatever their number.
Checkpoints stream the store client by client (``save_store`` / ``load_store``): at no point
are all clients' states in memory at once.
"""

from __future__ import annotations

import os
import shutil
from collections import OrderedDict
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

    def path_of(self, client_id: int) -> Path | None:
        """The state's file (written once, replaced atomically: safe to hard-link)."""
        path = self._path(client_id)
        return path if path.exists() else None

    def remove(self, client_id: int) -> None:
        self._path(client_id).unlink(missing_ok=True)

    def clear(self) -> None:
        for path in self.directory.glob("client_*.safetensors"):
            path.unlink()


def state_bytes(client_state: ClientState) -> int:
    return sum(t.numel() * t.element_size() for named in client_state.values()
               for t in named.values())


class TieredClientStore:
    """Most recently used states in memory up to ``memory_bytes``; the rest in a
    ``DiskClientStore`` under ``directory``. A state lives in exactly one tier."""

    def __init__(self, directory: str | Path, memory_bytes: int) -> None:
        self.disk = DiskClientStore(directory)
        self.memory_bytes = memory_bytes
        self._memory: OrderedDict[int, ClientState] = OrderedDict()
        self.bytes_in_memory = 0

    def get(self, client_id: int) -> ClientState | None:
        if client_id in self._memory:
            self._memory.move_to_end(client_id)
            return self._memory[client_id]
        return self.disk.get(client_id)

    def put(self, client_id: int, client_state: ClientState) -> None:
        self._drop(client_id)
        stored = {k: state_ops.clone(v) for k, v in client_state.items()}
        size = state_bytes(stored)
        if size > self.memory_bytes:
            self.disk.put(client_id, stored)
            return
        self._memory[client_id] = stored
        self.bytes_in_memory += size
        while self.bytes_in_memory > self.memory_bytes:
            oldest, state = self._memory.popitem(last=False)
            self.bytes_in_memory -= state_bytes(state)
            self.disk.put(oldest, state)

    def _drop(self, client_id: int) -> None:
        if client_id in self._memory:
            self.bytes_in_memory -= state_bytes(self._memory.pop(client_id))
        self.disk.remove(client_id)

    def client_ids(self) -> list[int]:
        return sorted(set(self._memory) | set(self.disk.client_ids()))

    def in_memory(self) -> list[int]:
        return list(self._memory)

    def path_of(self, client_id: int) -> Path | None:
        return None if client_id in self._memory else self.disk.path_of(client_id)

    def clear(self) -> None:
        self._memory.clear()
        self.bytes_in_memory = 0
        self.disk.clear()


def save_store(store: ClientStore, directory: Path) -> int:
    """Write every client's state to ``directory/client_<id>.safetensors``, one client at a
    time (files a store already has on disk are hard-linked, not read). Returns the count."""
    directory.mkdir(parents=True, exist_ok=True)
    path_of = getattr(store, "path_of", None)
    count = 0
    for client_id in store.client_ids():
        target = directory / f"client_{client_id}.safetensors"
        source = path_of(client_id) if path_of is not None else None
        if source is not None:
            _link_or_copy(source, target)
        else:
            client_state = store.get(client_id)
            if client_state is None:
                continue
            flat = {k: v.detach().cpu().contiguous() for k, v in flatten(client_state).items()}
            save_file(flat, str(target))
        count += 1
    return count


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or no hard links there
        shutil.copyfile(source, target)


def load_store(store: ClientStore, directory: Path) -> None:
    """Replace the store's content with ``save_store``'s output, one client at a time."""
    store.clear()
    if not directory.is_dir():
        return
    for path in sorted(directory.glob("client_*.safetensors")):
        client_id = int(path.stem.removeprefix("client_"))
        store.put(client_id, unflatten(OrderedDict(load_file(str(path)).items())))
