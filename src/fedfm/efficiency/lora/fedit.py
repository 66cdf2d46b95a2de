"""FedIT: FedAvg of the LoRA factors, with the error of averaging factors measured.

Zhang, Vahidian, Kuo, Li, Ruan, Han, Lv, Li & Chen, "Towards Building the Federated GPT:
Federated Instruction Tuning", ICASSP 2024. Clients train LoRA; the server averages ``A`` and ``B``
separately (FedAvg on the factors). The model then changes by ``mean(B_i) mean(A_i)``, not by the
mean of what the clients learned, ``mean(B_i A_i)``: each round reports the relative gap
``lora.product_error = ||mean(B_i A_i) - mean(B_i) mean(A_i)||_F / ||mean(B_i A_i)||_F`` over all
layers (computed from the factors, never forming the products), so the baseline's error is
measured rather than hidden. FLoRA, FlexLoRA and FFA-LoRA remove it.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fedfm.algorithms.fedavg import DeltaClient, DeltaServer, build_delta_server
from fedfm.config import AlgorithmConfig
from fedfm.core.algorithm import Algorithm
from fedfm.core.registries import ALGORITHMS
from fedfm.core.registry import MethodInfo
from fedfm.core.state import State
from fedfm.core.update import ClientUpdate
from fedfm.efficiency.lora.common import require_lora, stacked_product_norm


def factor_average_error(global_state: State, updates: list[ClientUpdate],
                         weights: list[float]) -> tuple[float, float]:
    """(``||sum p_i B_i A_i - B_bar A_bar||_F``, ``||sum p_i B_i A_i||_F``) over all LoRA
    layers, with ``A_i = A + dA_i`` the clients' trained factors."""
    pairs = require_lora(global_state, "fedit")
    gap_squared = norm_squared = 0.0
    for key_a, key_b in pairs:
        a_i = [global_state[key_a].double() + u.payload[key_a].double() for u in updates]
        b_i = [global_state[key_b].double() + u.payload[key_b].double() for u in updates]
        mean_a = sum(w * a for w, a in zip(weights, a_i, strict=True))
        mean_b = sum(w * b for w, b in zip(weights, b_i, strict=True))
        products = [(w * b, a) for w, a, b in zip(weights, a_i, b_i, strict=True)]
        norm_squared += stacked_product_norm(products) ** 2
        gap_squared += stacked_product_norm([*products, (-torch.as_tensor(mean_b),
                                                         torch.as_tensor(mean_a))]) ** 2
    return math.sqrt(gap_squared), math.sqrt(norm_squared)


class FedITServer(DeltaServer):
    def __init__(self, inner: DeltaServer, weighting: str) -> None:
        super().__init__(inner.aggregator, inner.optimizer)
        self.weighting = weighting
        self._last: dict[str, float] = {}

    def aggregate(self, global_state: State, updates: list[ClientUpdate], round: int) -> State:
        raw = [float(u.num_examples) if self.weighting == "examples" else 1.0 for u in updates]
        weights = [w / sum(raw) for w in raw]
        gap, norm = factor_average_error(global_state, list(updates), weights)
        self._last = {"product_error": gap / norm if norm > 0 else 0.0,
                      "product_gap_norm": gap}
        return super().aggregate(global_state, updates, round)

    def round_metrics(self) -> dict[str, Any]:
        return {**super().round_metrics(), "lora": dict(self._last)}


@ALGORITHMS.register("fedit", MethodInfo(
    "efficiency.communication.lora_aggregation",
    "Towards Building the Federated GPT: Federated Instruction Tuning (Zhang et al., "
    "ICASSP 2024)",
    "algorithm: {name: fedit}",
    "FedAvg of A and B separately; reports ||mean(B A) - mean(B) mean(A)|| each round"))
def build_fedit(cfg: AlgorithmConfig, num_clients: int) -> Algorithm:
    return Algorithm(name="fedit", client=DeltaClient(cfg.local),
                     server=FedITServer(build_delta_server(cfg), cfg.weighting),
                     info={"server_optimizer": cfg.server_optimizer.name})


