"""Partition keys derived from the text itself, for data with no label or metadata column to
split by (instructions, chats, raw documents) -- and for feature skew on labeled data.

- ``embedding_cluster``: each row's sentence embedding (the mean-pooled, L2-normalised last
  hidden state of a sentence encoder, by default the packaged all-MiniLM-L6-v2) is clustered
  with k-means (scikit-learn); the cluster is the row's key. Clustering sentence embeddings to
  make non-IID splits of unlabeled text follows FedNLP (Lin et al., "FedNLP: Benchmarking
  Federated Learning Methods for Natural Language Processing Tasks", Findings of NAACL 2022).
- ``length``: the row's length in words, cut into equal-count (quantile) bins.

Both keys are then dealt over clients by a ``Dir(alpha)`` draw per key, exactly as classes are
by the ``dirichlet`` partitioner: small ``alpha`` gives each client few clusters (topics,
styles) or few lengths; large ``alpha`` approaches IID.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedfm.config import PartitionConfig

# partition kind -> the name of the key it derives (the stats histograms' column)
DERIVED_PARTITIONS = {"embedding_cluster": "cluster", "length": "length_bin"}
EMBED_BATCH = 64
EMBED_MAX_LENGTH = 128
_EMBEDDING_CACHE: dict[tuple[str, str], np.ndarray] = {}
_CACHE_SIZE = 4


class DerivedKeyError(ValueError):
    """The rows cannot give the asked-for key (e.g. images have no text)."""


def item_text(item: Any, where: str) -> str:
    """The text of a parsed row (every text field of its format, in order)."""
    from fedfm.data.formats import ChatItem, ClassificationItem, InstructionItem, PreferenceItem

    if isinstance(item, ClassificationItem):
        return item.text if item.pair is None else f"{item.text} {item.pair}"
    if isinstance(item, InstructionItem):
        return " ".join(part for part in (item.instruction, item.input, item.output) if part)
    if isinstance(item, ChatItem):
        return " ".join(content for _, content in item.messages)
    if isinstance(item, PreferenceItem):
        return f"{item.prompt} {item.chosen}"
    raise DerivedKeyError(f"{where}: text-derived partitions need text rows; this row is "
                          f"{type(item).__name__}")


def derived_keys(cfg: PartitionConfig, texts: Sequence[str], num_clients: int,
                 seed: int) -> list[str]:
    """One key per text for ``cfg.kind`` (``embedding_cluster`` or ``length``)."""
    groups = cfg.groups or num_clients
    if len(texts) < groups:
        raise DerivedKeyError(f"partition {cfg.kind}: {len(texts)} rows cannot fill "
                              f"{groups} groups (data.partition.groups)")
    if cfg.kind == "length":
        return length_bins(texts, groups)
    if cfg.kind == "embedding_cluster":
        return embedding_clusters(texts, groups, cfg.embedding_model, seed)
    raise DerivedKeyError(f"partition {cfg.kind!r} derives no key")


def length_bins(texts: Sequence[str], bins: int) -> list[str]:
    """Each text's quantile bin of length in words, named by its range (``len 05-12``).
    Rows are ranked by length (ties in row order) and the ranks cut into ``bins`` equal runs,
    so bins hold near-equal counts even where many rows share one length."""
    lengths = np.array([len(text.split()) for text in texts])
    ranks = np.empty(len(texts), dtype=int)
    ranks[np.argsort(lengths, kind="stable")] = np.arange(len(texts))
    codes = ranks * bins // len(texts)
    width = len(str(int(lengths.max(initial=0))))
    names = {}
    for code in range(bins):
        members = lengths[codes == code]
        names[code] = (f"len {int(members.min()):0{width}d}-{int(members.max()):0{width}d}"
                       f" (bin {code})")
    return [names[int(code)] for code in codes]


def embedding_clusters(texts: Sequence[str], k: int, model: str, seed: int) -> list[str]:
    """Each text's k-means cluster (``cluster 03``) on its sentence embedding."""
    from sklearn.cluster import KMeans

    embeddings = sentence_embeddings(texts, model)
    found = KMeans(n_clusters=k, n_init=10, random_state=seed % 2**32).fit_predict(embeddings)
    width = len(str(k - 1))
    return [f"cluster {int(c):0{width}d}" for c in found]


def sentence_embeddings(texts: Sequence[str], model: str) -> np.ndarray:
    """Mean-pooled, L2-normalised last hidden states (cached per model and texts)."""
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()
    key = (model, digest)
    if key not in _EMBEDDING_CACHE:
        if len(_EMBEDDING_CACHE) >= _CACHE_SIZE:
            _EMBEDDING_CACHE.pop(next(iter(_EMBEDDING_CACHE)))
        _EMBEDDING_CACHE[key] = _embed(texts, model)
    return _EMBEDDING_CACHE[key]


def _encoder_location(model: str) -> str:
    if model == "minilm":
        from fedfm.models.loader import minilm_dir

        return str(minilm_dir())
    return model if not Path(model).exists() else str(Path(model))


def _embed(texts: Sequence[str], model: str) -> np.ndarray:
    import torch
    from transformers import AutoModel, AutoTokenizer

    from fedfm.models.loader import quiet_transformers

    location = _encoder_location(model)
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(location)
            encoder = AutoModel.from_pretrained(location).eval()
    except OSError as exc:
        raise DerivedKeyError(f"data.partition.embedding_model {model!r}: cannot load a "
                              f"sentence encoder from {location} ({exc})") from None
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # batches of like length
    out = np.zeros((len(texts), encoder.config.hidden_size), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(texts), EMBED_BATCH):
            rows = order[start:start + EMBED_BATCH]
            batch = tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                              max_length=EMBED_MAX_LENGTH, return_tensors="pt")
            hidden = encoder(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            out[rows] = torch.nn.functional.normalize(pooled, dim=-1).float().numpy()
    return out
