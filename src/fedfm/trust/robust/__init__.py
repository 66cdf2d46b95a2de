"""Robustness: poisoning attacks (simulated Byzantine clients) and Byzantine-robust aggregation.
Importing this package registers the aggregators and the attacks."""

from fedfm.trust.robust import aggregators, attacks  # noqa: F401
