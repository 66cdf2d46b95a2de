"""Reading a finished (or interrupted) run directory back: config, summary, metrics, and the
global State of any kept round."""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from fedfm.config import ConfigError, RunConfig, load_config
from fedfm.core.checkpoint import GLOBAL_FILE, round_dir_name
from fedfm.core.state import State


class RunRecordError(ValueError):
    """A run directory cannot be read as asked; the message names the file or option."""


@dataclass
class RunRecord:
    """What a run directory holds, read once."""

    path: Path
    config: RunConfig
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def completed_rounds(self) -> int:
        rounds = [int(r.get("round", 0)) for r in self.metrics]
        return max(rounds, default=0)

    def kept_rounds(self) -> list[int]:
        """Rounds whose global State is on disk (checkpoints kept, and the final round)."""
        kept = set()
        checkpoints = self.path / "checkpoints"
        if checkpoints.is_dir():
            for child in checkpoints.iterdir():
                if child.name.startswith("round_") and (child / GLOBAL_FILE).is_file():
                    kept.add(int(child.name.removeprefix("round_")))
        if (self.path / "final" / GLOBAL_FILE).is_file() and "rounds" in self.summary:
            kept.add(int(self.summary["rounds"]))
        return sorted(kept)

    def metrics_at(self, round_index: int) -> dict[str, Any]:
        """The last evaluation at or before ``round_index`` (global metrics and fairness)."""
        for record in reversed(self.metrics):
            if int(record.get("round", 0)) <= round_index and "eval" in record:
                found = {"round": int(record["round"]), **record["eval"].get("global", {})}
                for key, value in record["eval"].get("fairness", {}).items():
                    found[f"clients_{key}"] = value
                for key, value in record["eval"].get("personalized_fairness", {}).items():
                    found[f"personal_{key}"] = value
                return found
        return {}


def read_run(path: str | Path) -> RunRecord:
    """Read ``config.yaml``, ``summary.json`` (absent while a run is unfinished) and
    ``metrics.jsonl`` of a run directory."""
    run_dir = Path(path)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise RunRecordError(f"{run_dir} is not a fedfm run directory (no config.yaml)")
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        raise RunRecordError(f"{config_path}: {exc}") from exc
    summary: dict[str, Any] = {}
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise RunRecordError(f"{summary_path} is not valid JSON: {exc}") from exc
    metrics: list[dict[str, Any]] = []
    metrics_path = run_dir / "metrics.jsonl"
    if metrics_path.is_file():
        for line in metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                metrics.append(json.loads(line))
            except ValueError:
                break  # a torn last line from a crash
    return RunRecord(run_dir, config, summary, metrics)


def global_state_at(record: RunRecord, round_index: int | None) -> tuple[State, int]:
    """The global State after ``round_index`` (None: the last one on disk) and its round."""
    kept = record.kept_rounds()
    if not kept:
        raise RunRecordError(f"{record.path} holds no global State yet (no final/{GLOBAL_FILE} and "
                          f"no checkpoints/round_*/{GLOBAL_FILE})")
    chosen = kept[-1] if round_index is None else round_index
    if chosen not in kept:
        raise RunRecordError(f"--round {chosen}: no global State of that round in {record.path} "
                          f"(kept rounds: {', '.join(map(str, kept))}; set "
                          f"tracking.keep_checkpoints to keep more)")
    final = record.path / "final" / GLOBAL_FILE
    checkpoint = record.path / "checkpoints" / round_dir_name(chosen) / GLOBAL_FILE
    source = checkpoint if checkpoint.is_file() else final
    try:
        return OrderedDict(load_file(str(source)).items()), chosen
    except Exception as exc:  # safetensors raises its own error types for torn files
        raise RunRecordError(f"{source} is not a readable safetensors file: {exc}") from exc
