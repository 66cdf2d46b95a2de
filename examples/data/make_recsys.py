"""Generate the next-item recommendation data of ``examples/recommendation_items.yaml``.

    python examples/data/make_recsys.py [--out DIR]

No real interaction log is public and small enough to ship, so the sequences come from a
documented, seeded generative process (``random.Random(SEED)``), the same on every machine:

- A catalogue of ``NUM_GENRES`` x ``ITEMS_PER_GENRE`` items named ``i0 .. i{N-1}``; item ``g *
  ITEMS_PER_GENRE + j`` is the ``j``-th item of genre ``g`` (think: episodes of a series).
- Users belong to ``NUM_SEGMENTS`` segments; segment ``s`` favours genres ``2s`` and ``2s+1``
  (the federated clients are segments: a natural, non-IID split of the catalogue).
- A session starts at a random item of a favoured genre. Each next item is, with probability
  ``P_NEXT_EPISODE``, the next item of the same genre (wrapping around), else a uniformly
  random item of a favoured genre. So the last item of the history predicts the next one
  most of the time, and the segment predicts the rest.
- Each row holds a history of ``HISTORY`` items and the item that followed it:
  ``{"instruction": "i12 i13 i40 i41", "input": "", "output": "i42", "segment": "s1"}``.

``recsys_train.jsonl`` has ``TRAIN_PER_SEGMENT`` rows per segment, ``recsys_validation.jsonl``
``VALIDATION_PER_SEGMENT`` rows per segment (fresh sessions).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 0
NUM_GENRES = 8
ITEMS_PER_GENRE = 6
NUM_SEGMENTS = 4
P_NEXT_EPISODE = 0.8
HISTORY = 4
TRAIN_PER_SEGMENT = 400
VALIDATION_PER_SEGMENT = 40


def favoured_genres(segment: int) -> list[int]:
    return [2 * segment, 2 * segment + 1]


def random_item(rng: random.Random, genres: list[int]) -> int:
    return rng.choice(genres) * ITEMS_PER_GENRE + rng.randrange(ITEMS_PER_GENRE)


def next_item(rng: random.Random, item: int, genres: list[int]) -> int:
    if rng.random() < P_NEXT_EPISODE:
        genre, episode = divmod(item, ITEMS_PER_GENRE)
        return genre * ITEMS_PER_GENRE + (episode + 1) % ITEMS_PER_GENRE
    return random_item(rng, genres)


def session(rng: random.Random, segment: int) -> dict[str, str]:
    genres = favoured_genres(segment)
    items = [random_item(rng, genres)]
    while len(items) < HISTORY + 1:
        items.append(next_item(rng, items[-1], genres))
    return {"instruction": " ".join(f"i{i}" for i in items[:HISTORY]), "input": "",
            "output": f"i{items[HISTORY]}", "segment": f"s{segment}"}


def rows(rng: random.Random, per_segment: int) -> list[dict[str, str]]:
    return [session(rng, segment) for segment in range(NUM_SEGMENTS)
            for _ in range(per_segment)]


def write_jsonl(path: Path, found: list[dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for row in found:
            handle.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    out = parser.parse_args().out
    rng = random.Random(SEED)
    write_jsonl(out / "recsys_train.jsonl", rows(rng, TRAIN_PER_SEGMENT))
    write_jsonl(out / "recsys_validation.jsonl", rows(rng, VALIDATION_PER_SEGMENT))


if __name__ == "__main__":
    main()
