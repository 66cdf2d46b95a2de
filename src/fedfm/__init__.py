"""fedfm: federated fine-tuning of foundation models.

``fedfm.run(config) -> RunResult`` runs a job from a YAML path or a ``RunConfig``; the
components for composing by hand live in the subpackages (``core``, ``models``, ``data``,
``algorithms``, ``runtime``, ``eval``, ``tracking``).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["RunResult", "__version__", "load_config", "run"]


def __getattr__(name: str) -> Any:
    # Lazy: `import fedfm` stays cheap (no torch/transformers import) until a run is asked for.
    if name in ("run", "RunResult"):
        from fedfm import api

        return getattr(api, name)
    if name == "load_config":
        from fedfm.config import load_config

        return load_config
    raise AttributeError(f"module 'fedfm' has no attribute {name!r}")
