"""FedProx: local objective plus a proximal term ``mu/2 ||w - w_global||^2``.

Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020. The proximal
gradient ``mu (w - w_global)`` is added to the accumulated gradient before clipping and the
optimizer step -- the same as differentiating the augmented loss, without growing the graph.
The server half is FedAvg's (any server optimizer).
"""

from __future__ import annotations

import torch

from fedfm.algorithms.fedavg import DeltaClient, build_delta_server
from fedfm.algorithms.local_train import GradHook, NamedParams, ensure_grads
from fedfm.config import AlgorithmConfig, LocalTrainingConfig
from fedfm.core.algorithm import Algorithm, ClientContext
from fedfm.core.registries import ALGORITHMS
from fedfm.core.registry import MethodInfo
from fedfm.core.update import Broadcast


class ProximalClient(DeltaClient):
    def __init__(self, local: LocalTrainingConfig, mu: float) -> None:
        super().__init__(local)
        self.mu = mu

    def grad_hook(self, ctx: ClientContext, broadcast: Broadcast) -> GradHook | None:
        anchor = {k: v.to(ctx.device) for k, v in broadcast.global_state.items()}
        mu = self.mu

        def add_proximal_gradient(named: NamedParams) -> None:
            ensure_grads(named)
            with torch.no_grad():
                for name, param in named:
                    param.grad.add_(param.detach() - anchor[name], alpha=mu)

        return add_proximal_gradient


@ALGORITHMS.register("fedprox", MethodInfo(
    "adaptability.heterogeneity",
    "Federated Optimization in Heterogeneous Networks (Li et al., MLSys 2020)",
    "algorithm: {name: fedprox, mu: 0.01}",
    "proximal term mu/2 ||w - w_global||^2 against client drift"))
def build_fedprox(cfg: AlgorithmConfig, num_clients: int) -> Algorithm:
    return Algorithm(name="fedprox", client=ProximalClient(cfg.local, cfg.mu),
                     server=build_delta_server(cfg), info={"mu": cfg.mu})
