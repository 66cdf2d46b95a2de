"""CFL: Clustered Federated Learning by recursive bipartitioning.

Sattler, Müller & Samek, "Clustered Federated Learning: Model-Agnostic Distributed Multitask
Optimization Under Privacy Constraints", IEEE TNNLS 2020. All clients start in one cluster.
Every round each client trains its cluster's model (FedAvg's client; the server's assignment
travels with the cluster models as the ``cluster.assignment`` extra) and the server looks at
each cluster's updates ``dW_i`` this round:

* mean norm ``|| sum_i (n_i / n) dW_i ||`` (the weighting of ``algorithm.weighting``) below
  ``algorithm.cluster.eps1`` — the cluster's joint objective is near a stationary point — while
* the largest ``|| dW_i ||`` is above ``eps2`` — some clients are still far from theirs,

and, when at least ``2 x min_cluster_size`` of its members took part and fewer than
``max_clusters`` clusters exist, it splits the cluster in two by the cosine similarities of
those members' updates: complete-linkage agglomerative clustering down to two parts (as the
authors' code does), which separates the clients whose updates point in opposite directions.
A split that would leave a part with fewer than ``min_cluster_size`` clients is not made. The
part holding the lowest client id keeps the cluster's id, the other gets the next id; both
inherit the cluster's model and its server optimizer state, then (as in the paper's
Algorithm 1) each aggregates its own members' updates of the same round. Members that did not
take part in the splitting round stay with the first part. The paper's further check that the
two parts are dissimilar enough (its ``gamma_max``) is not made: eps1/eps2 decide.

Cluster models, the assignment and which clients were seen are server state, checkpointed as
tensors (``state_dict``), so a resumed run continues exactly. Round metrics add
``cluster_mean_norm`` / ``cluster_max_norm`` ({cluster: norm} this round) and
``cluster_splits`` ([[parent, new], ...]) to the common report.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from fedfm.adaptability.clustering.common import (
    ASSIGNMENT_KEY,
    ClusterServer,
    assigned_cluster,
    cluster_models,
    group_updates,
    metadata_cluster,
    recorded,
    train_cluster,
)
from fedfm.algorithms.aggregation import Weighting, update_weights
from fedfm.algorithms.fedavg import DeltaClient, build_delta_server
from fedfm.config import AlgorithmConfig, ClusterConfig
from fedfm.core import state as state_ops
from fedfm.core.algorithm import Algorithm, ClientContext, ClientResult, ClientState
from fedfm.core.registries import ALGORITHMS
from fedfm.core.registry import MethodInfo
from fedfm.core.state import State
from fedfm.core.update import Broadcast, ClientUpdate


def update_norms(updates: Sequence[ClientUpdate], weighting: Weighting
                 ) -> tuple[float, float]:
    """(norm of the weighted mean update, largest client update norm)."""
    mean = state_ops.weighted_mean((u.payload for u in updates),
                                   update_weights(list(updates), weighting))
    return state_ops.global_norm(mean), max(state_ops.global_norm(u.payload) for u in updates)


def should_split(mean_norm: float, max_norm: float, cfg: ClusterConfig) -> bool:
    """CFL's criterion: near-stationary on average, far from it for some client."""
    return mean_norm < cfg.eps1 and max_norm > cfg.eps2


def cosine_similarities(payloads: Sequence[State]) -> np.ndarray:
    """Pairwise cosine similarity of the flattened updates (0 next to a zero update)."""
    keys = list(payloads[0])
    vectors = torch.stack([state_ops.flatten(p, keys) for p in payloads])
    norms = vectors.norm(dim=1, keepdim=True)
    unit = vectors / torch.where(norms > 0, norms, torch.ones_like(norms))
    return (unit @ unit.T).numpy()


def bipartition(similarity: np.ndarray) -> tuple[list[int], list[int]]:
    """Two parts by complete-linkage agglomerative clustering on ``1 - similarity`` (merge the
    pair of groups whose farthest members are closest, ties: the first pair), sorted, the
    part holding index 0 first."""
    distance = 1.0 - np.asarray(similarity, dtype=np.float64)
    groups: list[list[int]] = [[i] for i in range(len(distance))]
    linkage = distance.copy()
    np.fill_diagonal(linkage, np.inf)
    while len(groups) > 2:
        a, b = np.unravel_index(int(np.argmin(linkage)), linkage.shape)
        a, b = (int(a), int(b)) if a < b else (int(b), int(a))
        groups[a] = groups[a] + groups[b]
        merged = np.maximum(linkage[a], linkage[b])  # complete linkage: the farthest pair
        linkage[a], linkage[:, a] = merged, merged
        linkage[a, a] = np.inf
        linkage = np.delete(np.delete(linkage, b, axis=0), b, axis=1)
        del groups[b]
    parts = sorted(sorted(g) for g in groups)
    return (parts[0], parts[1]) if len(parts) == 2 else (parts[0], [])


class CFLClient:
    def __init__(self, inner: DeltaClient) -> None:
        self.inner = inner

    def run(self, ctx: ClientContext, broadcast: Broadcast) -> ClientResult:
        cluster = assigned_cluster(broadcast.extras, ctx.client_id)
        if cluster is None or not 0 <= cluster < len(cluster_models(broadcast.extras)):
            raise ValueError(f"cfl: the broadcast assigns client {ctx.client_id} no cluster")
        return train_cluster(self.inner, ctx, broadcast, cluster)

    def personal_state(self, global_state: State, client_state: ClientState | None,
                       extras: Mapping[str, State] | None = None,
                       ctx: ClientContext | None = None) -> State:
        """The model of the client's cluster in the server's current assignment (the client
        is known by its context, else by the id kept in its store once it has trained)."""
        models = cluster_models(extras or {})
        known = recorded(client_state)
        client_id = ctx.client_id if ctx is not None else (known[0] if known else None)
        if client_id is None:
            return global_state
        cluster = assigned_cluster(extras or {}, client_id)
        if cluster is None or not 0 <= cluster < len(models):
            return global_state
        return models[cluster]


class CFLServer(ClusterServer):
    def __init__(self, cfg: AlgorithmConfig, num_clients: int) -> None:
        super().__init__(lambda: build_delta_server(cfg), num_clients)
        self.cfg = cfg.cluster
        self.weighting = cfg.weighting

    def broadcast_extras(self, global_state: State) -> dict[str, State]:
        self.ensure_clusters(global_state)
        table = OrderedDict(cluster=self.assignment.clone())
        return {**self.cluster_extras(), ASSIGNMENT_KEY: table}

    def check_update(self, update: ClientUpdate, global_state: State) -> None:
        cluster = self.check_cluster(update)
        expected = int(self.assignment[update.client_id])
        if cluster != expected:
            raise ValueError(f"client {update.client_id} trained cluster {cluster}, but the "
                             f"server assigned it cluster {expected}")

    def aggregate(self, global_state: State, updates: list[ClientUpdate], round: int) -> State:
        self.ensure_clusters(global_state)
        norms: dict[str, dict[str, float]] = {"cluster_mean_norm": {}, "cluster_max_norm": {}}
        splits: list[list[int]] = []
        for cluster, members in group_updates(updates, metadata_cluster).items():
            mean_norm, max_norm = update_norms(members, self.weighting)
            norms["cluster_mean_norm"][str(cluster)] = mean_norm
            norms["cluster_max_norm"][str(cluster)] = max_norm
            if should_split(mean_norm, max_norm, self.cfg):
                new = self.split(cluster, members)
                if new is not None:
                    splits.append([cluster, new])
        new_global = self.aggregate_clusters(
            updates, round, lambda u: int(self.assignment[u.client_id]))
        self.last.update(norms)
        self.last["cluster_splits"] = splits
        return new_global

    def split(self, cluster: int, members: Sequence[ClientUpdate]) -> int | None:
        """Bipartition ``cluster`` by its members' updates; the new cluster's id, or None when
        the cluster may not split (too few members, too many clusters, a part too small)."""
        cfg = self.cfg
        if len(self.clusters) >= cfg.max_clusters or len(members) < 2 * cfg.min_cluster_size:
            return None
        ordered = sorted(members, key=lambda u: u.client_id)
        _, second = bipartition(cosine_similarities([u.payload for u in ordered]))
        if min(len(second), len(ordered) - len(second)) < cfg.min_cluster_size:
            return None
        new = len(self.clusters)
        self.clusters.append(state_ops.clone(self.clusters[cluster]))
        server = self.make_server()
        server.load_state_dict({k: state_ops.clone(v)
                                for k, v in self.servers[cluster].state_dict().items()})
        self.servers.append(server)
        for index in second:
            self.assignment[ordered[index].client_id] = new
        return new


@ALGORITHMS.register("cfl", MethodInfo(
    "adaptability.clustering",
    "Clustered Federated Learning: Model-Agnostic Distributed Multitask Optimization Under "
    "Privacy Constraints (Sattler, Müller & Samek, IEEE TNNLS 2020)",
    "algorithm: {name: cfl, cluster: {eps1: 0.4, eps2: 1.6, max_clusters: 8}}",
    "one cluster to start; split in two by update cosine similarity when near-stationary"))
def build_cfl(cfg: AlgorithmConfig, num_clients: int) -> Algorithm:
    return Algorithm(name="cfl", client=CFLClient(DeltaClient(cfg.local)),
                     server=CFLServer(cfg, num_clients),
                     info={"server_optimizer": cfg.server_optimizer.name})
