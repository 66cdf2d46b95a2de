"""Make the small real data subsets the shipped examples use (deterministic).

    python examples/data/make_subsets.py [SHARED_DATA_DIR] [--out DIR]

SHARED_DATA_DIR defaults to ``../shared/data`` next to the repository (``/work/shared/data``);
the subsets are written next to this script. See README.md for sources and licenses.

- ``sst2_train.jsonl``: 8,000 rows of ``sst2/train.jsonl`` (``random.Random(0).sample``, kept
  in file order); ``sst2_validation.jsonl``: the full 872-row GLUE dev set. Fields: sentence,
  label. ``sst2_public.jsonl``: 1,000 *other* rows of ``sst2/train.jsonl``
  (``random.Random(1).sample`` of the rest), sentence only: the unlabeled public set of the
  distillation examples.
- ``dolly_train.jsonl``: 2,000 rows of ``dolly15k/dolly15k.jsonl`` stratified by ``category``
  (proportional, largest remainder, so all 8 categories are present);
  ``dolly_validation.jsonl``: 200 *other* rows, stratified the same way. Fields: instruction,
  context, response, category. Rows are kept in source order.
- ``hh_harmless_pref.jsonl``: 400 preference pairs of ``hh_rlhf_harmless/harmless_base_test.jsonl``
  (Anthropic HH-RLHF, MIT; red-teaming content), ``random.Random(0).sample`` of the rows whose
  ``prompt`` plus the longer response is at most 400 characters and whose two responses differ,
  kept in file order. Fields: prompt, chosen, rejected, num_turns.
- ``nusax_train.jsonl``: 200 rows per language (2,400) of ``nusax_senti/train.jsonl``;
  ``nusax_validation.jsonl``: 40 rows per language (480) of ``nusax_senti/valid.jsonl``
  (``random.Random(0).sample`` within each language, languages in sorted order, rows kept in
  file order). Fields: id, language, text, label.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_SHARED = HERE.parents[2] / "shared" / "data"
SEED = 0
SST2_TRAIN_ROWS = 8000
SST2_PUBLIC_ROWS = 1000
DOLLY_TRAIN_ROWS = 2000
DOLLY_VALIDATION_ROWS = 200
SST2_FIELDS = ("sentence", "label")
DOLLY_FIELDS = ("instruction", "context", "response", "category")
HH_ROWS = 400
HH_MAX_CHARS = 400  # prompt + longer response: fits max_length 160 of the tiny tokenizer
HH_FIELDS = ("prompt", "chosen", "rejected", "num_turns")
NUSAX_TRAIN_PER_LANGUAGE = 200
NUSAX_VALIDATION_PER_LANGUAGE = 40
NUSAX_FIELDS = ("id", "language", "text", "label")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_jsonl(path: Path, rows: list[dict[str, Any]], fields: tuple[str, ...]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps({k: row[k] for k in fields}, ensure_ascii=False) + "\n")


def proportional_quota(counts: dict[str, int], total: int) -> dict[str, int]:
    """Per-group sizes summing to ``total``, proportional to ``counts`` (largest remainder)."""
    size = sum(counts.values())
    exact = {k: counts[k] * total / size for k in sorted(counts)}
    quota = {k: int(v) for k, v in exact.items()}
    by_remainder = sorted(exact, key=lambda k: (-(exact[k] - quota[k]), k))
    for k in by_remainder[: total - sum(quota.values())]:
        quota[k] += 1
    return quota


def stratified_sample(indices_by_group: dict[str, list[int]], total: int,
                      rng: random.Random) -> list[int]:
    quota = proportional_quota({k: len(v) for k, v in indices_by_group.items()}, total)
    picked: list[int] = []
    for group in sorted(indices_by_group):
        picked.extend(rng.sample(indices_by_group[group], quota[group]))
    return sorted(picked)


def make_sst2(shared: Path, out: Path) -> None:
    train = read_jsonl(shared / "sst2" / "train.jsonl")
    keep = sorted(random.Random(SEED).sample(range(len(train)), SST2_TRAIN_ROWS))
    write_jsonl(out / "sst2_train.jsonl", [train[i] for i in keep], SST2_FIELDS)
    taken = set(keep)
    public = sorted(random.Random(SEED + 1).sample(
        [i for i in range(len(train)) if i not in taken], SST2_PUBLIC_ROWS))
    write_jsonl(out / "sst2_public.jsonl", [train[i] for i in public], ("sentence",))
    write_jsonl(out / "sst2_validation.jsonl",
                read_jsonl(shared / "sst2" / "validation.jsonl"), SST2_FIELDS)


def make_dolly(shared: Path, out: Path) -> None:
    rows = read_jsonl(shared / "dolly15k" / "dolly15k.jsonl")
    rng = random.Random(SEED)
    groups: dict[str, list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        groups[row["category"]].append(index)
    train = stratified_sample(groups, DOLLY_TRAIN_ROWS, rng)
    taken = set(train)
    rest = {k: [i for i in v if i not in taken] for k, v in groups.items()}
    validation = stratified_sample(rest, DOLLY_VALIDATION_ROWS, rng)
    write_jsonl(out / "dolly_train.jsonl", [rows[i] for i in train], DOLLY_FIELDS)
    write_jsonl(out / "dolly_validation.jsonl", [rows[i] for i in validation], DOLLY_FIELDS)
    shutil.copyfile(shared / "dolly15k" / "LICENSE", out / "LICENSE-dolly15k.txt")


def short_distinct_pair(row: dict[str, Any]) -> bool:
    longer = max(len(row["chosen"]), len(row["rejected"]))
    return (len(row["prompt"]) + longer <= HH_MAX_CHARS
            and row["chosen"].strip() != row["rejected"].strip())


def make_hh_harmless(shared: Path, out: Path) -> None:
    source = shared / "hh_rlhf_harmless"
    rows = read_jsonl(source / "harmless_base_test.jsonl")
    eligible = [i for i, row in enumerate(rows) if short_distinct_pair(row)]
    keep = sorted(random.Random(SEED).sample(eligible, HH_ROWS))
    write_jsonl(out / "hh_harmless_pref.jsonl", [rows[i] for i in keep], HH_FIELDS)
    shutil.copyfile(source / "LICENSE", out / "LICENSE-hh-rlhf.txt")


def per_language_sample(rows: list[dict[str, Any]], per_language: int) -> list[dict[str, Any]]:
    by_language: dict[str, list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        by_language[row["language"]].append(index)
    rng = random.Random(SEED)
    keep: list[int] = []
    for language in sorted(by_language):
        keep.extend(rng.sample(by_language[language], per_language))
    return [rows[i] for i in sorted(keep)]


def make_nusax(shared: Path, out: Path) -> None:
    source = shared / "nusax_senti"
    for name, split, per_language in (
            ("nusax_train.jsonl", "train.jsonl", NUSAX_TRAIN_PER_LANGUAGE),
            ("nusax_validation.jsonl", "valid.jsonl", NUSAX_VALIDATION_PER_LANGUAGE)):
        rows = per_language_sample(read_jsonl(source / split), per_language)
        write_jsonl(out / name, rows, NUSAX_FIELDS)
    shutil.copyfile(source / "LICENSE", out / "LICENSE-nusax.txt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shared", nargs="?", type=Path, default=DEFAULT_SHARED,
                        help=f"shared data directory (default {DEFAULT_SHARED})")
    parser.add_argument("--out", type=Path, default=HERE, help="output directory")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    make_sst2(args.shared, args.out)
    make_dolly(args.shared, args.out)
    make_hh_harmless(args.shared, args.out)
    make_nusax(args.shared, args.out)
    for path in sorted(args.out.glob("*.jsonl")):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        lines = sum(1 for _ in path.open(encoding="utf-8"))
        print(f"{path.name}: {lines} rows, {path.stat().st_size} bytes, sha256 {digest}")


if __name__ == "__main__":
    main()
