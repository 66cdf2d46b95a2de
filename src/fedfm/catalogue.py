"""The methods catalogue: the survey's taxonomy with every method fedfm implements, built from
the registries (``fedfm methods``), so it cannot drift from the code.

The taxonomy is that of *Synergizing Foundation Models and Federated Learning: A Survey* (Li et
al., arXiv:2406.12844, 2024): efficiency, adaptability and trustworthiness down to their leaves.
Each registered component carries a ``MethodInfo`` (leaf, paper, config snippet); a leaf with no
component yet is listed as such, so the catalogue also shows what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedfm.core.registry import MethodInfo, Registry

SURVEY = ("Synergizing Foundation Models and Federated Learning: A Survey "
          "(Li et al., arXiv:2406.12844, 2024)")

# (leaf id, path of titles from the branch down to the leaf)
TAXONOMY: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("efficiency.peft.selective", ("Efficiency", "Parameter-efficient fine-tuning",
                                   "Selective tuning")),
    ("efficiency.peft.additive.adapter", ("Efficiency", "Parameter-efficient fine-tuning",
                                          "Additive tuning", "Adapter tuning")),
    ("efficiency.peft.additive.prompt", ("Efficiency", "Parameter-efficient fine-tuning",
                                         "Additive tuning", "Prompt tuning")),
    ("efficiency.peft.reparameterization", ("Efficiency", "Parameter-efficient fine-tuning",
                                            "Reparameterization-based tuning (LoRA)")),
    ("efficiency.peft.full", ("Efficiency", "Parameter-efficient fine-tuning",
                              "Full fine-tuning (baseline)")),
    ("efficiency.communication.compression", ("Efficiency", "Communication efficiency",
                                              "Update compression (quantization, "
                                              "sparsification)")),
    ("efficiency.communication.lora_aggregation", ("Efficiency", "Communication efficiency",
                                                   "LoRA-aware aggregation and heterogeneous "
                                                   "ranks")),
    ("efficiency.zeroth_order", ("Efficiency", "Zeroth-order optimization")),
    ("efficiency.distillation", ("Efficiency", "Model efficiency", "Knowledge distillation")),
    ("efficiency.split_learning", ("Efficiency", "Model efficiency", "Split learning")),
    ("efficiency.systems.runtime", ("Efficiency", "Systems", "Simulation and execution "
                                                             "runtimes")),
    ("efficiency.systems.optimization", ("Efficiency", "Systems",
                                         "Federated optimization (server rules)")),
    ("adaptability.heterogeneity", ("Adaptability", "Data heterogeneity (non-IID)")),
    ("adaptability.heterogeneity.partition", ("Adaptability", "Data heterogeneity (non-IID)",
                                              "Non-IID partitions for simulation")),
    ("adaptability.personalization", ("Adaptability", "Client-centric", "Personalization")),
    ("adaptability.clustering", ("Adaptability", "Client-centric", "Clustering")),
    ("adaptability.multi_domain", ("Adaptability", "Domain-centric",
                                   "Multi-domain adaptation")),
    ("adaptability.alignment", ("Adaptability", "Preference alignment")),
    ("trust.privacy.dp", ("Trustworthiness", "Privacy", "Differential privacy")),
    ("trust.privacy.secure_aggregation", ("Trustworthiness", "Privacy", "Secure aggregation")),
    ("trust.privacy.attacks", ("Trustworthiness", "Privacy", "Privacy attacks")),
    ("trust.robustness.attacks", ("Trustworthiness", "Robustness", "Poisoning attacks")),
    ("trust.robustness.aggregation", ("Trustworthiness", "Robustness", "Robust aggregation")),
    ("trust.ip.offsite", ("Trustworthiness", "IP protection", "Offsite tuning")),
    ("trust.ip.black_box", ("Trustworthiness", "IP protection", "Black-box tuning")),
)
LEAVES: dict[str, tuple[str, ...]] = dict(TAXONOMY)


@dataclass(frozen=True)
class CatalogueEntry:
    registry: str  # the registry's kind: algorithm, adapter, aggregator, ...
    name: str
    info: MethodInfo


def registries() -> list[Registry[Any]]:
    """Every registry whose components the catalogue lists (filled by importing fedfm)."""
    import fedfm.adaptability  # noqa: F401  (registers personalization, clustering, ...)
    import fedfm.algorithms  # noqa: F401  (registers algorithms, server optimizers, ...)
    import fedfm.efficiency  # noqa: F401  (registers compressors)
    import fedfm.models  # noqa: F401  (registers adapters)
    import fedfm.runtime  # noqa: F401  (registers runtimes)
    import fedfm.trust  # noqa: F401  (registers privacy mechanisms, secure aggregation)
    from fedfm.core.registries import (
        ADAPTERS,
        AGGREGATORS,
        ALGORITHMS,
        ATTACKS,
        COMPRESSORS,
        POISONING,
        PRIVACY,
        RUNTIMES,
        SERVER_OPTIMIZERS,
        SKEW,
    )
    from fedfm.data.partition import PARTITIONERS

    return [ADAPTERS, ALGORITHMS, SERVER_OPTIMIZERS, AGGREGATORS, COMPRESSORS, PARTITIONERS,
            SKEW, PRIVACY, ATTACKS, POISONING, RUNTIMES]


class CatalogueError(RuntimeError):
    """A registered component lacks catalogue information or names an unknown leaf."""


def entries() -> list[CatalogueEntry]:
    found: list[CatalogueEntry] = []
    for registry in registries():
        for name in registry.names():
            info = registry.info(name)
            if info is None:
                raise CatalogueError(f"{registry.kind} {name!r} is registered without a "
                                     f"MethodInfo (taxonomy leaf, paper, config snippet)")
            if info.taxonomy not in LEAVES:
                raise CatalogueError(f"{registry.kind} {name!r}: unknown taxonomy leaf "
                                     f"{info.taxonomy!r}")
            found.append(CatalogueEntry(registry.kind, name, info))
    return found


def catalogue() -> dict[str, Any]:
    """The taxonomy as JSON-ready data: every leaf with its implemented methods."""
    by_leaf: dict[str, list[CatalogueEntry]] = {leaf: [] for leaf in LEAVES}
    for entry in entries():
        by_leaf[entry.info.taxonomy].append(entry)
    from fedfm.models import preset_names

    return {
        "survey": SURVEY,
        "model_presets": preset_names(),
        "leaves": [
            {"id": leaf, "path": list(path),
             "methods": [{"name": e.name, "registry": e.registry, "paper": e.info.paper,
                          "config": e.info.config, "summary": e.info.summary}
                         for e in by_leaf[leaf]]}
            for leaf, path in TAXONOMY
        ],
    }
