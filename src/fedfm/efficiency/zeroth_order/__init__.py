"""Zeroth-order federated tuning: FedKSeed (seed pool, scalar uploads) and FedZO (the dense
baseline). Importing registers them."""

from fedfm.efficiency.zeroth_order import fedkseed, fedzo  # noqa: F401

ZEROTH_ORDER = ("fedkseed", "fedzo")
