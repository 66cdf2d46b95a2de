"""IFCA: the Iterative Federated Clustering Algorithm.

Ghosh, Chung, Yin & Ramchandran, "An Efficient Framework for Clustered Federated Learning",
NeurIPS 2020. The server keeps ``k`` cluster models (``algorithm.cluster.k``) and sends all of
them; each client scores every cluster model by its loss on its own training data (up to 64
rows, a seeded sample; eval mode), takes the argmin (ties: the lowest index), trains that model
as a FedAvg client and uploads the delta with the chosen cluster in its metadata. The server
averages each cluster's deltas (the paper's model-averaging variant, through the FedAvg server:
aggregator and server optimizer, one per cluster) and leaves a cluster nobody chose unchanged.

Initialisation. IFCA needs cluster models that differ; fedfm starts from one pretrained model,
so cluster ``2p`` and ``2p+1`` are the initial global State plus and minus ``0.1 x RMS`` times a
standard Gaussian direction ``d_p`` (one independent direction per pair, drawn from a generator
seeded by (run seed, p): the same on every run and resume). Antithetic pairs put the start
exactly in the middle of each pair, and to first order a client prefers ``+d_p`` or ``-d_p`` by
the sign of its loss gradient along ``d_p``, so clients whose gradients disagree (different
latent tasks) tend to pick different members of a pair from the first round on.

The global State is the membership-weighted mean of the cluster models (see
``fedfm.adaptability.clustering.common``). Each client's own model, for the personalized
evaluation, is the cluster model with the lowest loss on its training data, chosen as in
training among the current cluster models when the runtime hands ``personal_state`` the
client's context, else its latest choice in training.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch

from fedfm.adaptability.clustering.common import (
    SELECTION_ROWS,
    ClusterServer,
    cluster_models,
    metadata_cluster,
    recorded,
    train_cluster,
    training_loss,
)
from fedfm.algorithms.fedavg import DeltaClient, build_delta_server
from fedfm.config import AlgorithmConfig
from fedfm.core import state as state_ops
from fedfm.core.algorithm import Algorithm, ClientContext, ClientResult, ClientState
from fedfm.core.loop import derive_seed
from fedfm.core.registries import ALGORITHMS
from fedfm.core.registry import MethodInfo
from fedfm.core.state import State
from fedfm.core.update import Broadcast, ClientUpdate

INIT_SCALE = 0.1  # perturbation size, relative to the RMS of the initial global State
_INIT_STREAM = 21  # keeps the initial directions apart from every other seeded stream
_SELECTION_STREAM = 22


def perturbed_clusters(global_state: State, k: int, seed: int,
                       scale: float = INIT_SCALE) -> list[State]:
    """``k`` cluster models around ``global_state``: pairs ``global +- scale * rms * d_p``
    (``k = 1``: the global State itself)."""
    if k == 1:
        return [state_ops.clone(global_state)]
    values = [v.double() for v in global_state.values() if v.is_floating_point()]
    count = sum(v.numel() for v in values)
    rms = (sum(float(v.pow(2).sum()) for v in values) / max(count, 1)) ** 0.5
    step = scale * (rms if rms > 0 else 1.0)
    return [_shifted(global_state, seed, pair, step if sign == 0 else -step)
            for pair, sign in (divmod(index, 2) for index in range(k))]


def _shifted(state: State, seed: int, pair: int, factor: float) -> State:
    """``state + factor * d_pair`` on its floating-point tensors, ``d_pair`` a standard
    Gaussian State drawn from a generator seeded by (seed, pair)."""
    generator = torch.Generator().manual_seed(derive_seed(seed, pair, _INIT_STREAM))
    shifted: State = OrderedDict()
    for key, value in state.items():
        if not value.is_floating_point():
            shifted[key] = value.clone()
            continue
        direction = torch.randn(value.shape, generator=generator, dtype=torch.float64)
        shifted[key] = (value.double() + factor * direction).to(value.dtype).contiguous()
    return shifted


def selection_rows(ctx: ClientContext) -> list[int]:
    """The training rows the cluster models are scored on: all, or a seeded sample of
    ``SELECTION_ROWS``."""
    count = len(ctx.train_examples)
    if count <= SELECTION_ROWS:
        return list(range(count))
    rng = np.random.default_rng([ctx.seed, _SELECTION_STREAM])
    return sorted(int(i) for i in rng.choice(count, size=SELECTION_ROWS, replace=False))


def choose_cluster(ctx: ClientContext, models: list[State], batch_size: int
                   ) -> tuple[int, list[float]]:
    """IFCA's estimate: the cluster model with the lowest training loss (ties: lowest index),
    and every cluster's loss."""
    rows = selection_rows(ctx)
    losses = [training_loss(ctx, model, rows, batch_size) for model in models]
    return int(np.argmin(losses)), losses


class IFCAClient:
    def __init__(self, inner: DeltaClient) -> None:
        self.inner = inner

    def run(self, ctx: ClientContext, broadcast: Broadcast) -> ClientResult:
        models = cluster_models(broadcast.extras)
        if not models:
            raise ValueError("ifca: the broadcast carries no cluster models")
        choice, losses = choose_cluster(ctx, models, self.inner.local.batch_size)
        result = train_cluster(self.inner, ctx, broadcast, choice)
        result.update.metrics["selection_loss"] = losses[choice]
        return result

    def personal_state(self, global_state: State, client_state: ClientState | None,
                       extras: Mapping[str, State] | None = None,
                       ctx: ClientContext | None = None) -> State:
        """The client's cluster model: the lowest-loss one on its training data (with its
        context), else the one it chose when it last trained, else the global State."""
        models = cluster_models(extras or {})
        if not models:
            return global_state
        if ctx is not None:
            return models[choose_cluster(ctx, models, self.inner.local.batch_size)[0]]
        known = recorded(client_state)
        if known is None or not 0 <= known[1] < len(models):
            return global_state
        return models[known[1]]


class IFCAServer(ClusterServer):
    def __init__(self, cfg: AlgorithmConfig, num_clients: int) -> None:
        super().__init__(lambda: build_delta_server(cfg), num_clients)
        self.k = cfg.cluster.k

    def initial_clusters(self, global_state: State) -> list[State]:
        return perturbed_clusters(global_state, self.k, self.seed)

    def check_update(self, update: ClientUpdate, global_state: State) -> None:
        self.check_cluster(update)

    def aggregate(self, global_state: State, updates: list[ClientUpdate], round: int) -> State:
        self.ensure_clusters(global_state)
        return self.aggregate_clusters(updates, round, metadata_cluster)


@ALGORITHMS.register("ifca", MethodInfo(
    "adaptability.clustering",
    "An Efficient Framework for Clustered Federated Learning (Ghosh, Chung, Yin & "
    "Ramchandran, NeurIPS 2020)",
    "algorithm: {name: ifca, cluster: {k: 2}}",
    "keeps k cluster models; each client trains the one with its lowest training loss"))
def build_ifca(cfg: AlgorithmConfig, num_clients: int) -> Algorithm:
    return Algorithm(name="ifca", client=IFCAClient(DeltaClient(cfg.local)),
                     server=IFCAServer(cfg, num_clients),
                     info={"server_optimizer": cfg.server_optimizer.name,
                           "clusters": cfg.cluster.k})
