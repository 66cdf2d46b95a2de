"""Adaptability: one global model rarely suits every client. Personalization (local fine-tuning,
personal heads, Ditto, personal + global LoRA), clustering (IFCA, CFL), multi-domain adapters,
preference alignment (federated DPO) and the methods against data skew (FedLC, FedRS, MOON,
FedBABU, FedNova). Importing this package registers its algorithms."""

from fedfm.adaptability import (  # noqa: F401
    clustering,
    domains,
    heterogeneity,
    personalization,
    preference,
)
