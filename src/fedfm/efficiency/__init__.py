"""Efficiency methods beyond plain PEFT: update compression (quantization, sparsification,
error feedback). Importing this package registers its components."""

from fedfm.efficiency import compression, distillation, lora, split, zeroth_order  # noqa: F401
