"""FedZO: federated zeroth-order SGD, the baseline FedKSeed improves on.

Fang, Yu, Jiang, Shi & Jones, "Communication-Efficient Stochastic Zeroth-Order Optimization for
Federated Learning", IEEE Transactions on Signal Processing, 2022. Each local step averages
``zo.directions`` two-point estimates along fresh Gaussian directions (drawn from the client's
round seed) and moves ``theta <- theta - lr mean_b(g_b z_b)``; the client uploads its dense model
delta, which the server averages as FedAvg does (any FedOpt server optimizer). Same memory as
FedKSeed (forward passes only); the upload is the whole trainable State.
"""

from __future__ import annotations

import torch

from fedfm.algorithms.fedavg import build_delta_server
from fedfm.config import AlgorithmConfig, LocalTrainingConfig, ZerothOrderConfig
from fedfm.core import state as state_ops
from fedfm.core.algorithm import Algorithm, ClientContext, ClientResult
from fedfm.core.registries import ALGORITHMS
from fedfm.core.registry import MethodInfo
from fedfm.core.update import Broadcast, ClientUpdate
from fedfm.efficiency.zeroth_order.common import add_direction, start_run, two_point


class FedZOClient:
    def __init__(self, local: LocalTrainingConfig, zo: ZerothOrderConfig) -> None:
        self.local = local
        self.zo = zo

    def run(self, ctx: ClientContext, broadcast: Broadcast) -> ClientResult:
        run = start_run(ctx, self.local)
        losses = []
        for batch in run.batches:
            estimates = []
            for _ in range(self.zo.directions):
                seed = int(torch.randint(2**62, (1,), generator=run.generator))
                grad, loss = two_point(ctx, run.named, batch, seed, self.zo.eps, run.loss_of)
                estimates.append((seed, grad))
                losses.append(loss)
            for seed, grad in estimates:
                add_direction(run.named, seed, -self.local.lr * grad / self.zo.directions)
        delta = state_ops.sub(ctx.get_state(), broadcast.global_state)
        metrics = {"train_loss": sum(losses) / len(losses), "steps": float(run.steps),
                   "forward_passes": float(2 * len(losses))}
        return ClientResult(ClientUpdate(ctx.client_id, delta, len(ctx.train_examples),
                                         metrics))


@ALGORITHMS.register("fedzo", MethodInfo(
    "efficiency.zeroth_order",
    "Communication-Efficient Stochastic Zeroth-Order Optimization for Federated Learning "
    "(Fang et al., IEEE TSP 2022)",
    "algorithm: {name: fedzo, zo: {directions: 4}, local: {optimizer: sgd, lr: 1.0e-5, "
    "steps: 50}}",
    "zeroth-order SGD on clients (averaged two-point estimates), dense deltas averaged"))
def build_fedzo(cfg: AlgorithmConfig, num_clients: int) -> Algorithm:
    return Algorithm(name="fedzo", client=FedZOClient(cfg.local, cfg.zo),
                     server=build_delta_server(cfg),
                     info={"directions": cfg.zo.directions, "eps": cfg.zo.eps})
