"""Export scikit-learn's handwritten digits to ``examples/data/digits.jsonl`` (vision recipe).

The data set is the test part of the UCI "Optical Recognition of Handwritten Digits" set
(Alpaydin & Kaynak, 1998) as scikit-learn ships it inside its package (``sklearn/datasets/data/
digits.csv.gz``, BSD-3-Clause): 1,797 grayscale 8x8 images of the digits 0-9, each pixel a count
0..16 of set pixels in a 4x4 block of the original 32x32 bitmap.

Each output row is ``{"image": [[8 ints] x 8], "label": int}`` with the pixel counts rescaled to
8-bit gray levels, ``round(v * 255 / 16)``, so the usual ``1/255`` rescaling of image
processors applies. Rows keep scikit-learn's order; the output is byte-for-byte deterministic.

scikit-learn is needed only to run this script once (it is not a dependency of fedfm)::

    .venv/bin/pip install scikit-learn
    .venv/bin/python examples/data/make_digits.py
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

OUT = Path(__file__).with_name("digits.jsonl")
LEVELS = 16  # the digits' pixel counts run 0..16


def to_gray(counts: list[float]) -> list[int]:
    return [round(value * 255 / LEVELS) for value in counts]


def main(out: Path = OUT) -> None:
    import sklearn
    from sklearn.datasets import load_digits

    digits = load_digits()
    lines = []
    for image, label in zip(digits.images, digits.target, strict=True):
        rows = [to_gray([float(v) for v in row]) for row in image]
        lines.append(json.dumps({"image": rows, "label": int(label)}, separators=(",", ":")))
    data = ("\n".join(lines) + "\n").encode()
    out.write_bytes(data)
    print(f"{out}: {len(lines)} rows, {len(data):,} bytes, sha256 "
          f"{hashlib.sha256(data).hexdigest()} (scikit-learn {sklearn.__version__})")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
