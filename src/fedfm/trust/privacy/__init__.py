"""Privacy mechanisms: client-level DP (DP-FedAvg) with adaptive clipping and a dp-accounting
accountant. Importing this package registers them."""

from fedfm.trust.privacy import mechanisms  # noqa: F401
