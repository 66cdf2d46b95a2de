"""Cluster purity against a known grouping.

Purity (Manning, Raghavan & Schütze, *Introduction to Information Retrieval*, 2008, §16.3):
each cluster is credited with its most common group, and purity is the share of clients so
credited, ``(1/N) sum_clusters max_group |cluster ∩ group|``. It is 1.0 exactly when no
cluster mixes groups (a group split over several clusters still scores 1.0), and it is at
least the largest group's share when everybody sits in one cluster.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping


def purity(assignment: Mapping[int, int], groups: Mapping[int, str | None]) -> float | None:
    """Purity of ``assignment`` (client id -> cluster) against ``groups`` (client id -> known
    group). Only clients that are assigned and have a group count (``N``); None when there is
    none such."""
    members: dict[int, Counter[str]] = defaultdict(Counter)
    total = 0
    for client, cluster in assignment.items():
        group = groups.get(client)
        if group is None:
            continue
        members[cluster][group] += 1
        total += 1
    if total == 0:
        return None
    return sum(max(counts.values()) for counts in members.values()) / total
