"""The run directory: everything a run leaves behind, in plain files.

```
runs/<name>-<timestamp>/
  config.yaml          resolved config (what `fedfm run --resume` reads back)
  metrics.jsonl        one JSON object per round (and round 0 when evaluated at start)
  summary.json         final metrics, rounds, wall time, bytes communicated, config hash
  checkpoints/         round_NNNN/ (global State + server/client/RNG state), LATEST
  final/global.safetensors   the final global State
```
"""

from __future__ import annotations

import json
import math
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from fedfm.config import RunConfig, dump_config


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _clean(value: Any) -> Any:
    """NaN/inf are not JSON: write them as null so every line stays parseable."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def to_json(value: Any, **kwargs: Any) -> str:
    return json.dumps(_clean(value), default=_json_default, **kwargs)


class RunDirectory:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, output_dir: str | Path, name: str) -> RunDirectory:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        base = Path(output_dir) / f"{name}-{stamp}"
        path, suffix = base, 1
        while path.exists():
            suffix += 1
            path = Path(f"{base}-{suffix}")
        path.mkdir(parents=True)
        return cls(path)

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def final_dir(self) -> Path:
        return self.path / "final"

    def write_config(self, config: RunConfig) -> None:
        _atomic_write(self.config_path, dump_config(config))

    def append_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(to_json(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line from a crash: everything after it is dropped
        return records

    def truncate_metrics(self, last_round: int) -> None:
        """Keep only records up to ``last_round`` (rounds after the checkpoint are rerun)."""
        kept = [r for r in self.read_metrics() if int(r.get("round", 0)) <= last_round]
        _atomic_write(self.metrics_path, "".join(to_json(r) + "\n" for r in kept))

    def write_summary(self, summary: dict[str, Any]) -> None:
        _atomic_write(self.summary_path, to_json(summary, indent=2) + "\n")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class MetricsFileSink:
    """Round observer that appends every round record to ``metrics.jsonl``."""

    def __init__(self, run_dir: RunDirectory) -> None:
        self.run_dir = run_dir

    def on_round_start(self, round: int, selected: list[int]) -> None:
        return None

    def on_client_done(self, round: int, outcome: Any) -> None:
        return None

    def on_round_end(self, record: dict[str, Any]) -> None:
        self.run_dir.append_metrics(record)
