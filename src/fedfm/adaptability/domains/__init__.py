"""Adaptability, domain-centric: a shared LoRA adapter plus one adapter per domain
(``domain_lora``), or a learned router over the domain adapters (``domains.router``).
Importing this package registers the algorithm."""

from fedfm.adaptability.domains import domain_lora  # noqa: F401
from fedfm.adaptability.domains.domain_lora import check_domains

__all__ = ["check_domains"]
