"""Unlabeled public data for server-side distillation: read like any data source, only the
input text is kept, tokenized by whichever model will read it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedfm.config import DataConfig, PublicDataConfig
from fedfm.data.formats import InstructionItem, encode, render_prompt
from fedfm.data.sources import DataError, read_rows

PublicText = tuple[str, str | None]  # (text, pair text or None)


def _field(row: dict[str, Any], name: str, where: str, source: str) -> str:
    value = row.get(name)
    if not isinstance(value, str):
        found = "missing" if value is None else f"a {type(value).__name__}"
        raise DataError(f"{where}: public data field {name!r} must be a string, it is {found} "
                        f"(set algorithm.distill.public.text_field to the column holding the "
                        f"text of {source})")
    return value


def _first(row: dict[str, Any], names: Sequence[str]) -> str:
    return next((str(row[name]) for name in names if isinstance(row.get(name), str)), "")


def _row_text(row: dict[str, Any], where: str, cfg: PublicDataConfig, data: DataConfig
              ) -> PublicText:
    source = cfg.path
    if cfg.text_field is not None:
        pair = _field(row, cfg.text_pair_field, where, source) if cfg.text_pair_field else None
        return _field(row, cfg.text_field, where, source), pair
    if data.format == "classification":
        pair = (_field(row, data.text_pair_field, where, source) if data.text_pair_field
                else None)
        return _field(row, data.text_field, where, source), pair
    if data.format == "instruction":
        fields = data.instruction_fields
        item = InstructionItem(_field(row, fields.instruction, where, source),
                               _first(row, fields.input), _first(row, fields.output))
        return render_prompt(item, data.prompt_template) + item.output, None
    if data.format == "chat":
        messages = row.get(data.messages_field)
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: public data field {data.messages_field!r} must be a "
                            f"non-empty list of messages")
        return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in messages
                         if isinstance(m, dict)), None
    raise DataError(f"public data cannot be read for data.format {data.format!r}")


def load_public_texts(cfg: PublicDataConfig, data: DataConfig) -> list[PublicText]:
    """The input texts of the public set (labels, if any, are never read)."""
    raw = read_rows(cfg.path, max_rows=cfg.max_rows)
    texts = [_row_text(row, where, cfg, data) for row, where in zip(raw.rows, raw.locations,
                                                                    strict=True)]
    if not texts:
        raise DataError(f"public data {cfg.path}: no rows")
    return texts


def tokenize_public(texts: Sequence[PublicText], tokenizer: Any, *, task: str,
                    max_length: int) -> list[dict[str, list[int]]]:
    """``input_ids`` (and ``token_type_ids`` for text pairs) per text, in order."""
    if task == "classification":
        first = [text for text, _ in texts]
        pairs = [pair or "" for _, pair in texts] if texts[0][1] is not None else None
        encoded = tokenizer(first, pairs, truncation=True, max_length=max_length, verbose=False,
                            return_attention_mask=False,
                            return_token_type_ids=pairs is not None)
        rows = []
        for i in range(len(texts)):
            row = {"input_ids": list(encoded["input_ids"][i])}
            if pairs is not None and "token_type_ids" in encoded:
                row["token_type_ids"] = list(encoded["token_type_ids"][i])
            rows.append(row)
        return rows
    ids = encode(tokenizer, [text for text, _ in texts], add_special_tokens=True)
    return [{"input_ids": row[:max_length] or [0]} for row in ids]


def collate_public(rows: Sequence[dict[str, list[int]]], pad_token_id: int
                   ) -> dict[str, torch.Tensor]:
    width = max(len(row["input_ids"]) for row in rows)
    batch = {"input_ids": torch.full((len(rows), width), pad_token_id, dtype=torch.long),
             "attention_mask": torch.zeros((len(rows), width), dtype=torch.long)}
    if "token_type_ids" in rows[0]:
        batch["token_type_ids"] = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        length = len(row["input_ids"])
        batch["input_ids"][i, :length] = torch.as_tensor(row["input_ids"])
        batch["attention_mask"][i, :length] = 1
        if "token_type_ids" in batch:
            batch["token_type_ids"][i, :length] = torch.as_tensor(row["token_type_ids"])
    return batch


def public_batches(rows: Sequence[dict[str, list[int]]], batch_size: int, pad_token_id: int
                   ) -> list[dict[str, torch.Tensor]]:
    """Fixed batches in row order (every model reading the public set batches it the same
    way, so example ``i`` of batch ``b`` is the same text for all of them)."""
    return [collate_public(rows[start:start + batch_size], pad_token_id)
            for start in range(0, len(rows), batch_size)]
