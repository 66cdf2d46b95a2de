"""What IFCA and CFL share: cluster models on the server, one per-cluster FedAvg server each,
the client -> cluster assignment, and the names under which cluster models travel.

Wire format. Cluster ``j``'s model travels as the broadcast extra ``cluster.<j>`` (every
selected client receives all cluster models, since the round loop sends one broadcast to all;
``bytes_down`` counts them), and, for CFL, the assignment as ``cluster.assignment``
(``{"cluster": int64[num_clients]}``). A client trains its cluster's model as FedAvg does, sends
``local - cluster model`` and names the cluster in ``update.metadata["cluster"]``.

The global State is the membership-weighted mean of the cluster models (weights: clients whose
latest cluster it is), the one model that summarises the federation for the global
evaluation; with a single cluster it is that cluster's model exactly. Each client's own model
for the personalized evaluation is its cluster's model (``evaluation_extras``).

Round metrics: ``clusters`` ({client id: cluster} over the clients seen so far),
``num_clusters``, ``cluster_sizes`` and, when ``data.group_by`` names a known grouping,
``cluster_purity`` (``fedfm.adaptability.clustering.purity``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from fedfm.adaptability.clustering.purity import purity
from fedfm.algorithms.fedavg import DeltaClient, DeltaServer, with_prefix
from fedfm.algorithms.local_train import client_autocast
from fedfm.core import state as state_ops
from fedfm.core.algorithm import ClientContext, ClientResult, ClientState
from fedfm.core.state import State
from fedfm.core.update import Broadcast, ClientUpdate
from fedfm.models.fused_loss import standard_loss

CLUSTER_PREFIX = "cluster."
ASSIGNMENT_KEY = "cluster.assignment"
STATE_KEY = "cluster"  # the client's record in its store: its id and latest cluster
SELECTION_ROWS = 64  # IFCA: training rows (at most) each cluster model is scored on


def cluster_key(index: int) -> str:
    return f"{CLUSTER_PREFIX}{index}"


def cluster_models(extras: Mapping[str, State]) -> list[State]:
    """The cluster models among broadcast (or evaluation) extras, by index."""
    models: list[State] = []
    while cluster_key(len(models)) in extras:
        models.append(extras[cluster_key(len(models))])
    return models


def assigned_cluster(extras: Mapping[str, State], client_id: int) -> int | None:
    """The server's cluster for ``client_id`` from the ``cluster.assignment`` extra."""
    table = extras.get(ASSIGNMENT_KEY)
    if table is None or not 0 <= client_id < table["cluster"].numel():
        return None
    return int(table["cluster"][client_id])


def client_record(client_id: int, cluster: int) -> State:
    return OrderedDict(client=torch.tensor([client_id]), cluster=torch.tensor([cluster]))


def recorded(client_state: ClientState | None) -> tuple[int, int] | None:
    """(client id, latest cluster) kept in the client's store, if it has trained yet."""
    record = (client_state or {}).get(STATE_KEY)
    if record is None:
        return None
    return int(record["client"][0]), int(record["cluster"][0])


def train_cluster(inner: DeltaClient, ctx: ClientContext, broadcast: Broadcast,
                  cluster: int) -> ClientResult:
    """FedAvg's client on cluster ``cluster``'s model: the delta is taken from that model,
    the cluster is named in the metadata and kept in the client's store."""
    start = cluster_models(broadcast.extras)[cluster]
    ctx.set_state(start)
    result = inner.run(ctx, Broadcast(start, broadcast.extras, broadcast.round))
    result.update.metadata["cluster"] = cluster
    result.client_state = {**(ctx.client_state or {}),
                           STATE_KEY: client_record(ctx.client_id, cluster)}
    return result


@torch.no_grad()
def training_loss(ctx: ClientContext, state: State, rows: Sequence[int],
                  batch_size: int) -> float:
    """Mean loss of the model holding ``state`` on the client's training rows ``rows`` (eval
    mode, no gradients), example-weighted over batches of ``batch_size``."""
    ctx.set_state(state)
    ctx.model.eval()
    loss_fn = ctx.loss_fn or standard_loss
    total = 0.0
    with client_autocast(ctx):
        for start in range(0, len(rows), batch_size):
            chunk = [ctx.train_examples[i] for i in rows[start:start + batch_size]]
            batch = {k: v.to(ctx.device) for k, v in ctx.collate(chunk).items()}
            total += float(loss_fn(ctx.model, batch)) * len(chunk)
    return total / max(len(rows), 1)


class ClusterServer:
    """Cluster models, a FedAvg server per cluster (its aggregator and server optimizer, each
    with its own state), the assignment of clients to clusters, and the round's report."""

    def __init__(self, make_server: Callable[[], DeltaServer], num_clients: int) -> None:
        self.make_server = make_server
        self.clusters: list[State] = []
        self.servers: list[DeltaServer] = []
        self.assignment = torch.zeros(num_clients, dtype=torch.int64)
        self.seen = torch.zeros(num_clients, dtype=torch.int64)  # 1: has sent an update
        self.groups: dict[int, str | None] = {}
        self.seed = 0
        self.last: dict[str, Any] = {}

    # ------------------------------------------------------------------ binding and models

    def bind_workload(self, workload: Any) -> None:
        """The run seed (IFCA's initial perturbations) and each client's known group."""
        self.seed = int(workload.config.seed)
        self.groups = {c.client_id: c.group for c in workload.data.clients}

    def initial_clusters(self, global_state: State) -> list[State]:
        return [state_ops.clone(global_state)]

    def ensure_clusters(self, global_state: State) -> None:
        """The initial cluster models on first use; after a checkpoint load (whose States come
        back in sorted key order), the cluster models in the global State's key order."""
        if not self.clusters:
            self.clusters = self.initial_clusters(global_state)
            self.servers = [self.make_server() for _ in self.clusters]
        order = list(global_state)
        if order and any(list(model) != order for model in self.clusters):
            self.clusters = [OrderedDict((k, model[k]) for k in order)
                             for model in self.clusters]

    def cluster_extras(self) -> dict[str, State]:
        return {cluster_key(j): model for j, model in enumerate(self.clusters)}

    def evaluation_extras(self, global_state: State) -> dict[str, State]:
        """The current cluster models (and CFL's assignment) for the personal models."""
        return self.broadcast_extras(global_state)

    def broadcast_extras(self, global_state: State) -> dict[str, State]:
        self.ensure_clusters(global_state)
        return self.cluster_extras()

    # ------------------------------------------------------------------ aggregation

    def aggregate_clusters(self, updates: Sequence[ClientUpdate], round: int,
                           cluster_of: Callable[[ClientUpdate], int]) -> State:
        """Each cluster's model takes its FedAvg server's step with its members' updates
        (``cluster_of``: the cluster an update belongs to); the assignment follows; the new
        global State is the membership-weighted mean of the cluster models."""
        for cluster, members in group_updates(updates, cluster_of).items():
            self.clusters[cluster] = self.servers[cluster].aggregate(
                self.clusters[cluster], members, round)
        for update in updates:
            self.assignment[update.client_id] = cluster_of(update)
            self.seen[update.client_id] = 1
        self.last = self.report()
        return self.global_model()

    def global_model(self) -> State:
        sizes = self.cluster_sizes()
        if sum(sizes) == 0:
            sizes = [1] * len(self.clusters)
        kept = [(model, size) for model, size in zip(self.clusters, sizes, strict=True)
                if size > 0]
        return state_ops.weighted_mean((m for m, _ in kept), [float(s) for _, s in kept])

    def current_assignment(self) -> dict[int, int]:
        """{client id: cluster} over the clients that have sent an update."""
        return {int(c): int(self.assignment[c]) for c in torch.nonzero(self.seen).flatten()}

    def cluster_sizes(self) -> list[int]:
        sizes = [0] * len(self.clusters)
        for cluster in self.current_assignment().values():
            sizes[cluster] += 1
        return sizes

    def report(self) -> dict[str, Any]:
        assignment = self.current_assignment()
        found: dict[str, Any] = {"clusters": {str(c): k for c, k in assignment.items()},
                                 "num_clusters": len(self.clusters),
                                 "cluster_sizes": self.cluster_sizes()}
        score = purity(assignment, self.groups)
        if score is not None:
            found["cluster_purity"] = score
        return found

    def round_metrics(self) -> dict[str, Any]:
        return dict(self.last)

    def check_cluster(self, update: ClientUpdate) -> int:
        cluster = update.metadata.get("cluster")
        if isinstance(cluster, bool) or not isinstance(cluster, int) or not (
                0 <= cluster < len(self.clusters)):
            raise ValueError(f"client {update.client_id}: metadata 'cluster' must name one of "
                             f"the {len(self.clusters)} clusters, got {cluster!r}")
        if not 0 <= update.client_id < self.assignment.numel():
            raise ValueError(f"client {update.client_id} is not in the federation")
        return cluster

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, State]:
        states: dict[str, State] = {
            "assignment": OrderedDict(cluster=self.assignment.clone(), seen=self.seen.clone())}
        for j, (model, server) in enumerate(zip(self.clusters, self.servers, strict=True)):
            states[cluster_key(j)] = state_ops.clone(model)
            states.update({f"server{j}.{k}": v for k, v in server.state_dict().items()})
        return states

    def load_state_dict(self, states: Mapping[str, State]) -> None:
        if "assignment" not in states:
            return
        self.assignment = states["assignment"]["cluster"].clone().to(torch.int64)
        self.seen = states["assignment"]["seen"].clone().to(torch.int64)
        self.clusters = [state_ops.clone(m) for m in cluster_models(states)]
        self.servers = []
        for j in range(len(self.clusters)):
            server = self.make_server()
            server.load_state_dict(with_prefix(states, f"server{j}."))
            self.servers.append(server)
        self.last = self.report()


def group_updates(updates: Sequence[ClientUpdate], cluster_of: Callable[[ClientUpdate], int]
                  ) -> dict[int, list[ClientUpdate]]:
    """Updates by cluster, clusters in increasing order, updates in arrival order."""
    groups: dict[int, list[ClientUpdate]] = {}
    for update in updates:
        groups.setdefault(cluster_of(update), []).append(update)
    return dict(sorted(groups.items()))


def metadata_cluster(update: ClientUpdate) -> int:
    """The cluster the client names in its update's metadata."""
    return int(update.metadata["cluster"])
