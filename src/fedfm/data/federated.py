"""The entry point of the data layer: from a ``DataConfig`` to per-client tokenized examples.

``build_federated_data`` does, in order (every random step seeded from ``seed``):

1. read and validate the rows of ``cfg.path`` (the first ``cfg.max_rows`` valid ones);
2. take the global validation set: ``cfg.validation_path`` if set, else a random
   ``cfg.validation_fraction`` of the rows, held out *before* partitioning; either way capped at
   ``cfg.max_validation_rows`` (held-out rows beyond the cap stay in training);
3. partition the remaining rows over clients (``cfg.partition``, see :mod:`fedfm.data.partition`)
   -- on rows, not tokens, so the split does not depend on the tokenizer;
4. hold out ``cfg.client_validation_fraction`` of each client's rows as its validation split
   (at least one row when the fraction is > 0 and the client has >= 2 rows);
5. tokenize everything in one batched call per text kind; examples with no supervised token
   (over-long prompts) are dropped and counted in ``stats.dropped``.

Client training examples are in file order; the training loop is expected to shuffle.
Each example's ``row`` indexes the validated rows of its source file (``cfg.path`` for client
data and held-out validation, ``cfg.validation_path`` for a separate validation file).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedfm.config import DataConfig
from fedfm.data.derived import DERIVED_PARTITIONS, DerivedKeyError, derived_keys, item_text
from fedfm.data.formats import (
    IGNORE_INDEX,
    LabelSpace,
    Records,
    apply_label_space,
    infer_label_space,
    load_records,
    tokenize_records,
)
from fedfm.data.media import collate_media
from fedfm.data.partition import KEYED_PARTITIONS, describe, partition
from fedfm.data.sources import DataError, SkipLog
from fedfm.data.stats import ClientStats, DataStats

TASKS = ("causal_lm", "classification", "seq2seq")
LABELED_FORMATS = ("classification", "image")  # rows with a class label
FORMAT_TASKS: dict[str, tuple[str, ...]] = {
    "instruction": ("causal_lm", "seq2seq"),
    "chat": ("causal_lm", "seq2seq"),
    "classification": ("classification",),
    "preference": ("causal_lm",),
    "image": ("classification",),  # ViT image classifier (fedfm.data.media)
    "audio": ("seq2seq",),  # Whisper speech-to-text
}
_GLOBAL_VAL_STREAM = 1
_CLIENT_VAL_STREAM = 2
_VAL_CAP_STREAM = 3


@dataclass
class ClientData:
    client_id: int
    train: list[dict[str, Any]]  # tokenized examples
    validation: list[dict[str, Any]]  # per-client held-out split
    group: str | None = None  # most common ``data.group_by`` value of its training rows


@dataclass
class FederatedData:
    clients: list[ClientData]
    global_validation: list[dict[str, Any]]
    label_names: list[str] | None  # classification
    num_labels: int | None
    task: str
    stats: DataStats


# --------------------------------------------------------------------------- checks


def check_task(fmt: str, task: str) -> None:
    """Raise ``DataError`` when data format and model task do not fit together."""
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    allowed = FORMAT_TASKS[fmt]
    if task not in allowed:
        raise DataError(f"data.format={fmt!r} needs task {' or '.join(allowed)}, got "
                         f"task={task!r}" + (" (classification needs data.format="
                                             "'classification' or 'image')"
                                             if task == "classification" else ""))


def partition_column(cfg: DataConfig) -> str | None:
    """The column the partition (and the stats histograms) use: ``partition.by``, else the
    label for classification, else None."""
    if cfg.partition.by:
        return cfg.partition.by
    return cfg.label_field if cfg.format in LABELED_FORMATS else None


def _required_columns(cfg: DataConfig) -> tuple[str, ...]:
    column = partition_column(cfg)
    if cfg.partition.kind in KEYED_PARTITIONS and column is None:
        raise DataError(f"partition.kind={cfg.partition.kind!r} needs a column: set "
                         f"data.partition.by (e.g. by: category) for data.format="
                         f"{cfg.format!r}")
    needed = [c for c in (column, cfg.group_by) if c is not None
              and not (cfg.format in LABELED_FORMATS and c == cfg.label_field)]
    return tuple(dict.fromkeys(needed))


# --------------------------------------------------------------------------- loading


def _load_sources(cfg: DataConfig, columns: Sequence[str] = ()
                  ) -> tuple[Records, Records | None, LabelSpace | None]:
    train = load_records(cfg.path, cfg, columns=columns, max_rows=cfg.max_rows)
    group = () if cfg.group_by is None else (cfg.group_by,)
    val = load_records(cfg.validation_path, cfg, columns=group) if cfg.validation_path else None
    if cfg.format not in LABELED_FORMATS:
        return train, val, None
    labels = [item.label for item in train.items] + ([item.label for item in val.items]
                                                     if val is not None else [])
    space = infer_label_space(labels, cfg.label_names, source=cfg.path)
    train = apply_label_space(train, space, cfg.on_error)
    if val is not None:
        val = apply_label_space(val, space, cfg.on_error)
    return train, val, space


def load_label_info(cfg: DataConfig) -> tuple[list[str] | None, int | None]:
    """Label names and count for classification (reads rows, tokenizes nothing), so the model
    can be built with ``num_labels`` first. ``(None, None)`` for other formats."""
    if cfg.format not in LABELED_FORMATS:
        return None, None
    _, _, space = _load_sources(cfg)
    assert space is not None
    return list(space.names), space.num_labels


# --------------------------------------------------------------------------- splitting


def _holdout_count(num_rows: int, fraction: float) -> int:
    """``round(fraction * n)``, at least 1 when fraction > 0 and n >= 2, never all rows."""
    if fraction <= 0 or num_rows < 2:
        return 0
    return min(max(1, round(fraction * num_rows)), num_rows - 1)


def _sample(rng: np.random.Generator, num_rows: int, count: int) -> list[int]:
    return sorted(int(i) for i in rng.choice(num_rows, size=count, replace=False))


@dataclass
class _Plan:
    """Row-level split (indices into ``train`` / ``val`` records), before tokenization."""

    train: Records
    val: Records | None  # a separate validation file
    space: LabelSpace | None
    global_val_rows: list[int]  # into val if given, else into train
    client_rows: list[tuple[list[int], list[int]]]  # (train rows, validation rows) per client
    column: str | None
    derived: dict[int, str] | None = None  # row -> its text-derived partition key


def _plan(cfg: DataConfig, num_clients: int, seed: int) -> _Plan:
    train, val, space = _load_sources(cfg, _required_columns(cfg))
    if not len(train):
        raise DataError(f"{cfg.path}: no valid rows" + (
            f" ({train.skips.total} skipped)" if train.skips.total else ""))
    cap = cfg.max_validation_rows
    if val is not None:
        count = len(val) if cap is None else min(cap, len(val))
        rng = np.random.default_rng([seed, _VAL_CAP_STREAM])
        global_rows = list(range(len(val))) if count == len(val) else \
            _sample(rng, len(val), count)
        pool = list(range(len(train)))
    else:
        count = _holdout_count(len(train), cfg.validation_fraction)
        count = count if cap is None else min(count, cap)
        global_rows = _sample(np.random.default_rng([seed, _GLOBAL_VAL_STREAM]),
                              len(train), count)
        held = set(global_rows)
        pool = [i for i in range(len(train)) if i not in held]
    column = partition_column(cfg)
    derived: dict[int, str] | None = None
    if cfg.partition.kind in DERIVED_PARTITIONS:
        keys: list[Any] = _derived_keys(cfg, train, pool, num_clients, seed)
        column = DERIVED_PARTITIONS[cfg.partition.kind]
        derived = dict(zip(pool, keys, strict=True))
    else:
        keys = _keys(train, pool, column, cfg)
    parts = partition(cfg.partition, keys, num_clients, seed)
    client_rows = [_client_split([pool[i] for i in part], cfg.client_validation_fraction,
                                 seed, client) for client, part in enumerate(parts)]
    return _Plan(train, val, space, global_rows, client_rows, column, derived)


def _derived_keys(cfg: DataConfig, train: Records, pool: Sequence[int], num_clients: int,
                  seed: int) -> list[str]:
    try:
        texts = [item_text(train.items[i], train.locations[i]) for i in pool]
        return derived_keys(cfg.partition, texts, num_clients, seed)
    except DerivedKeyError as exc:
        raise DataError(f"data.partition.kind={cfg.partition.kind!r}: {exc}") from None


def _keys(records: Records, pool: Sequence[int], column: str | None, cfg: DataConfig
          ) -> list[Any]:
    if column is None:
        return [None] * len(pool)
    if cfg.format in LABELED_FORMATS and column == cfg.label_field:
        return [records.items[i].label for i in pool]
    return [records.rows[i][column] for i in pool]


def _client_split(rows: list[int], fraction: float, seed: int, client: int
                  ) -> tuple[list[int], list[int]]:
    count = _holdout_count(len(rows), fraction)
    rng = np.random.default_rng([seed, _CLIENT_VAL_STREAM, client])
    picked = set(_sample(rng, len(rows), count))
    return ([r for i, r in enumerate(rows) if i not in picked],
            [r for i, r in enumerate(rows) if i in picked])


# --------------------------------------------------------------------------- stats


def _histogram(rows: Sequence[int], plan: _Plan, cfg: DataConfig) -> dict[str, int]:
    if plan.column is None:
        return {}
    if plan.derived is not None:
        return dict(Counter(plan.derived[r] for r in rows))
    keys = _keys(plan.train, rows, plan.column, cfg)
    if plan.space is not None and plan.column == cfg.label_field:
        return dict(Counter(plan.space.names[k] for k in keys))
    return dict(Counter(str(k) for k in keys))


def _stats(plan: _Plan, cfg: DataConfig, task: str, sizes: list[tuple[list[int], int]],
           global_size: int, dropped: Counter[str]) -> DataStats:
    skips = SkipLog()
    skips.merge(plan.train.skips)
    if plan.val is not None:
        skips.merge(plan.val.skips)
    clients = [ClientStats(i, len(train_rows), val_size, _histogram(train_rows, plan, cfg))
               for i, (train_rows, val_size) in enumerate(sizes)]
    return DataStats(
        source=cfg.path, format=cfg.format, task=task,
        partition=describe(cfg.partition, plan.column), histogram_key=plan.column,
        clients=clients, global_validation_size=global_size,
        global_validation_source=cfg.validation_path or f"held out from {cfg.path}",
        rows_loaded=len(plan.train), skipped=dict(skips.counts),
        skipped_examples=list(skips.examples), dropped=dict(dropped),
        label_names=list(plan.space.names) if plan.space is not None else None,
    )


def describe_federated_data(cfg: DataConfig, *, num_clients: int, task: str, seed: int
                            ) -> DataStats:
    """The split's statistics without tokenizing (``dropped`` is then empty): the same
    clients, sizes and histograms ``build_federated_data`` makes, before over-long drops."""
    check_task(cfg.format, task)
    plan = _plan(cfg, num_clients, seed)
    sizes = [(train_rows, len(val_rows)) for train_rows, val_rows in plan.client_rows]
    return _stats(plan, cfg, task, sizes, len(plan.global_val_rows), Counter())


# --------------------------------------------------------------------------- building


def build_federated_data(cfg: DataConfig, *, num_clients: int, tokenizer: Any, task: str,
                         max_length: int, seed: int) -> FederatedData:
    """Load, split, partition and tokenize ``cfg``'s data for ``num_clients`` clients."""
    check_task(cfg.format, task)
    plan = _plan(cfg, num_clients, seed)
    options = {"fmt": cfg.format, "task": task, "max_length": max_length,
               "template": cfg.prompt_template}
    tokenized = tokenize_records(plan.train, tokenizer, **options)
    dropped: Counter[str] = Counter(tokenized.dropped)
    by_row = tokenized.examples
    _tag_groups(by_row, plan.train, cfg)
    if plan.val is not None:
        val_tok = tokenize_records(plan.val.subset(plan.global_val_rows), tokenizer,
                                   rows=plan.global_val_rows, **options)
        _tag_groups(val_tok.examples, plan.val, cfg)
        global_val = [e for e in val_tok.examples if e is not None]
        dropped.update({f"{k} (global validation file)": v for k, v in val_tok.dropped.items()})
    else:
        global_val = [e for e in (by_row[i] for i in plan.global_val_rows) if e is not None]
    clients: list[ClientData] = []
    sizes: list[tuple[list[int], int]] = []
    for client, (train_rows, val_rows) in enumerate(plan.client_rows):
        train = [e for e in (by_row[i] for i in train_rows) if e is not None]
        val = [e for e in (by_row[i] for i in val_rows) if e is not None]
        if not train:
            raise DataError(
                f"client {client} has no training examples left: its {len(train_rows)} rows "
                f"had no supervised token within max_length={max_length}; raise max_length"
            )
        clients.append(ClientData(client, train, val, _majority_group(train)))
        sizes.append(([e["row"] for e in train], len(val)))
    stats = _stats(plan, cfg, task, sizes, len(global_val), dropped)
    names = list(plan.space.names) if plan.space is not None else None
    return FederatedData(clients, global_val, names, len(names) if names else None, task, stats)


def _tag_groups(examples: list[dict[str, Any] | None], records: Records, cfg: DataConfig
                ) -> None:
    """Each example's ``group``: its row's ``data.group_by`` value, as a string."""
    if cfg.group_by is None:
        return
    for example in examples:
        if example is not None:
            example["group"] = str(records.rows[example["row"]][cfg.group_by])


def _majority_group(examples: list[dict[str, Any]]) -> str | None:
    """The most common group (ties: the smallest value), or None without groups."""
    counts = Counter(e["group"] for e in examples if "group" in e)
    if not counts:
        return None
    return min(counts, key=lambda g: (-counts[g], g))


# --------------------------------------------------------------------------- batching


def _pad(sequences: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max((len(s) for s in sequences), default=0)
    out = torch.full((len(sequences), width), value, dtype=torch.long)
    for i, seq in enumerate(sequences):
        out[i, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
    return out


def _collate_packed(rows: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Packed rows (``data.packing``): no attention mask (the model derives a block-diagonal one
    from the position ids); the padded tail is a block of its own with positions from 0."""
    width = max(len(r["input_ids"]) for r in rows)
    positions = [list(r["position_ids"]) + list(range(width - len(r["position_ids"])))
                 for r in rows]
    return {"input_ids": _pad([r["input_ids"] for r in rows], pad_token_id),
            "position_ids": _pad(positions, 0),
            "labels": _pad([r["labels"] for r in rows], IGNORE_INDEX)}


def _pad_lm(examples: Sequence[dict[str, Any]], prefix: str, pad_token_id: int
            ) -> dict[str, torch.Tensor]:
    ids = [e[f"{prefix}input_ids"] for e in examples]
    return {
        f"{prefix}input_ids": _pad(ids, pad_token_id),
        f"{prefix}attention_mask": _pad([[1] * len(s) for s in ids], 0),
        f"{prefix}labels": _pad([e[f"{prefix}labels"] for e in examples], IGNORE_INDEX),
    }


def collate(examples: list[dict[str, Any]], *, pad_token_id: int, task: str
            ) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids`` (pad id), ``attention_mask``, ``labels`` (-100 for
    LM/seq2seq, a LongTensor of class ids for classification), ``token_type_ids`` when the
    examples have them. Preference examples give ``chosen_*`` and ``rejected_*`` tensors;
    image and audio examples stacked ``pixel_values`` / ``input_features`` (no padding)."""
    if not examples:
        raise ValueError("collate got an empty batch")
    if "pixel_values" in examples[0] or "input_features" in examples[0]:
        return collate_media(examples, task)
    if pad_token_id is None:
        raise ValueError("collate needs a pad_token_id (set tokenizer.pad_token)")
    if "chosen_input_ids" in examples[0]:
        return {**_pad_lm(examples, "chosen_", pad_token_id),
                **_pad_lm(examples, "rejected_", pad_token_id)}
    ids = [e["input_ids"] for e in examples]
    if "position_ids" in examples[0]:
        return _collate_packed(examples, pad_token_id)
    batch = {"input_ids": _pad(ids, pad_token_id),
             "attention_mask": _pad([[1] * len(s) for s in ids], 0)}
    if "token_type_ids" in examples[0]:
        batch["token_type_ids"] = _pad([e["token_type_ids"] for e in examples], 0)
    if task == "classification":
        batch["labels"] = torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long)
    else:
        batch["labels"] = _pad([e["labels"] for e in examples], IGNORE_INDEX)
    return batch
