"""FedNova: normalized averaging for clients that run different numbers of local steps.

Wang, Liu, Liang, Joshi & Poor, "Tackling the Objective Inconsistency Problem in Heterogeneous
Federated Optimization", NeurIPS 2020. When client ``i`` takes ``tau_i`` local steps (e.g.
``algorithm.local.epochs`` over shards of different sizes), plain averaging of the updates
``Delta_i`` optimizes a objective skewed toward the clients that stepped most. FedNova
averages the normalized updates and rescales by an effective step count:

    Delta = tau_eff * sum_i p_i Delta_i / ||a_i||_1,     tau_eff = sum_i p_i ||a_i||_1

with ``p_i`` the aggregation weights (example counts, or uniform) and ``a_i`` the weights the
local optimizer puts on each gradient. For SGD with momentum ``rho`` and per-step learning
rates ``eta_t`` (warm-up and decay included), gradient ``k`` moves the model by
``sum_{t>=k} eta_t rho^(t-k)``, so ``||a_i||_1`` is that sum over ``k`` divided by the base
rate (``tau_i`` for plain SGD at a constant rate, the paper's vanilla case). AdamW has no such
closed form; its ``||a_i||_1`` is taken as the (learning-rate weighted) step count, as for
plain SGD. The server computes ``a_i`` from the configured optimizer and the step count each
update reports (``metrics["steps"]``), checks that count, then hands the rescaled updates to
the algorithm's own aggregation (any aggregator, any server optimizer, SCAFFOLD's model step).
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict

from fedfm.adaptability.heterogeneity.base import LossOnly
from fedfm.algorithms.local_train import lr_factor
from fedfm.config import ConfigError, LocalTrainingConfig, RunConfig, SkewConfig
from fedfm.core.algorithm import Algorithm, ServerWrapper
from fedfm.core.registries import SKEW
from fedfm.core.registry import MethodInfo
from fedfm.core.state import State
from fedfm.core.update import ClientUpdate

MAX_STEPS = 10_000_000  # a reported step count beyond this is not believed
# algorithms whose server takes one weighted mean of all the round's gradient-step updates
NOVA_COMPATIBLE = ("fedavg", "fedit", "fedprox", "scaffold", "fedper", "fedrep", "ditto",
                   "dual_lora", "fedsa_lora", "ffa_lora")


def gradient_weight_norm(steps: int, local: LocalTrainingConfig) -> float:
    """``||a||_1`` of ``steps`` local optimizer steps under ``local``'s rate schedule."""
    rates = [lr_factor(step, steps, local) for step in range(steps)]
    rho = local.momentum if local.optimizer == "sgd" else 0.0
    if rho == 0.0:
        return sum(rates)
    total, carried = 0.0, 0.0
    # gradient k's weight is sum_{t>=k} eta_t rho^(t-k): accumulate from the last step back
    for rate in reversed(rates):
        carried = rate + rho * carried
        total += carried
    return total


def reported_steps(update: ClientUpdate) -> int:
    """The update's local step count, checked (a client's word is all the server has)."""
    steps = update.metrics.get("steps")
    if not isinstance(steps, (int, float)) or not math.isfinite(steps) or steps < 1 \
            or steps > MAX_STEPS or steps != int(steps):
        raise ValueError(f"client {update.client_id}: FedNova needs metrics['steps'], a whole "
                         f"number of local steps in [1, {MAX_STEPS}]; got {steps!r}")
    return int(steps)


def nova_scales(updates: list[ClientUpdate], local: LocalTrainingConfig,
                weighting: str) -> list[float]:
    """Each update's factor ``tau_eff / ||a_i||_1``."""
    norms = [gradient_weight_norm(reported_steps(u), local) for u in updates]
    weights = ([float(u.num_examples) for u in updates] if weighting == "examples"
               else [1.0] * len(updates))
    total = sum(weights)
    tau_eff = sum(w / total * a for w, a in zip(weights, norms, strict=True))
    return [tau_eff / a for a in norms]


def scaled(update: ClientUpdate, factor: float) -> ClientUpdate:
    payload = OrderedDict((k, v * factor) for k, v in update.payload.items())
    return dataclasses.replace(update, payload=payload)


class NovaServer(ServerWrapper):
    def __init__(self, inner: object, local: LocalTrainingConfig, weighting: str) -> None:
        super().__init__(inner)  # type: ignore[arg-type]
        self.local = local
        self.weighting = weighting

    def check_update(self, update: ClientUpdate, global_state: State) -> None:
        reported_steps(update)
        check = getattr(self.inner, "check_update", None)
        if check is not None:
            check(update, global_state)

    def aggregate(self, global_state: State, updates: list[ClientUpdate], round: int) -> State:
        if not updates:
            return self.inner.aggregate(global_state, updates, round)
        factors = nova_scales(updates, self.local, self.weighting)
        normalized = [scaled(u, f) for u, f in zip(updates, factors, strict=True)]
        return self.inner.aggregate(global_state, normalized, round)


@SKEW.register("fednova", MethodInfo(
    "adaptability.heterogeneity",
    "Tackling the Objective Inconsistency Problem in Heterogeneous Federated Optimization "
    "(Wang et al., NeurIPS 2020)",
    "algorithm: {local: {epochs: 1}, skew: [{name: fednova}]}",
    "updates normalized by each client's local steps, rescaled by the effective step count"))
class FedNova(LossOnly):
    name = "fednova"

    def __init__(self, cfg: SkewConfig, config: RunConfig) -> None:
        self.local = config.algorithm.local
        self.weighting = config.algorithm.weighting

    @staticmethod
    def check(cfg: SkewConfig, config: RunConfig) -> None:
        blocked = {"privacy.client_dp": config.privacy.client_dp is not None,
                   "privacy.secure_aggregation": config.privacy.secure_aggregation is not None}
        for option, enabled in blocked.items():
            if enabled:
                raise ConfigError(f"invalid config: algorithm.skew 'fednova' rescales each "
                                  f"client's update by its step count, which {option} cannot "
                                  f"allow (it bounds or hides each update as sent)")
        if config.algorithm.name not in NOVA_COMPATIBLE:
            raise ConfigError(f"invalid config: algorithm.skew 'fednova' rescales the updates "
                              f"of one weighted mean of local gradient steps; algorithm "
                              f"{config.algorithm.name!r} aggregates another way (use one of "
                              f"{', '.join(NOVA_COMPATIBLE)})")

    def apply(self, algorithm: Algorithm) -> Algorithm:
        server = NovaServer(algorithm.server, self.local, self.weighting)
        return dataclasses.replace(algorithm, server=server)
