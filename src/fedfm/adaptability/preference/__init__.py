"""Preference alignment: federated DPO (``fed_dpo``) on prompt / chosen / rejected pairs, with the
base model (adapter disabled) as the frozen reference. Importing this package registers the
algorithm and the evaluator's preference scorer."""

from fedfm.adaptability.preference import dpo  # noqa: F401
from fedfm.adaptability.preference.dpo import check_dpo, collate_pairs

__all__ = ["check_dpo", "collate_pairs"]
