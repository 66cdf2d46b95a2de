"""Regenerate ``tiny_bpe.json``: the byte-level BPE tokenizer shared by the tiny presets.

Trained with the ``tokenizers`` library on real English text from the shared data folder
(Dolly-15k instructions/contexts/responses, Alpaca-5k instructions/inputs/outputs and the
SST-2 training sentences), read in file order, so the output is byte-for-byte reproducible::

    python src/fedfm/models/assets/make_tiny_tokenizer.py /work/shared/data

The vocabulary has exactly 8192 entries; the special tokens come first with fixed ids:
``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3, ``<mask>`` 4. No post-processor is stored
in the file: ``fedfm.models.loader`` adds one per preset family (see there).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB_SIZE = 8192
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]

# (relative file, fields holding text)
SOURCES: list[tuple[str, tuple[str, ...]]] = [
    ("dolly15k/dolly15k.jsonl", ("instruction", "context", "response")),
    ("alpaca5k/alpaca_5000.jsonl", ("instruction", "input", "output")),
    ("sst2/train.jsonl", ("sentence",)),
]


def iter_texts(data_dir: Path) -> Iterator[str]:
    """Every non-empty text field of the source files, in file and row order."""
    for relative, fields in SOURCES:
        path = data_dir / relative
        if not path.is_file():
            raise FileNotFoundError(f"training text {path} not found (expected under {data_dir})")
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                row = json.loads(line)
                for field in fields:
                    value = row.get(field)
                    if isinstance(value, str) and value.strip():
                        yield value


def train(data_dir: Path) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(iter_texts(data_dir), trainer=trainer)
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"trained vocab has {tokenizer.get_vocab_size()} tokens, "
                           f"expected {VOCAB_SIZE}")
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != expected_id:
            raise RuntimeError(f"special token {token} did not get id {expected_id}")
    return tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path, help="folder holding dolly15k/, alpaca5k/, sst2/")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("tiny_bpe.json"))
    args = parser.parse_args(argv)
    tokenizer = train(args.data_dir)
    args.out.write_text(tokenizer.to_str(pretty=False) + "\n", encoding="utf-8")
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, sha256 {digest[:16]})")


if __name__ == "__main__":
    main()
