"""Trustworthiness: privacy (differential privacy with accounting, secure aggregation, privacy
attacks) and robustness (poisoning attacks, robust aggregation). Importing this package
registers its components."""

from fedfm.trust import attacks, ip, privacy, robust  # noqa: F401
from fedfm.trust.secagg import aggregation  # noqa: F401
