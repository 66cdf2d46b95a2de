"""Split learning: SplitFed (Thapa et al., AAAI 2022) / SplitLoRA (Lin et al., arXiv 2024).
Importing registers the ``splitfed`` algorithm."""

from fedfm.efficiency.split.splitfed import check_split, check_split_deployable

__all__ = ["check_split", "check_split_deployable"]
