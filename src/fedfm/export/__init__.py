"""Export a run's global model for Hugging Face tools, with a provenance model card.

``export_run(run_dir, fmt="peft" | "merged" | "full", round=None, out=None)`` writes the model
(``fedfm.export.artifacts``) and its card (``fedfm.export.card``); ``fedfm export`` calls it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedfm.core.checkpoint import round_dir_name
from fedfm.export.artifacts import EXPORT_FORMATS, ExportError, write_model
from fedfm.export.card import build_provenance, write_card
from fedfm.tracking.run_record import RunRecord, RunRecordError, global_state_at, read_run


@dataclass
class ExportResult:
    directory: Path
    format: str
    round: int
    provenance: dict[str, Any]


def export_run(run_dir: str | Path, fmt: str = "peft", *, round: int | None = None,
               out: str | Path | None = None) -> ExportResult:
    """Write the global model after ``round`` (default: the last kept) of ``run_dir`` as
    ``fmt`` into ``out`` (default ``RUN_DIR/export/<fmt>-round_NNNN``), with its card."""
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"--format {fmt!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    try:
        record = read_run(run_dir)
        state, round_index = global_state_at(record, round)
    except RunRecordError as exc:
        raise ExportError(str(exc)) from exc
    target = Path(out) if out is not None else (
        record.path / "export" / f"{fmt}-{round_dir_name(round_index)}")
    if target.exists() and any(target.iterdir()):
        raise ExportError(f"output directory {target} exists and is not empty")
    written = write_model(record, state, fmt, target)
    provenance = build_provenance(record, written, fmt, round_index)
    write_card(provenance, fmt, written)
    return ExportResult(target, fmt, round_index, provenance)


__all__ = ["EXPORT_FORMATS", "ExportError", "ExportResult", "RunRecord", "export_run",
           "read_run"]
