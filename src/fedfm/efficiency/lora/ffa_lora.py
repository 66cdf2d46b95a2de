"""FFA-LoRA: freeze A at its shared random initialisation, train and average B only.

Sun, Qin, Zhang, Ding & Zhang, "Improving LoRA in Privacy-preserving Federated Learning",
ICLR 2024. Every client starts from the same ``A`` (the adapter's seeded initialisation) and
never changes it, so the mean of the clients' ``B_i`` gives exactly the mean of their products:
``mean(B_i) A = mean(B_i A)``. Only ``B`` is trainable and communicated (half of LoRA's bytes), and
the update is linear in what is aggregated, which is why the paper pairs it with DP-SGD and
client-level DP (both compose here).
"""

from __future__ import annotations

from fedfm.algorithms.fedavg import DeltaClient, build_delta_server
from fedfm.config import AlgorithmConfig
from fedfm.core.algorithm import Algorithm
from fedfm.core.registries import ALGORITHMS
from fedfm.core.registry import MethodInfo

FROZEN = ".lora_A."  # parameters whose names hold this stay at their initialisation


@ALGORITHMS.register("ffa_lora", MethodInfo(
    "efficiency.communication.lora_aggregation",
    "Improving LoRA in Privacy-preserving Federated Learning (Sun et al., ICLR 2024)",
    "algorithm: {name: ffa_lora}",
    "A frozen at its shared init, only B trained and averaged: exact mean of products"))
def build_ffa_lora(cfg: AlgorithmConfig, num_clients: int) -> Algorithm:
    return Algorithm(name="ffa_lora", client=DeltaClient(cfg.local),
                     server=build_delta_server(cfg),
                     info={"server_optimizer": cfg.server_optimizer.name,
                           "frozen_parameters": FROZEN})
