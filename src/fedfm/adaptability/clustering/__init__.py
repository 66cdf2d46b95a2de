"""Adaptability: clustered federated learning. IFCA (``ifca``: k cluster models, each client
takes the one with its lowest training loss) and CFL (``cfl``: recursive bipartitioning by the
cosine similarity of client updates), with cluster assignments and their purity against a known
grouping (``data.group_by``) in the round metrics."""

from fedfm.adaptability.clustering import cfl, ifca  # noqa: F401  (registers the algorithms)
from fedfm.adaptability.clustering.purity import purity

__all__ = ["purity"]
