"""Config-time refusals for the personalization algorithms (called by
``fedfm.api.check_components``)."""

from __future__ import annotations

from fedfm.config import ConfigError, RunConfig

PERSONALIZATION_ALGORITHMS = ("fedper", "fedrep", "ditto", "dual_lora")
# uploads without the local tensors: the server pads them back with zero deltas
PARTIAL_UPLOADS = ("fedper", "fedrep", "dual_lora")
_PARTIAL_REASONS = {
    "algorithm.compression": "the compressed layout follows the global State's shapes",
    "privacy.client_dp": "clipping and noise apply to dense updates of the global State's shape",
    "privacy.secure_aggregation": "masked sums need every client's update in the global "
                                  "State's shape",
    "robustness.attack": "the simulated attackers forge updates in the global State's shape",
}


def _enabled(config: RunConfig) -> dict[str, bool]:
    return {"algorithm.compression": config.algorithm.compression is not None,
            "privacy.client_dp": config.privacy.client_dp is not None,
            "privacy.secure_aggregation": config.privacy.secure_aggregation is not None,
            "robustness.attack": config.robustness.attack is not None}


def check_personalization(config: RunConfig) -> None:
    """Refuse what a personalization algorithm cannot honour, with the reason."""
    name = config.algorithm.name
    if name == "dual_lora" and config.adapter.kind != "lora":
        raise ConfigError(f"invalid config: algorithm 'dual_lora' adds a second LoRA adapter "
                          f"beside the run's; adapter.kind is {config.adapter.kind!r} "
                          f"(use lora)")
    if name in ("fedper", "fedrep") and config.adapter.kind == "head":
        raise ConfigError(f"invalid config: algorithm {name!r} keeps the head on each client "
                          f"and shares the rest; adapter.kind 'head' trains the head alone, "
                          f"so nothing would be shared")
    if name not in PARTIAL_UPLOADS:
        return
    enabled = _enabled(config)
    for option, why in _PARTIAL_REASONS.items():
        if enabled[option]:
            raise ConfigError(f"invalid config: algorithm {name!r} uploads the shared tensors "
                              f"without the local ones, which cannot be combined with "
                              f"{option}: {why}")
