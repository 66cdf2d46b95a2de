"""Frozen-prefix caching: when only the top of a model trains, run its frozen bottom once per
example and replay the result at every later local step, round and evaluation.

Head-only tuning, last-k-layer tuning and adapters on the top blocks only (as in offsite
tuning: Xiao et al., "Offsite-Tuning: Transfer Learning without Full Model", arXiv 2023) leave
the embeddings and the first ``k`` transformer blocks frozen. Their output for an example never
changes, so recomputing it every step is pure waste -- for head-only tuning of a 6-layer
encoder it is nearly all of the work. This is the classic "precompute frozen features" trick of
transfer learning (e.g. Yosinski et al., "How transferable are features in deep neural
networks?", NeurIPS 2014), applied per example inside the federated loop.

How it works, without knowing the architecture:

* the *split* is the first block with a trainable parameter (all blocks frozen: the split is the
  end of the block list, and only the final norm / pooler / head run);
* an example's *key* is a digest of its unpadded model inputs (ids, token types, positions), so
  the same text hits the same entry whatever batch it lands in, in training and in evaluation;
* a miss runs the backbone with its block list cut to the frozen blocks, in eval mode (no
  dropout, which is what makes the output a function of the example) and without gradients,
  and keeps each row's hidden states up to its length;
* a hit replays: the backbone's block list is swapped, for that call only, for
  ``[replay] + trainable blocks`` where ``replay`` returns the cached states; the model's own
  code still builds masks, rotary tables and positions, so nothing model-specific is re-written.

Entries live in memory up to a budget and then spill to an append-only file on disk.
``check`` compares loss and gradients with and without the cache on a probe batch before a run
relies on it (a trainable parameter below the split, e.g. a trainable embedding, shows up there).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedfm.models.adapters import find_blocks

LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
_KEY_FIELDS = ("input_ids", "token_type_ids", "position_ids")
_IGNORE_INDEX = -100


class _StopForward(Exception):
    """Raised by the capture hook: the frozen bottom's output is all a miss needs."""


# --------------------------------------------------------------------------- storage


@dataclass
class _DiskEntry:
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype


class FeatureStore:
    """Key -> tensor, in memory up to ``memory_bytes``, then in one append-only file.

    Written by hand: the need is a write-once, read-many map of variable-shape tensors with a
    byte budget; safetensors files are immutable and a database would add a copy per read."""

    def __init__(self, memory_bytes: int, spill_dir: str | Path | None = None) -> None:
        self.memory_bytes = memory_bytes
        self._spill_dir = Path(spill_dir) if spill_dir is not None else None
        self._memory: dict[bytes, torch.Tensor] = {}
        self._disk: dict[bytes, _DiskEntry] = {}
        self._file: Any = None
        self._path: Path | None = None
        self.bytes_in_memory = 0
        self.bytes_on_disk = 0

    def __len__(self) -> int:
        return len(self._memory) + len(self._disk)

    def __contains__(self, key: bytes) -> bool:
        return key in self._memory or key in self._disk

    def get(self, key: bytes) -> torch.Tensor | None:
        tensor = self._memory.get(key)
        if tensor is not None:
            return tensor
        entry = self._disk.get(key)
        return None if entry is None else self._read(entry)

    def put(self, key: bytes, tensor: torch.Tensor) -> None:
        if key in self:
            return
        tensor = tensor.detach().to("cpu").contiguous()
        size = tensor.numel() * tensor.element_size()
        if self.bytes_in_memory + size <= self.memory_bytes:
            self._memory[key] = tensor.clone()
            self.bytes_in_memory += size
            return
        self._disk[key] = self._append(tensor)
        self.bytes_on_disk += size

    def _append(self, tensor: torch.Tensor) -> _DiskEntry:
        if self._file is None:
            directory = self._spill_dir or Path(tempfile.gettempdir())
            directory.mkdir(parents=True, exist_ok=True)
            handle, name = tempfile.mkstemp(prefix="fedfm-prefix-", suffix=".bin",
                                            dir=directory)
            os.close(handle)
            self._file = open(name, "r+b")  # noqa: SIM115 -- lives as long as the store
            try:  # POSIX: the open handle keeps the data; nothing is left if the process dies
                os.unlink(name)
            except OSError:  # e.g. Windows: removed in close() instead
                self._path = Path(name)
        self._file.seek(0, os.SEEK_END)
        offset = self._file.tell()
        self._file.write(tensor.view(torch.uint8).reshape(-1).numpy().tobytes())
        self._file.flush()
        return _DiskEntry(offset=offset, shape=tuple(tensor.shape), dtype=tensor.dtype)

    def _read(self, entry: _DiskEntry) -> torch.Tensor:
        count = 1
        for dim in entry.shape:
            count *= dim
        nbytes = count * torch.empty((), dtype=entry.dtype).element_size()
        if nbytes == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        raw = os.pread(self._file.fileno(), nbytes, entry.offset)
        flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        return flat.view(entry.dtype).reshape(entry.shape)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._path is not None:
            self._path.unlink(missing_ok=True)
            self._path = None
        self._memory.clear()
        self._disk.clear()
        self.bytes_in_memory = self.bytes_on_disk = 0

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()


# --------------------------------------------------------------------------- model surgery


@dataclass
class PrefixSplit:
    """Where the frozen bottom ends: ``blocks[:index]`` are frozen, ``blocks[index:]`` train."""

    backbone: torch.nn.Module
    parent: torch.nn.Module  # owns the block list as attribute ``attribute``
    attribute: str
    blocks: torch.nn.ModuleList
    index: int


def find_split(model: torch.nn.Module) -> tuple[PrefixSplit | None, str]:
    """The split for ``model``'s trainable parameters, or None and why caching cannot help."""
    from transformers import PreTrainedModel

    try:
        list_name, blocks = find_blocks(model)
    except ValueError as exc:
        return None, str(exc)
    index = len(blocks)
    for block_index, block in enumerate(blocks):
        if any(p.requires_grad for p in block.parameters()):
            index = block_index
            break
    if index == 0:
        return None, "the first transformer block trains, so no frozen prefix exists"
    parent_name, _, attribute = list_name.rpartition(".")
    parent = model.get_submodule(parent_name)
    backbone = None
    for name, module in model.named_modules():
        inside = list_name.startswith(f"{name}.") or name == ""
        if inside and isinstance(module, PreTrainedModel):
            backbone = module  # named_modules is outer-first: the last match is the deepest
    if backbone is None:
        return None, "no transformers backbone owns the block list"
    return PrefixSplit(backbone, parent, attribute, blocks, index), (
        f"blocks 0-{index - 1} of {len(blocks)} are frozen")


class _Replay(torch.nn.Module):
    """Stands in for the last frozen block: returns the cached hidden states it is given."""

    def __init__(self, like: torch.nn.Module, as_tuple: bool) -> None:
        super().__init__()
        object.__setattr__(self, "_like", like)  # not a submodule: no parameters here
        self.as_tuple = as_tuple
        self.hidden: torch.Tensor | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        assert self.hidden is not None
        return (self.hidden,) if self.as_tuple else self.hidden

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # loops may read per-block attributes (e.g. ``attention_type``) of the block
            return getattr(object.__getattribute__(self, "_like"), name)


# --------------------------------------------------------------------------- the cache


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    bypassed_batches: int = 0


class PrefixCache:
    """Caches the frozen bottom of ``split`` per example; see the module docstring."""

    def __init__(self, split: PrefixSplit, store: FeatureStore) -> None:
        self.split = split
        self.store = store
        self.stats = CacheStats()
        self._enabled = False
        self._computing = False
        last_frozen = split.blocks[split.index - 1]
        self._replay = _Replay(last_frozen, as_tuple=False)
        self._top = torch.nn.ModuleList([self._replay, *split.blocks[split.index:]])
        self._bottom = torch.nn.ModuleList(list(split.blocks[: split.index]))
        self._signature = inspect.signature(split.backbone.forward)
        self._hooks = [
            split.backbone.register_forward_pre_hook(self._before_backbone, with_kwargs=True),
            split.backbone.register_forward_hook(self._after_backbone, always_call=True),
        ]

    # ---------------------------------------------------------------- public

    @contextmanager
    def enabled(self) -> Iterator[None]:
        """Backbone calls inside this block use the cache (training and evaluation losses)."""
        previous, self._enabled = self._enabled, True
        try:
            yield
        finally:
            self._enabled = previous
            self._restore()

    def wrap(self, loss_fn: LossFn) -> LossFn:
        def cached_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            with self.enabled():
                return loss_fn(model, batch)
        return cached_loss

    def describe(self) -> dict[str, Any]:
        return {"split_block": self.split.index, "blocks": len(self.split.blocks),
                "entries": len(self.store), "hits": self.stats.hits,
                "misses": self.stats.misses, "bypassed_batches": self.stats.bypassed_batches,
                "memory_mb": round(self.store.bytes_in_memory / 2**20, 2),
                "disk_mb": round(self.store.bytes_on_disk / 2**20, 2)}

    def detach(self) -> None:
        """Remove the hooks and free the entries: the model is as it was."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._restore()
        self.store.close()

    # ---------------------------------------------------------------- hooks

    def _before_backbone(self, module: torch.nn.Module, args: tuple[Any, ...],
                         kwargs: dict[str, Any]) -> None:
        if not self._enabled or self._computing:
            return None
        try:
            bound = dict(self._signature.bind_partial(*args, **kwargs).arguments)
            for name, parameter in self._signature.parameters.items():
                if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                    bound.update(bound.pop(name, {}))
        except TypeError:
            bound = None
        inputs = _model_inputs(bound) if bound is not None else None
        if inputs is None or bound is None:
            self.stats.bypassed_batches += 1
            return None
        # the call's other arguments (use_cache=False, ...) shape masks: misses reuse them
        options = {k: v for k, v in bound.items()
                   if k not in MODEL_INPUTS and not isinstance(v, torch.Tensor)}
        hidden = self._hidden_states(inputs, options)
        self._replay.hidden = hidden
        setattr(self.split.parent, self.split.attribute, self._top)
        return None

    def _after_backbone(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        if getattr(self.split.parent, self.split.attribute) is not self.split.blocks:
            setattr(self.split.parent, self.split.attribute, self.split.blocks)
        self._replay.hidden = None

    # ---------------------------------------------------------------- lookup

    def _hidden_states(self, inputs: dict[str, torch.Tensor], options: dict[str, Any]
                       ) -> torch.Tensor:
        lengths = row_lengths(inputs)
        on_host = {name: inputs[name].to("cpu", torch.int64) for name in _KEY_FIELDS
                   if name in inputs}  # one device copy per batch, not one per row
        keys = [row_key(on_host, row, length) for row, length in enumerate(lengths)]
        missing = [row for row, key in enumerate(keys) if key not in self.store]
        self.stats.hits += len(keys) - len(missing)
        self.stats.misses += len(missing)
        if missing:
            self._fill(inputs, options, missing, [lengths[r] for r in missing],
                       [keys[r] for r in missing])
        device = inputs["input_ids"].device
        rows = [self.store.get(key) for key in keys]
        width = inputs["input_ids"].shape[1]
        first = rows[0]
        assert first is not None
        hidden = torch.zeros((len(rows), width, *first.shape[1:]), dtype=first.dtype)
        for row, cached in enumerate(rows):
            assert cached is not None
            hidden[row, : cached.shape[0]] = cached
        return hidden.to(device)

    def _fill(self, inputs: dict[str, torch.Tensor], options: dict[str, Any], rows: list[int],
              lengths: list[int], keys: list[bytes]) -> None:
        width = max(lengths)
        sub = {name: tensor[rows, :width] for name, tensor in inputs.items()}
        captured: list[torch.Tensor] = []

        def capture(module: torch.nn.Module, args: Any, output: Any) -> None:
            is_tuple = isinstance(output, tuple)
            self._replay.as_tuple = is_tuple
            captured.append(output[0] if is_tuple else output)
            raise _StopForward

        split = self.split
        handle = split.blocks[split.index - 1].register_forward_hook(capture)
        was_training = split.backbone.training
        self._computing = True
        setattr(split.parent, split.attribute, self._bottom)
        try:
            split.backbone.eval()
            with torch.no_grad():
                split.backbone(**sub, **options)
        except _StopForward:
            pass
        finally:
            handle.remove()
            self._computing = False
            setattr(split.parent, split.attribute, split.blocks)
            split.backbone.train(was_training)
        if not captured:
            raise RuntimeError("the frozen prefix produced no output (block list not used)")
        for position, (key, length) in enumerate(zip(keys, lengths, strict=True)):
            self.store.put(key, captured[0][position, :length])


def _model_inputs(kwargs: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The backbone call's token inputs; None when caching cannot apply (embeddings passed
    directly, a KV cache in use, or a batch without ``input_ids``)."""
    if kwargs.get("inputs_embeds") is not None:
        return None
    if kwargs.get("past_key_values") is not None or kwargs.get("use_cache"):
        return None
    ids = kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return None
    inputs = {k: kwargs[k] for k in MODEL_INPUTS if isinstance(kwargs.get(k), torch.Tensor)}
    mask = inputs.get("attention_mask")
    if mask is not None and not _right_padded(mask):
        return None
    return inputs


def _right_padded(mask: torch.Tensor) -> bool:
    lengths = mask.sum(dim=1)
    positions = torch.arange(mask.shape[1], device=mask.device)
    return bool(((positions[None, :] < lengths[:, None]) == mask.bool()).all())


def row_lengths(inputs: dict[str, torch.Tensor]) -> list[int]:
    """Real tokens per row: the attention mask's count; a batch without a mask (packed causal
    rows) is used in full."""
    mask = inputs.get("attention_mask")
    if mask is None:
        return [inputs["input_ids"].shape[1]] * inputs["input_ids"].shape[0]
    return [int(n) for n in mask.sum(dim=1).tolist()]


def row_key(inputs: dict[str, torch.Tensor], row: int, length: int) -> bytes:
    """Digest of one row's unpadded inputs (ids, and token types / positions when given)."""
    digest = hashlib.blake2b(digest_size=20)
    for name in _KEY_FIELDS:
        tensor = inputs.get(name)
        if tensor is not None:
            digest.update(name.encode())
            digest.update(tensor[row, :length].to("cpu", torch.int64).numpy().tobytes())
    return digest.digest()


# --------------------------------------------------------------------------- setup


def _loss_and_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor], loss_fn: LossFn,
                    autocast: Any) -> tuple[float, dict[str, torch.Tensor | None]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for _, param in named:
        param.grad = None
    with autocast:
        loss = loss_fn(model, batch)
    loss.backward()
    grads = {n: None if p.grad is None else p.grad.detach().clone() for n, p in named}
    for _, param in named:
        param.grad = None
    return float(loss.detach()), grads


def check_prefix_cache(model: torch.nn.Module, batch: dict[str, torch.Tensor], loss_fn: LossFn,
                       cache: PrefixCache, autocast: Any, tolerance: float) -> tuple[bool, str]:
    """Loss and every trainable gradient on ``batch``, with and without the cache (eval mode:
    the bottom runs without dropout either way), must agree within ``tolerance``."""
    was_training = model.training
    model.eval()
    try:
        reference_loss, reference = _loss_and_grads(model, batch, loss_fn, autocast)
        cached_loss, cached = _loss_and_grads(model, batch, cache.wrap(loss_fn), autocast)
    except Exception as exc:  # noqa: BLE001 -- any failure on an unusual architecture: no cache
        return False, f"the cached forward failed on a probe batch: {type(exc).__name__}: {exc}"
    finally:
        model.train(was_training)
    if cache.stats.bypassed_batches or not cache.stats.misses:
        return False, ("the backbone is not called with token ids (e.g. prompt tuning passes "
                       "embeddings), so there is nothing to cache")
    if abs(cached_loss - reference_loss) > tolerance * max(abs(reference_loss), 1e-12):
        return False, (f"loss with the cache {cached_loss:.6g} differs from {reference_loss:.6g} "
                       f"without it")
    worst = 0.0
    for name, grad in reference.items():
        other = cached[name]
        if (grad is None) != (other is None):
            return False, f"{name} trains below the cached prefix (its gradient needs it)"
        if grad is not None and other is not None:
            scale = max(float(grad.norm()), 1e-12)
            worst = max(worst, float((grad - other).norm()) / scale)
    if worst > tolerance:
        return False, f"gradients with the cache differ by {worst:.2e} (relative)"
    return True, f"loss and gradients match recomputation within {worst:.1e} on a probe batch"


def build_prefix_cache(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                       loss_fn: LossFn, autocast: Any, tolerance: float, *,
                       memory_mb: float, spill_dir: str | None) -> tuple[PrefixCache | None, str]:
    """A checked cache for ``model``, or None and why not."""
    split, reason = find_split(model)
    if split is None:
        return None, reason
    store = FeatureStore(int(memory_mb * 2**20), spill_dir)
    cache = PrefixCache(split, store)
    ok, note = False, "the probe check did not finish"
    try:
        ok, note = check_prefix_cache(model, batch, loss_fn, cache, autocast, tolerance)
    finally:
        if not ok:
            cache.detach()
    if not ok:
        return None, note
    return cache, f"{reason}; {note}"
