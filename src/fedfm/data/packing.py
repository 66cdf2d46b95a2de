"""Packing: several causal-LM examples in one row, each attending only to itself.

Rows are filled first-fit-decreasing up to ``capacity`` tokens. Each example keeps its own
position ids (restarting at 0), which is how Hugging Face models recognise packed rows and build
a block-diagonal causal mask (``attention_mask`` must then be absent). The first label of every
example is -100, so no example is trained to predict its first token from the one before it.
"""

from __future__ import annotations

from typing import Any

from fedfm.data.formats import IGNORE_INDEX


def _first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for index in order:
        for row, room in enumerate(free):
            if lengths[index] <= room:
                rows[row].append(index)
                free[row] -= lengths[index]
                break
        else:
            rows.append([index])
            free.append(capacity - lengths[index])
    return rows


def pack_examples(examples: list[dict[str, Any]], capacity: int) -> list[dict[str, Any]]:
    """Packed rows (``input_ids``, ``labels``, ``position_ids``, ``num_examples``), deterministic
    for the same examples. Examples longer than ``capacity`` are an error (truncate first)."""
    if capacity < 1:
        raise ValueError(f"packing capacity must be >= 1 (got {capacity})")
    lengths = [len(ex["input_ids"]) for ex in examples]
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise ValueError(f"example {too_long[0]} has {lengths[too_long[0]]} tokens, more than "
                         f"the packing capacity {capacity} (model.max_length)")
    packed = []
    for row in _first_fit_decreasing(lengths, capacity):
        input_ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for index in sorted(row):
            example = examples[index]
            input_ids.extend(example["input_ids"])
            labels.extend([IGNORE_INDEX, *example["labels"][1:]])
            positions.extend(range(len(example["input_ids"])))
        packed.append({"input_ids": input_ids, "labels": labels, "position_ids": positions,
                       "num_examples": len(row)})
    return packed
