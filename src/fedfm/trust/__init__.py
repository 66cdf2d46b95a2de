"""Trustworthiness: privacy (differential privacy with accounting, secure aggregation) and,
later, robustness and IP protection. Importing this package registers its components."""

from fedfm.trust import attacks, privacy  # noqa: F401
from fedfm.trust.secagg import aggregation  # noqa: F401
