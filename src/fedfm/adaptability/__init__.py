"""Adaptability: one global model rarely suits every client. Personalization (local fine-tuning,
personal heads, Ditto, personal + global LoRA), clustering (IFCA, CFL), multi-domain adapters
and preference alignment (federated DPO). Importing this package registers its algorithms."""

from fedfm.adaptability import clustering, domains, personalization, preference  # noqa: F401
