"""Config-time checks of the distillation algorithms (before any model or data is loaded)."""

from __future__ import annotations

from fedfm.config import ConfigError, RunConfig

DISTILLATION_ALGORITHMS = ("feddf", "fedmkt")


def check_distillation(config: RunConfig) -> None:
    name = config.algorithm.name
    distill = config.algorithm.distill
    if name not in DISTILLATION_ALGORITHMS:
        if distill is not None:
            raise ConfigError(f"invalid config: algorithm.distill is read by the distillation "
                              f"algorithms ({', '.join(DISTILLATION_ALGORITHMS)}); algorithm "
                              f"{name!r} would ignore it (remove it or pick one of them)")
        return
    if distill is None:
        raise ConfigError(f"invalid config: algorithm {name!r} needs algorithm.distill with "
                          f"its public data (algorithm.distill.public.path)")
    if name == "fedmkt" and distill.server_model is None:
        raise ConfigError("invalid config: algorithm 'fedmkt' needs "
                          "algorithm.distill.server_model (the large model the server holds)")
    if name == "feddf" and (distill.server_model is not None or distill.server_adapter is not None
                            or distill.server_steps is not None):
        raise ConfigError("invalid config: algorithm.distill.server_model, server_adapter and "
                          "server_steps belong to fedmkt; feddf distils into the global model "
                          "itself")
    task = config.model.task
    if task == "seq2seq" or (task is None and config.model.name == "tiny-t5"):
        raise ConfigError(f"invalid config: algorithm {name!r} distils classification or "
                          f"causal-LM logits; seq2seq models need decoder inputs the public "
                          f"data does not have")
    why = "the server distils from each client's own model, so it must see every update"
    if config.privacy.secure_aggregation is not None:
        raise ConfigError(f"invalid config: algorithm {name!r} cannot be combined with "
                          f"privacy.secure_aggregation: {why}, and secure aggregation reveals "
                          f"only their sum")
    if config.privacy.client_dp is not None:
        raise ConfigError(f"invalid config: algorithm {name!r} cannot be combined with "
                          f"privacy.client_dp: {why}; distilling from the unclipped, unnoised "
                          f"client models would void the guarantee")
