"""FlexLoRA: average the clients' full LoRA products, redistribute by truncated SVD.

Bai, Chen, Ma, Ji, Li & Ding, "Federated Fine-tuning of Large Language Models under
Heterogeneous Tasks and Client Resources", NeurIPS 2024. Client ``i`` of rank ``r_i`` trains the
leading ``r_i`` components of the global LoRA; the server forms ``W = sum_i p_i B_i A_i``
(``p_i`` by examples), takes its SVD ``U S V^T`` and keeps the leading ``r`` components as the
new global factors ``B = U_r S_r^(1/2)``, ``A = S_r^(1/2) V_r^T``; the next round's client of rank
``r_i`` starts from the leading ``r_i`` of them, its best rank-``r_i`` approximation of ``W``.
``W`` is never formed: its SVD comes from the stacked factors (``lowrank_svd``), so a round costs
``O((sum r_i)^2 (m + n))`` per layer. When ``sum r_i <= r``, ``B A = W`` exactly; otherwise
``lora.energy_kept`` reports the share of ``||W||_F^2`` the truncation keeps.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from fedfm.algorithms.server_opt import build_server_optimizer
from fedfm.config import AlgorithmConfig
from fedfm.core.algorithm import Algorithm
from fedfm.core.registries import ALGORITHMS
from fedfm.core.registry import MethodInfo
from fedfm.core.state import State
from fedfm.core.update import ClientUpdate
from fedfm.efficiency.lora.common import global_rank, lowrank_svd
from fedfm.efficiency.lora.ranked import (
    RankedClient,
    RankedServer,
    ranks_of,
    stack_factors,
    weighted_sum,
)


def svd_factors(left: torch.Tensor, right: torch.Tensor, rank: int
                ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B, A) of rank ``rank`` (zero-padded when ``left @ right`` has fewer components) and
    the share of its squared Frobenius norm they keep."""
    u, singular, vh = lowrank_svd(left, right)
    kept = min(rank, singular.numel())
    root = singular[:kept].sqrt()
    b = torch.zeros(left.shape[0], rank, dtype=torch.float64)
    a = torch.zeros(rank, right.shape[1], dtype=torch.float64)
    b[:, :kept] = u[:, :kept] * root
    a[:kept] = root[:, None] * vh[:kept]
    total = float(singular.pow(2).sum())
    return b, a, float(singular[:kept].pow(2).sum()) / total if total > 0 else 1.0


class FlexLoRAServer(RankedServer):
    method = "flexlora"

    def combine(self, global_state: State, factors: list[State], updates: list[ClientUpdate],
                pairs: list[tuple[str, str]]) -> State:
        weights = self.weights(updates)
        ranks = ranks_of(updates)
        lora_keys = {k for pair in pairs for k in pair}
        target = weighted_sum(factors, weights, [k for k in global_state if k not in lora_keys])
        energies = []
        for key_a, key_b in pairs:
            left, right = stack_factors(factors, weights, ranks, key_a, key_b)
            b, a, energy = svd_factors(left, right, global_rank(global_state, pairs))
            target[key_a] = a.to(global_state[key_a].dtype)
            target[key_b] = b.to(global_state[key_b].dtype)
            energies.append(energy)
        self._last = {"energy_kept": min(energies), "mean_client_rank": sum(ranks) / len(ranks)}
        return OrderedDict((k, target[k]) for k in global_state)


@ALGORITHMS.register("flexlora", MethodInfo(
    "efficiency.communication.lora_aggregation",
    "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client "
    "Resources (Bai et al., NeurIPS 2024)",
    "algorithm: {name: flexlora, lora: {tiers: [{rank: 4, fraction: 0.5}, "
    "{rank: 8, fraction: 0.5}]}}",
    "mean of the clients' B A, redistributed by truncated SVD to each client's rank"))
def build_flexlora(cfg: AlgorithmConfig, num_clients: int) -> Algorithm:
    from fedfm.algorithms.fedavg import DeltaClient

    return Algorithm(name="flexlora",
                     client=RankedClient(DeltaClient(cfg.local), cfg.lora, num_clients,
                                         "flexlora"),
                     server=FlexLoRAServer(build_server_optimizer(cfg.server_optimizer),
                                           cfg.weighting),
                     info={"lora_ranks": cfg.lora.model_dump(mode="json")})
