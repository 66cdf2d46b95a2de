"""Trustworthiness: privacy (differential privacy, accounting) and, later, robustness and IP."""
