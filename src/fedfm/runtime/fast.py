"""The fast path: precision, attention implementation, fused loss and compilation, set up once
per process on the one base model every client shares.

* ``precision: bf16`` stores the frozen base weights in bf16 once (half the memory, no per-step
  weight casts) while trainable parameters, their gradients and the optimizer state stay fp32;
  forward and backward run under bf16 autocast.
* ``attention: auto`` times each attention implementation the model supports on a real batch
  (forward + backward, the training step's shape) and keeps the fastest. With ``compile`` on the
  candidates are timed compiled, since the compiler changes the ranking (on a CPU, inductor fuses
  the eager softmax attention, which then beats the flash kernel at short lengths). The choice is
  cached per device, model shape, batch shape and compile flag (``$FEDFM_CACHE_DIR``, default
  ``~/.cache/fedfm``), so the same machine makes the same choice in every run and a seeded run
  stays bit-reproducible.
* ``fused_loss`` swaps ``model(**batch).loss`` for ``fedfm.models.fused_loss.CausalLMLoss``
  after checking on a probe batch that both agree; otherwise the standard loss is kept and the
  reason recorded.
* ``compile`` wraps the backbone (or the whole model) in ``torch.compile`` with dynamic shapes;
  the compiled graph is reused by every client and round because States are swapped in place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from fedfm.config import ConfigError, RuntimeConfig
from fedfm.models import ModelBundle
from fedfm.models.fused_loss import CausalLMLoss, standard_loss
from fedfm.runtime.prefix_cache import PrefixCache, build_prefix_cache

log = logging.getLogger(__name__)

LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]
ATTENTION_CANDIDATES = ("sdpa", "eager")
_FUSED_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


@dataclass
class SpeedPlan:
    """What the fast path decided for this process (recorded in ``summary.json``)."""

    precision: str = "fp32"
    attention: str | None = None
    attention_ms: dict[str, float] = field(default_factory=dict)
    attention_source: str = "model default"
    fused_loss: bool = False
    fused_loss_note: str = ""
    compiled: bool = False
    prefix_cache: bool = False
    prefix_cache_note: str = ""
    cache: PrefixCache | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        plain = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "cache"}
        plain["attention_ms"] = dict(self.attention_ms)
        if self.cache is not None:
            plain["prefix_cache_stats"] = self.cache.describe()
        return plain


def hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (the model itself otherwise)."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def store_frozen_in_bf16(model: torch.nn.Module) -> int:
    """Cast every frozen fp32 parameter to bf16 in place; returns how many were cast."""
    cast = 0
    for param in model.parameters():
        if not param.requires_grad and param.dtype == torch.float32:
            param.data = param.data.to(torch.bfloat16)
            cast += 1
    return cast


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> Any:
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ------------------------------------------------------------------ attention


def _set_attention(model: torch.nn.Module, name: str) -> bool:
    inner = hf_model(model)
    try:
        if hasattr(inner, "set_attn_implementation"):
            inner.set_attn_implementation(name)
        else:
            inner.config._attn_implementation = name
    except (ValueError, ImportError, NotImplementedError) as exc:
        log.info("attention %s not available for this model: %s", name, exc)
        return False
    return True


def _current_attention(model: torch.nn.Module) -> str | None:
    config = getattr(hf_model(model), "config", None)
    return getattr(config, "_attn_implementation", None) if config is not None else None


def _device_signature(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{torch.backends.cpu.get_cpu_capability()}:{torch.get_num_threads()}t"


def _attention_cache_key(model: torch.nn.Module, device: torch.device,
                         batch: dict[str, torch.Tensor], precision: str, compiled: bool) -> str:
    config = getattr(hf_model(model), "config", None)
    shape = {k: getattr(config, k, None) for k in (
        "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "intermediate_size", "vocab_size")}
    batch_shape = list(next(iter(batch.values())).shape)  # input_ids, pixel_values, ...
    raw = json.dumps([_device_signature(device), shape, batch_shape, precision,
                      torch.__version__] + (["compiled"] if compiled else []), sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def _cache_file() -> Path:
    root = os.environ.get("FEDFM_CACHE_DIR") or Path.home() / ".cache" / "fedfm"
    return Path(root) / "attention.json"


def _read_cache() -> dict[str, Any]:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, value: dict[str, Any]) -> None:
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        cache = _read_cache()
        cache[key] = value
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as exc:  # a read-only home must not stop a run
        log.info("could not write the attention cache %s: %s", path, exc)


def time_training_step(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                       loss_fn: LossFn, autocast: Any, repeats: int = 2,
                       warmup: int = 1) -> float:
    """Best wall time (s) of forward + backward on ``batch`` over ``repeats`` runs after
    ``warmup`` untimed ones (allocators, kernels, compilation); gradients are cleared after."""
    params = [p for p in model.parameters() if p.requires_grad]
    best = float("inf")
    was_training = model.training
    model.train()
    try:
        for attempt in range(warmup + repeats):
            start = time.perf_counter()
            with autocast:
                loss = loss_fn(model, batch)
            loss.backward()
            if next(iter(batch.values())).device.type == "cuda":
                torch.cuda.synchronize()
            if attempt >= warmup:
                best = min(best, time.perf_counter() - start)
    finally:
        for param in params:
            param.grad = None
        model.train(was_training)
    return best


def choose_attention(model: torch.nn.Module, batch: dict[str, torch.Tensor], loss_fn: LossFn,
                     autocast: Any, device: torch.device, precision: str, compiled: bool = False
                     ) -> tuple[str | None, dict[str, float], str]:
    """(choice, ms per candidate, where the choice came from): measured, or from the cache.
    On a compiled model each candidate's first (untimed) step compiles its own graph."""
    key = _attention_cache_key(model, device, batch, precision, compiled)
    cached = _read_cache().get(key)
    if cached and _set_attention(model, cached["choice"]):
        return cached["choice"], cached.get("ms", {}), "cache"
    timings: dict[str, float] = {}
    for name in ATTENTION_CANDIDATES:
        if _set_attention(model, name):
            # compiled: the second call may still recompile (dynamic-shape guards), and the
            # choice is cached for good, so warm up longer and take the best of more runs
            timings[name] = 1000 * time_training_step(
                model, batch, loss_fn, autocast, repeats=4 if compiled else 2,
                warmup=2 if compiled else 1)
    if not timings:
        return _current_attention(model), {}, "model default"
    choice = min(timings, key=timings.__getitem__)
    _set_attention(model, choice)
    rounded = {k: round(v, 3) for k, v in timings.items()}
    _write_cache(key, {"choice": choice, "ms": rounded})
    return choice, rounded, "measured"


# ------------------------------------------------------------------ fused loss


def check_fused_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                     fused: CausalLMLoss, autocast: Any,
                     dtype: torch.dtype) -> tuple[bool, str]:
    """Compare the fused loss with the model's own on ``batch`` (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast:
            reference = float(standard_loss(model, batch))
            candidate = float(fused(model, batch))
    except (RuntimeError, ValueError, TypeError) as exc:
        return False, f"fused loss failed on a probe batch: {exc}"
    finally:
        model.train(was_training)
    relative = abs(candidate - reference) / max(abs(reference), 1e-12)
    if relative > _FUSED_TOLERANCE.get(dtype, 1e-4):
        return False, (f"fused loss {candidate:.6g} differs from the model's {reference:.6g} "
                       f"(relative {relative:.2e}); the model's head is not a plain linear layer")
    return True, f"matches the model's loss within {relative:.1e} on a probe batch"


# ------------------------------------------------------------------ setup


def resolve_precision(cfg: RuntimeConfig, device: torch.device) -> str:
    if cfg.precision == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return "bf16" if cuda_bf16 else "fp32"
    if cfg.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("invalid config: runtime.precision: 'bf16' but this GPU has no bf16 "
                          "support (use 'fp32')")
    return cfg.precision


def prepare_fast_path(bundle: ModelBundle, cfg: RuntimeConfig, device: torch.device,
                      probe_batch: dict[str, torch.Tensor] | None
                      ) -> tuple[SpeedPlan, LossFn, torch.dtype | None]:
    """Apply the runtime's speed settings to ``bundle.model`` in place.

    Returns the plan, the training loss function and the autocast dtype (None: fp32)."""
    model = bundle.model
    plan = SpeedPlan(precision=resolve_precision(cfg, device))
    autocast_dtype = torch.bfloat16 if plan.precision == "bf16" else None
    if plan.precision == "bf16":
        store_frozen_in_bf16(model)
    autocast = autocast_context(device, autocast_dtype)
    loss_fn: LossFn = standard_loss
    if bundle.task == "causal_lm" and cfg.fused_loss:
        fused = CausalLMLoss()
        if CausalLMLoss.parts(model) is None:
            plan.fused_loss_note = "model has no plain backbone + linear head (kept model loss)"
        elif probe_batch is not None:
            ok, plan.fused_loss_note = check_fused_loss(
                model, probe_batch, fused, autocast, autocast_dtype or torch.float32)
            if ok:
                loss_fn, plan.fused_loss = fused, True
    if cfg.compile:
        _compile(model, plan.fused_loss)
        plan.compiled = True
    if probe_batch is not None and cfg.attention == "auto":
        plan.attention, plan.attention_ms, plan.attention_source = choose_attention(
            model, probe_batch, loss_fn, autocast, device, plan.precision, plan.compiled)
    elif cfg.attention != "auto":
        if not _set_attention(model, cfg.attention):
            raise ConfigError(f"invalid config: runtime.attention: {cfg.attention!r} is not "
                              f"supported by this model (use 'auto')")
        plan.attention, plan.attention_source = cfg.attention, "config"
    else:
        plan.attention = _current_attention(model)
    loss_fn = _prefix_cache(model, cfg, plan, probe_batch, loss_fn, autocast,
                            autocast_dtype or torch.float32)
    return plan, loss_fn, autocast_dtype


def _prefix_cache(model: torch.nn.Module, cfg: RuntimeConfig, plan: SpeedPlan,
                  probe_batch: dict[str, torch.Tensor] | None, loss_fn: LossFn, autocast: Any,
                  dtype: torch.dtype) -> LossFn:
    """Wrap ``loss_fn`` with a checked frozen-prefix cache when the config allows one."""
    if cfg.prefix_cache == "off":
        plan.prefix_cache_note = "off (config)"
        return loss_fn
    if cfg.compile:
        plan.prefix_cache_note = "off: runtime.compile is on"
        return loss_fn
    if probe_batch is None:
        plan.prefix_cache_note = "off: no probe batch to check it on"
        return loss_fn
    cache, plan.prefix_cache_note = build_prefix_cache(
        model, probe_batch, loss_fn, autocast, _FUSED_TOLERANCE.get(dtype, 1e-4),
        memory_mb=cfg.prefix_cache_memory_mb, spill_dir=cfg.prefix_cache_dir)
    if cache is None:
        if cfg.prefix_cache == "on":
            raise ConfigError(f"invalid config: runtime.prefix_cache: 'on' but this model and "
                              f"adapter have no cacheable frozen prefix: "
                              f"{plan.prefix_cache_note}")
        return loss_fn
    plan.prefix_cache, plan.cache = True, cache
    return cache.wrap(loss_fn)


def _compile(model: torch.nn.Module, fused: bool) -> None:
    # peft wrappers call their inner model's .forward directly, so compile what fedfm calls:
    # the backbone under the fused loss, the outer model otherwise
    parts = CausalLMLoss.parts(model) if fused else None
    target = parts[0] if parts is not None else model
    # dynamic shapes: length-grouped batches change the sequence length from step to step
    target.compile(dynamic=True)
