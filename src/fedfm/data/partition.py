"""Partitioners: split row indices over clients to simulate federated (non-IID) data.

Each partitioner is registered by name in :data:`PARTITIONERS` and has the signature
``(keys, num_clients, seed, cfg) -> list[list[int]]``: ``keys`` holds one value per row (the
partition column, e.g. the label; ignored by ``iid`` and ``quantity``), the result holds each
client's row indices in ascending order. Every partitioner is deterministic given ``seed``
(a ``numpy.random.Generator``), and disjoint and complete: every row goes to exactly one client.
``cfg.min_size`` is the least number of rows any client may get.

- ``iid``: a seeded random permutation cut into ``num_clients`` near-equal parts.
- ``dirichlet``: label-distribution skew. For every class, client proportions are drawn from a
  symmetric ``Dir(alpha)`` and the class's rows are dealt out accordingly; smaller ``alpha`` is
  more skewed. Introduced for FL by Hsu, Qi & Brown, "Measuring the Effects of Non-Identical
  Data Distribution for Federated Visual Classification" (arXiv:1909.06335, 2019); the
  per-class-over-clients form follows Yurochkin et al., "Bayesian Nonparametric Federated
  Learning of Neural Networks" (ICML 2019) and Wang et al., "Federated Learning with Matched
  Averaging" (ICLR 2020), as benchmarked by Li et al., "Federated Learning on Non-IID Data
  Silos: An Experimental Study" (ICDE 2022). A draw leaving a client with fewer than
  ``min_size`` rows is redrawn (bounded tries, then a clear error).
- ``natural``: one client per distinct value of a column (values sorted), e.g. Dolly
  ``category`` or NusaX ``language`` -- the "natural" federated split of LEAF (Caldas et al.,
  arXiv:1812.01097, 2018).
- ``shards``: pathological label skew of McMahan et al., "Communication-Efficient Learning of
  Deep Networks from Decentralized Data" (AISTATS 2017): sort by the column, cut into
  ``num_clients * shards_per_client`` shards, give each client ``shards_per_client`` of them.
- ``label_quantity``: label-quantity skew (#C=c of Li et al., ICDE 2022): every client holds
  exactly ``classes_per_client`` distinct classes; ownership cycles through a seeded class
  order so that every class has an owner (and no row is dropped), and each class's rows are
  dealt at random in near-equal parts to its owners.
- ``embedding_cluster`` / ``length``: feature skew for text without labels. The key of each
  row is derived from its text (``fedfm.data.derived``: its k-means cluster of sentence
  embeddings, or its length bin), then dealt like ``dirichlet`` deals classes.
- ``quantity``: quantity skew. Client sizes are proportional to Pareto (power-law) draws with
  shape ``alpha`` (smaller is more skewed), each at least ``min_size``; rows are otherwise
  assigned at random (cf. the quantity-skew setting of Li et al., ICDE 2022).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np

from fedfm.config import PartitionConfig
from fedfm.core.registry import MethodInfo, Registry

Partitioner = Callable[[Sequence[Any], int, int, PartitionConfig], list[list[int]]]

PARTITIONERS: Registry[Partitioner] = Registry("partitioner")

DIRICHLET_MAX_TRIES = 1000
# the partitioners that split by a column (``cfg.by``, default the label)
KEYED_PARTITIONS = ("dirichlet", "natural", "shards", "label_quantity")


class PartitionError(ValueError):
    """A partition cannot be made with the given settings; the message says why."""


def partition(cfg: PartitionConfig, keys: Sequence[Any], num_clients: int, seed: int
              ) -> list[list[int]]:
    """Split ``len(keys)`` rows over ``num_clients`` clients with the partitioner ``cfg.kind``."""
    if num_clients < 1:
        raise PartitionError(f"num_clients must be >= 1, got {num_clients}")
    return PARTITIONERS.get(cfg.kind)(keys, num_clients, seed, cfg)


def _check_enough_rows(num_rows: int, num_clients: int, min_size: int, kind: str) -> None:
    if num_rows < num_clients * min_size:
        raise PartitionError(
            f"{kind} partition: {num_rows} rows cannot give {num_clients} clients at least "
            f"min_size={min_size} rows each (needs {num_clients * min_size})"
        )


def _hashable(value: Any) -> Hashable:
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True)
    return value


def sorted_values(keys: Sequence[Any]) -> list[Hashable]:
    """Distinct key values in a stable order (by type name, then value)."""
    distinct = {_hashable(k) for k in keys}
    return sorted(distinct, key=lambda v: (type(v).__name__, v))


def encode_keys(keys: Sequence[Any]) -> tuple[np.ndarray, list[Hashable]]:
    """Integer codes (index into the sorted distinct values) and those values."""
    values = sorted_values(keys)
    code = {v: i for i, v in enumerate(values)}
    return np.fromiter((code[_hashable(k)] for k in keys), dtype=np.int64,
                       count=len(keys)), values


def _finish(assignment: Sequence[Sequence[int] | np.ndarray]) -> list[list[int]]:
    return [sorted(int(i) for i in part) for part in assignment]


def _split_sizes(parts: np.ndarray, total: int) -> np.ndarray:
    """Integer sizes summing to ``total``, proportional to ``parts`` (largest remainder)."""
    raw = parts / parts.sum() * total
    sizes = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - sizes), kind="stable")
    sizes[order[: total - int(sizes.sum())]] += 1
    return sizes


@PARTITIONERS.register("iid", MethodInfo(
    "adaptability.heterogeneity.partition",
    "Communication-Efficient Learning of Deep Networks from Decentralized Data "
    "(McMahan et al., AISTATS 2017)",
    "data: {partition: {kind: iid}}", "uniformly random, near-equal split"))
def iid_partition(keys: Sequence[Any], num_clients: int, seed: int, cfg: PartitionConfig
                  ) -> list[list[int]]:
    """Uniformly random, near-equal split (sizes differ by at most one)."""
    num_rows = len(keys)
    _check_enough_rows(num_rows, num_clients, cfg.min_size, "iid")
    order = np.random.default_rng(seed).permutation(num_rows)
    return _finish(np.array_split(order, num_clients))


@PARTITIONERS.register("dirichlet", MethodInfo(
    "adaptability.heterogeneity.partition",
    "Measuring the Effects of Non-Identical Data Distribution for Federated Visual "
    "Classification (Hsu et al., arXiv:1909.06335, 2019)",
    "data: {partition: {kind: dirichlet, alpha: 0.5}}",
    "per-class Dirichlet(alpha) label skew"))
def dirichlet_partition(keys: Sequence[Any], num_clients: int, seed: int, cfg: PartitionConfig
                        ) -> list[list[int]]:
    """Per class, client shares ~ Dir(alpha); redrawn until every client has min_size rows."""
    num_rows = len(keys)
    _check_enough_rows(num_rows, num_clients, cfg.min_size, "dirichlet")
    codes, values = encode_keys(keys)
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(codes == c) for c in range(len(values))]
    for _ in range(DIRICHLET_MAX_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for class_rows in by_class:
            rows = rng.permutation(class_rows)
            shares = rng.dirichlet(np.full(num_clients, cfg.alpha))
            cuts = (np.cumsum(shares)[:-1] * len(rows)).astype(np.int64)
            for client, chunk in enumerate(np.split(rows, cuts)):
                parts[client].append(chunk)
        sizes = [sum(len(chunk) for chunk in chunks) for chunks in parts]
        if min(sizes) >= cfg.min_size:
            return _finish([np.concatenate(chunks) for chunks in parts])
    raise PartitionError(
        f"dirichlet partition: after {DIRICHLET_MAX_TRIES} draws no split gave every one of "
        f"{num_clients} clients at least min_size={cfg.min_size} rows ({num_rows} rows, "
        f"{len(values)} classes, alpha={cfg.alpha}); alpha/min_size/num_clients are infeasible "
        f"together -- raise alpha, lower min_size or use fewer clients"
    )


@PARTITIONERS.register("natural", MethodInfo(
    "adaptability.heterogeneity.partition",
    "LEAF: A Benchmark for Federated Settings (Caldas et al., arXiv:1812.01097, 2018)",
    "data: {partition: {kind: natural, by: category}}",
    "one client per value of a column (author, category, language)"))
def natural_partition(keys: Sequence[Any], num_clients: int, seed: int, cfg: PartitionConfig
                      ) -> list[list[int]]:
    """Client ``i`` holds the rows whose column value is the ``i``-th distinct value (sorted).
    With ``num_clients = m x`` the number of values, each value's rows are dealt at random to
    ``m`` clients (clients ``v*m .. v*m+m-1`` hold value ``v``): several clients per domain."""
    codes, values = encode_keys(keys)
    if len(values) == 0 or num_clients % len(values) != 0:
        shown = ", ".join(repr(v) for v in values[:12]) + (", ..." if len(values) > 12 else "")
        raise PartitionError(
            f"natural partition by {cfg.by!r}: the column has {len(values)} distinct values "
            f"({shown}) but num_clients={num_clients}; set federation.num_clients to "
            f"{len(values)} (one client per value) or a multiple of it"
        )
    per_value = num_clients // len(values)
    rng = np.random.default_rng([seed, 7])
    parts: list[np.ndarray] = []
    for code, value in enumerate(values):
        rows = np.flatnonzero(codes == code)
        if len(rows) < cfg.min_size * per_value:
            raise PartitionError(f"natural partition by {cfg.by!r}: value {value!r} has "
                                 f"{len(rows)} rows, fewer than min_size={cfg.min_size} for "
                                 f"each of its {per_value} clients")
        if per_value == 1:
            parts.append(rows)
            continue
        shuffled = rows[rng.permutation(len(rows))]
        parts.extend(np.sort(chunk) for chunk in np.array_split(shuffled, per_value))
    return _finish(parts)


@PARTITIONERS.register("shards", MethodInfo(
    "adaptability.heterogeneity.partition",
    "Communication-Efficient Learning of Deep Networks from Decentralized Data "
    "(McMahan et al., AISTATS 2017)",
    "data: {partition: {kind: shards, shards_per_client: 2}}",
    "sorted-by-label shards, a few per client (pathological non-IID)"))
def shards_partition(keys: Sequence[Any], num_clients: int, seed: int, cfg: PartitionConfig
                     ) -> list[list[int]]:
    """Sort by the column (ties in seeded random order), cut into equal shards, deal
    ``shards_per_client`` random shards to each client."""
    num_rows = len(keys)
    num_shards = num_clients * cfg.shards_per_client
    if num_rows < num_shards:
        raise PartitionError(f"shards partition: {num_rows} rows cannot make {num_shards} "
                             f"shards ({num_clients} clients x {cfg.shards_per_client})")
    codes, _ = encode_keys(keys)
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(num_rows)
    ordered = shuffled[np.argsort(codes[shuffled], kind="stable")]
    shards = np.array_split(ordered, num_shards)
    dealt = rng.permutation(num_shards).reshape(num_clients, cfg.shards_per_client)
    parts = [np.concatenate([shards[s] for s in row]) for row in dealt]
    smallest = min(len(p) for p in parts)
    if smallest < cfg.min_size:
        raise PartitionError(f"shards partition: clients get {smallest} rows, fewer than "
                             f"min_size={cfg.min_size}")
    return _finish(parts)


@PARTITIONERS.register("quantity", MethodInfo(
    "adaptability.heterogeneity.partition",
    "Federated Learning on Non-IID Data Silos: An Experimental Study (Li et al., ICDE 2022)",
    "data: {partition: {kind: quantity, alpha: 1.5}}", "power-law client sizes"))
def quantity_partition(keys: Sequence[Any], num_clients: int, seed: int, cfg: PartitionConfig
                       ) -> list[list[int]]:
    """Sizes = min_size + the rest split in proportion to Pareto(alpha) draws; rows random."""
    num_rows = len(keys)
    _check_enough_rows(num_rows, num_clients, cfg.min_size, "quantity")
    rng = np.random.default_rng(seed)
    weights = rng.pareto(cfg.alpha, num_clients) + 1.0  # classic Pareto, x_m = 1
    if not np.all(np.isfinite(weights)):  # astronomically heavy tail: cap, keep the order
        finite = weights[np.isfinite(weights)]
        weights = np.nan_to_num(weights, posinf=(finite.max() if finite.size else 1.0) * 1e6)
    sizes = cfg.min_size + _split_sizes(weights, num_rows - num_clients * cfg.min_size)
    order = rng.permutation(num_rows)
    return _finish(np.split(order, np.cumsum(sizes)[:-1]))


@PARTITIONERS.register("label_quantity", MethodInfo(
    "adaptability.heterogeneity.partition",
    "Federated Learning on Non-IID Data Silos: An Experimental Study (Li et al., ICDE 2022)",
    "data: {partition: {kind: label_quantity, classes_per_client: 1}}",
    "each client holds exactly c classes (#C=c label-quantity skew)"))
def label_quantity_partition(keys: Sequence[Any], num_clients: int, seed: int,
                             cfg: PartitionConfig) -> list[list[int]]:
    """Client ``i`` owns classes ``order[(i c + j) mod K]``, ``j < c``; each class's rows are
    split at random, near-equally, over its owners."""
    codes, values = encode_keys(keys)
    num_classes, per_client = len(values), cfg.classes_per_client
    if per_client > num_classes:
        raise PartitionError(f"label_quantity partition: classes_per_client={per_client} but "
                             f"the column has only {num_classes} distinct values")
    if num_clients * per_client < num_classes:
        raise PartitionError(
            f"label_quantity partition: {num_clients} clients x {per_client} classes cannot "
            f"cover all {num_classes} classes (the rows of a class without an owner would be "
            f"dropped); raise classes_per_client or federation.num_clients")
    rng = np.random.default_rng(seed)
    order = rng.permutation(num_classes)
    owners: list[list[int]] = [[] for _ in range(num_classes)]
    for client in range(num_clients):
        for j in range(per_client):
            owners[order[(client * per_client + j) % num_classes]].append(client)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for code, class_owners in enumerate(owners):
        rows = rng.permutation(np.flatnonzero(codes == code))
        for client, chunk in zip(class_owners, np.array_split(rows, len(class_owners)),
                                 strict=True):
            parts[client].append(chunk)
    sizes = [sum(len(chunk) for chunk in chunks) for chunks in parts]
    if min(sizes) < cfg.min_size:
        raise PartitionError(f"label_quantity partition: a client gets {min(sizes)} rows, "
                             f"fewer than min_size={cfg.min_size}")
    return _finish([np.concatenate(chunks) for chunks in parts])


@PARTITIONERS.register("embedding_cluster", MethodInfo(
    "adaptability.heterogeneity.partition",
    "FedNLP: Benchmarking Federated Learning Methods for Natural Language Processing Tasks "
    "(Lin et al., Findings of NAACL 2022)",
    "data: {partition: {kind: embedding_cluster, groups: 10, alpha: 0.5}}",
    "k-means clusters of sentence embeddings (packaged MiniLM) dealt by Dir(alpha)"))
def embedding_cluster_partition(keys: Sequence[Any], num_clients: int, seed: int,
                                cfg: PartitionConfig) -> list[list[int]]:
    """``keys`` are the rows' clusters (``fedfm.data.derived``); dealt as ``dirichlet``."""
    return dirichlet_partition(keys, num_clients, seed, cfg)


@PARTITIONERS.register("length", MethodInfo(
    "adaptability.heterogeneity.partition",
    "Federated Learning on Non-IID Data Silos: An Experimental Study (Li et al., ICDE 2022)",
    "data: {partition: {kind: length, groups: 5, alpha: 0.3}}",
    "quantile bins of text length dealt by Dir(alpha) (short vs long writers)"))
def length_partition(keys: Sequence[Any], num_clients: int, seed: int, cfg: PartitionConfig
                     ) -> list[list[int]]:
    """``keys`` are the rows' length bins (``fedfm.data.derived``); dealt as ``dirichlet``."""
    return dirichlet_partition(keys, num_clients, seed, cfg)


def describe(cfg: PartitionConfig, column: str | None) -> str:
    """A one-line description such as ``dirichlet(alpha=0.5, by=label)``."""
    details: list[str] = []
    if cfg.kind in ("dirichlet", "quantity", "embedding_cluster", "length"):
        details.append(f"alpha={cfg.alpha:g}")
    if cfg.kind in ("embedding_cluster", "length") and cfg.groups is not None:
        details.append(f"groups={cfg.groups}")
    if cfg.kind == "embedding_cluster":
        details.append(f"model={cfg.embedding_model}")
    if cfg.kind == "shards":
        details.append(f"shards_per_client={cfg.shards_per_client}")
    if cfg.kind == "label_quantity":
        details.append(f"classes_per_client={cfg.classes_per_client}")
    if cfg.kind in KEYED_PARTITIONS and column:
        details.append(f"by={column}")
    if cfg.min_size > 1:
        details.append(f"min_size={cfg.min_size}")
    return f"{cfg.kind}({', '.join(details)})" if details else cfg.kind
