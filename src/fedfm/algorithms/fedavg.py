"""FedAvg and the FedOpt family.

Clients train locally from the global State and send ``local - global``; the server averages the
deltas (example-weighted by default) and applies a server optimizer to the average.
With the ``sgd`` server optimizer at lr 1 this is FedAvg (McMahan et al., "Communication-
Efficient Learning of Deep Networks from Decentralized Data", AISTATS 2017); with ``adam``,
``yogi``, ``adagrad`` or ``avgm`` it is FedAdam / FedYogi / FedAdagrad (Reddi et al., "Adaptive
Federated Optimization", ICLR 2021) or FedAvgM (Hsu et al., arXiv:1909.06335, 2019).
The average is example-weighted by default, as in FedAvg; ``algorithm.weighting: uniform``
gives the unweighted mean over participating clients that Reddi et al. and SCAFFOLD write.
"""

from __future__ import annotations

from collections.abc import Mapping

from fedfm.algorithms.aggregation import Aggregator, WeightedMean
from fedfm.algorithms.local_train import GradHook, LocalTrainingResult, train_locally
from fedfm.algorithms.server_opt import ServerOptimizer, build_server_optimizer
from fedfm.config import AlgorithmConfig, LocalTrainingConfig
from fedfm.core import state as state_ops
from fedfm.core.algorithm import Algorithm, ClientContext, ClientResult
from fedfm.core.registries import AGGREGATORS, ALGORITHMS
from fedfm.core.registry import MethodInfo
from fedfm.core.state import State
from fedfm.core.update import Broadcast, ClientUpdate


class DeltaClient:
    """Train locally, send ``local - global``. Subclasses add a gradient hook (``grad_hook``)
    and may build a different result from the trained State (``finish``); the ``batched``
    runtime calls these two halves around its own lockstep training of many clients."""

    def __init__(self, local: LocalTrainingConfig) -> None:
        self.local = local

    def grad_hook(self, ctx: ClientContext, broadcast: Broadcast) -> GradHook | None:
        return None

    def train(self, ctx: ClientContext, broadcast: Broadcast) -> LocalTrainingResult:
        return train_locally(ctx, self.local, grad_hook=self.grad_hook(ctx, broadcast))

    def run(self, ctx: ClientContext, broadcast: Broadcast) -> ClientResult:
        return self.finish(ctx, broadcast, self.train(ctx, broadcast))

    def finish(self, ctx: ClientContext, broadcast: Broadcast,
               result: LocalTrainingResult) -> ClientResult:
        delta = state_ops.sub(ctx.get_state(), broadcast.global_state)
        update = ClientUpdate(client_id=ctx.client_id, payload=delta,
                              num_examples=len(ctx.train_examples), metrics=result.metrics())
        return ClientResult(update=update)


class DeltaServer:
    """Aggregate the deltas, then let the server optimizer take a step with the result."""

    def __init__(self, aggregator: Aggregator, optimizer: ServerOptimizer) -> None:
        self.aggregator = aggregator
        self.optimizer = optimizer

    def broadcast_extras(self, global_state: State) -> dict[str, State]:
        return {}

    def aggregate(self, global_state: State, updates: list[ClientUpdate], round: int) -> State:
        robust = getattr(self.aggregator, "aggregate_robust", None)  # sees the global State
        by_round = getattr(self.aggregator, "aggregate_round", None)  # e.g. secure aggregation
        if robust is not None:
            pseudo_gradient = robust(global_state, updates, round)
        elif by_round is not None:
            pseudo_gradient = by_round(updates, round)
        else:
            pseudo_gradient = self.aggregator.aggregate(updates)
        return self.optimizer.step(global_state, pseudo_gradient)

    def round_metrics(self) -> dict:
        found = getattr(self.aggregator, "round_metrics", None)
        return found() if found is not None else {}

    def state_dict(self) -> dict[str, State]:
        states = {f"optimizer.{k}": v for k, v in self.optimizer.state_dict().items()}
        own = getattr(self.aggregator, "state_dict", None)  # e.g. centered clipping's center
        if own is not None:
            states.update({f"aggregator.{k}": v for k, v in own().items()})
        return states

    def load_state_dict(self, states: Mapping[str, State]) -> None:
        self.optimizer.load_state_dict(with_prefix(states, "optimizer."))
        own = getattr(self.aggregator, "load_state_dict", None)
        if own is not None:
            own(with_prefix(states, "aggregator."))


def with_prefix(states: Mapping[str, State], prefix: str) -> dict[str, State]:
    return {k[len(prefix):]: v for k, v in states.items() if k.startswith(prefix)}


def build_delta_server(cfg: AlgorithmConfig) -> DeltaServer:
    aggregator = AGGREGATORS.get(cfg.aggregator)
    if aggregator is WeightedMean:
        return DeltaServer(WeightedMean(cfg.weighting),
                           build_server_optimizer(cfg.server_optimizer))
    return DeltaServer(aggregator(cfg), build_server_optimizer(cfg.server_optimizer))


@ALGORITHMS.register("fedavg", MethodInfo(
    "efficiency.systems.optimization",
    "Communication-Efficient Learning of Deep Networks from Decentralized Data "
    "(McMahan et al., AISTATS 2017)",
    "algorithm: {name: fedavg, local: {steps: 10, lr: 1.0e-3}}",
    "local steps on each client, example-weighted mean of the updates"))
def build_fedavg(cfg: AlgorithmConfig, num_clients: int) -> Algorithm:
    return Algorithm(name="fedavg", client=DeltaClient(cfg.local), server=build_delta_server(cfg),
                     info={"server_optimizer": cfg.server_optimizer.name})
