"""Read raw rows: JSON lines, JSON, CSV or Parquet files, a directory of such files, a saved HF
dataset, or a Hugging Face hub dataset id (``namespace/name``, through ``datasets.load_dataset``
when the hub or its cache is reachable; a clear error naming the id when not).

Every row comes back as a ``dict`` together with a *location* string that names the file and
the 1-based line (``.jsonl``, ``.csv``, and ``.json`` files that hold JSON lines) or the
0-based row index (a ``.json`` list, ``.parquet``, a ``datasets`` directory). Locations are what
error messages print, so a bad row is always reported as ``data/train.jsonl, line 17: ...``.

A malformed row raises :class:`DataError`; with ``on_error="skip"`` it is dropped instead and
counted in a :class:`SkipLog`, whose counts end up in the data statistics (never silently).

A saved ``datasets.DatasetDict`` (and a hub dataset) yields its ``train`` split unless the path
names another one with a ``::split`` suffix, e.g. ``data/my_dataset::validation``.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

OnError = Literal["raise", "skip"]

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
MAX_SKIP_EXAMPLES = 5


class DataError(ValueError):
    """A data file is missing or a row in it is malformed. The message names file and row."""


@dataclass
class SkipLog:
    """Rows left out under ``on_error="skip"``: counts per reason and the first few messages."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, reason: str, message: str) -> None:
        self.counts[reason] += 1
        if len(self.examples) < MAX_SKIP_EXAMPLES:
            self.examples.append(message)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: SkipLog) -> None:
        self.counts.update(other.counts)
        room = MAX_SKIP_EXAMPLES - len(self.examples)
        self.examples.extend(other.examples[: max(room, 0)])


class RowError(DataError):
    """A single malformed row; ``reason`` is a short category used for skip counts."""

    def __init__(self, where: str, reason: str, detail: str) -> None:
        super().__init__(f"{where}: {detail}")
        self.where = where
        self.reason = reason


@dataclass
class RawRows:
    """Rows read from one source, each with its location string."""

    source: str
    rows: list[dict[str, Any]]
    locations: list[str]
    skips: SkipLog

    def __len__(self) -> int:
        return len(self.rows)


def split_path(path: str) -> tuple[Path, str | None]:
    """``"dir::validation"`` -> ``(Path("dir"), "validation")``; plain paths get ``None``."""
    if "::" in path:
        base, split = path.rsplit("::", 1)
        return Path(base), split or None
    return Path(path), None


def iter_rows(path: str, skips: SkipLog, *, on_error: OnError = "raise"
              ) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(location, row)`` for each well-formed row of ``path``, lazily.

    Malformed rows raise :class:`DataError` (``on_error="raise"``) or are counted in ``skips``.
    """
    file, split = split_path(path)
    if not file.exists():
        if looks_like_hub_id(str(file)):
            yield from _check_objects(_iter_hub_dataset(str(file), split), skips, on_error)
            return
        raise DataError(f"data file {file} does not exist")
    yield from _iter_source(file, split, skips, on_error)


def looks_like_hub_id(name: str) -> bool:
    """``namespace/name`` with no path syntax: a Hugging Face hub dataset id."""
    if name.startswith((".", "/", "~")) or "\\" in name:
        return False
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and Path(name).suffix.lower() not in (
        *SUPPORTED_SUFFIXES, ".txt", ".yaml", ".yml")


def read_rows(path: str, *, on_error: OnError = "raise", max_rows: int | None = None) -> RawRows:
    """Read the rows of ``path`` as dicts (see the module docstring for formats).

    ``max_rows`` keeps the first ``max_rows`` well-formed rows (file order).
    """
    skips = SkipLog()
    rows: list[dict[str, Any]] = []
    locations: list[str] = []
    for where, row in iter_rows(path, skips, on_error=on_error):
        if max_rows is not None and len(rows) >= max_rows:
            break
        rows.append(row)
        locations.append(where)
    return RawRows(source=str(path), rows=rows, locations=locations, skips=skips)


def _iter_source(
    file: Path, split: str | None, skips: SkipLog, on_error: OnError
) -> Iterator[tuple[str, dict[str, Any]]]:
    if file.is_dir() and not _is_saved_dataset(file):
        yield from _iter_data_dir(file, split, skips, on_error)
        return
    if file.is_dir():
        yield from _check_objects(_iter_hf_dir(file, split), skips, on_error)
        return
    if split is not None:
        raise DataError(f"{file}: a '::{split}' suffix only applies to a saved HF dataset dir")
    suffix = file.suffix.lower()
    if suffix == ".jsonl":
        yield from _iter_json_lines(file, skips, on_error)
    elif suffix == ".json":
        yield from _iter_json(file, skips, on_error)
    elif suffix == ".csv":
        yield from _check_objects(_iter_csv(file), skips, on_error)
    elif suffix == ".parquet":
        yield from _check_objects(_iter_parquet(file), skips, on_error)
    else:
        raise DataError(
            f"{file}: unsupported file type {suffix or '(none)'!r}; expected one of "
            f"{', '.join(SUPPORTED_SUFFIXES)} or a directory saved with Dataset.save_to_disk"
        )


def _check_objects(
    items: Iterator[tuple[str, Any]], skips: SkipLog, on_error: OnError
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Pass objects through; raise or count parse errors (yielded as ``RowError``) and
    non-object items."""
    for where, item in items:
        if isinstance(item, dict):
            yield where, item
            continue
        error = item if isinstance(item, RowError) else RowError(
            where, "not an object",
            f"expected a JSON object (a mapping of field -> value), got {type(item).__name__}",
        )
        if on_error == "raise":
            raise error
        skips.add(error.reason, str(error))


def _parse_json_line(where: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        return RowError(where, "invalid JSON", f"invalid JSON ({exc.msg} at column {exc.colno}); "
                                               f"expected one JSON object per line")


def _iter_json_lines(
    file: Path, skips: SkipLog, on_error: OnError
) -> Iterator[tuple[str, dict[str, Any]]]:
    def parsed() -> Iterator[tuple[str, Any]]:
        with file.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    where = f"{file}, line {number}"
                    yield where, _parse_json_line(where, line)

    yield from _check_objects(parsed(), skips, on_error)


def _iter_json(file: Path, skips: SkipLog, on_error: OnError) -> Iterator[tuple[str, dict]]:
    text = file.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if not stripped:
        return
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        if stripped.startswith("{"):  # JSON lines stored with a .json name
            yield from _iter_json_lines(file, skips, on_error)
            return
        raise DataError(
            f"{file}, line {exc.lineno}: invalid JSON ({exc.msg}); expected a list of objects "
            f"or one JSON object per line"
        ) from None
    if isinstance(document, dict):
        yield from _check_objects(iter([(f"{file}, line 1", document)]), skips, on_error)
        return
    if not isinstance(document, list):
        raise DataError(f"{file}: top-level JSON is {type(document).__name__}; "
                        f"expected a list of objects or one JSON object per line")
    items = ((f"{file}, row {index}", item) for index, item in enumerate(document))
    yield from _check_objects(items, skips, on_error)


def _iter_csv(file: Path) -> Iterator[tuple[str, Any]]:
    with file.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []  # reads the header
        start = reader.line_num + 1
        for record in reader:
            where = f"{file}, line {start}"
            start = reader.line_num + 1
            if None in record:  # more cells than header columns
                yield where, RowError(where, "wrong number of columns",
                                      f"row has {len(columns) + len(record[None])} cells; "
                                      f"the header has {len(columns)} columns")
                continue
            yield where, dict(record)


def _iter_parquet(file: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - optional dependency
        raise DataError(f"{file}: reading parquet needs pyarrow (pip install fedfm[parquet])") \
            from exc
    try:
        table = pq.read_table(file)
    except Exception as exc:  # pyarrow raises several error types for bad files
        raise DataError(f"{file}: not a readable parquet file ({exc})") from None
    for index, row in enumerate(table.to_pylist()):
        yield f"{file}, row {index}", row


def _is_saved_dataset(directory: Path) -> bool:
    """What ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` leave behind."""
    return any((directory / name).is_file() for name in
               ("dataset_info.json", "state.json", "dataset_dict.json"))


def _iter_data_dir(directory: Path, split: str | None, skips: SkipLog, on_error: OnError
                   ) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every supported file directly in ``directory``, in name order, as one source."""
    if split is not None:
        raise DataError(f"{directory}: a '::{split}' suffix only applies to a saved HF "
                        f"dataset dir or a hub dataset id")
    files = sorted(p for p in directory.iterdir()
                   if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES)
    if not files:
        raise DataError(f"{directory}: no data files ({', '.join(SUPPORTED_SUFFIXES)}) and not "
                        f"a dataset saved with save_to_disk")
    for file in files:
        yield from _iter_source(file, None, skips, on_error)


def _iter_hub_dataset(dataset_id: str, split: str | None) -> Iterator[tuple[str, Any]]:
    """A hub dataset through ``datasets.load_dataset`` (cached, or downloaded when online)."""
    import datasets

    name = split or "train"
    try:
        dataset = datasets.load_dataset(dataset_id, split=name)
    except Exception as exc:  # offline, unknown id, missing split: datasets raises many types
        reason = " ".join(str(exc).split())[:300]
        raise DataError(f"data path {dataset_id!r} is not a local file or directory, and "
                        f"loading it as hub dataset {dataset_id!r} (split {name!r}) failed: "
                        f"{reason}. Offline machines need a local copy (save_to_disk, or "
                        f"a jsonl/csv/parquet file)") from None
    for index, row in enumerate(dataset):
        yield f"{dataset_id}::{name}, row {index}", row


def _iter_hf_dir(directory: Path, split: str | None) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(directory))
    except FileNotFoundError as exc:
        raise DataError(f"{directory}: not a dataset saved with save_to_disk ({exc})") from None
    if isinstance(loaded, datasets.DatasetDict):
        name = split or "train"
        if name not in loaded:
            raise DataError(f"{directory}: split {name!r} not found; available splits: "
                            f"{', '.join(sorted(loaded))} (select one with '{directory}::SPLIT')")
        dataset = loaded[name]
        label = f"{directory}::{name}"
    else:
        if split not in (None, "train"):
            raise DataError(f"{directory}: holds a single Dataset, not a DatasetDict; "
                            f"split {split!r} does not exist")
        dataset = loaded
        label = str(directory)
    for index, row in enumerate(dataset):
        yield f"{label}, row {index}", row
