"""Clustered federated learning (issue 10, item 2): IFCA and CFL.

Unit tests check the math (purity, IFCA's argmin-loss choice, per-cluster FedAvg, CFL's split
criterion and bipartition, checkpoint round trips); end-to-end runs on SST-2 rows whose labels
are flipped for half of the clients (two real latent groups) check that both algorithms
recover the groups exactly, count the cluster models in bytes down, and resume exactly.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedfm import api
from fedfm.adaptability.clustering import purity
from fedfm.adaptability.clustering.cfl import (
    CFLClient,
    CFLServer,
    bipartition,
    build_cfl,
    cosine_similarities,
    should_split,
)
from fedfm.adaptability.clustering.common import client_record, cluster_key, cluster_models
from fedfm.adaptability.clustering.ifca import IFCAClient, IFCAServer, build_ifca
from fedfm.algorithms.fedavg import DeltaClient, build_delta_server
from fedfm.config import AlgorithmConfig, ClusterConfig, LocalTrainingConfig, config_from_dict
from fedfm.core import state as S
from fedfm.core.algorithm import ClientContext
from fedfm.core.update import Broadcast, ClientUpdate
from tests.conftest import DATA, cls_config_dict

# ------------------------------------------------------------------------------ purity


@pytest.mark.parametrize(("assignment", "groups", "expected"), [
    ({0: 0, 1: 0, 2: 1, 3: 1}, {0: "a", 1: "a", 2: "b", 3: "b"}, 1.0),
    ({0: 0, 1: 0, 2: 0, 3: 0}, {0: "a", 1: "a", 2: "a", 3: "b"}, 0.75),
    ({0: 0, 1: 0, 2: 0, 3: 1, 4: 1}, {0: "a", 1: "a", 2: "b", 3: "b", 4: "c"}, 3 / 5),
    ({0: 0, 1: 1, 2: 2}, {0: "a", 1: "a", 2: "a"}, 1.0),  # a group split is still pure
    ({0: 0, 1: 1, 2: 0, 3: 1}, {0: "a", 1: "a", 2: "b", 3: "b"}, 0.5),
    ({0: 0, 1: 0, 2: 0}, {0: "a", 1: None, 2: "b", 3: "b"}, 0.5),  # 1 unknown, 3 unassigned
])
def test_purity_hand_computed(assignment, groups, expected) -> None:
    assert purity(assignment, groups) == pytest.approx(expected, abs=1e-15)


def test_purity_without_known_groups_is_none() -> None:
    assert purity({0: 0, 1: 1}, {}) is None
    assert purity({}, {0: "a"}) is None


# ------------------------------------------------------------------------------ IFCA client


class Linear(torch.nn.Module):
    """A two-class linear classifier with the ``model(**batch).loss`` interface."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(2, 3))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=F.cross_entropy(x @ self.weight.T, labels))


def linear_context(examples: list[dict[str, Any]], client_id: int = 0) -> ClientContext:
    model = Linear()

    def set_state(state: Any) -> None:
        with torch.no_grad():
            model.weight.copy_(state["weight"])

    return ClientContext(
        client_id=client_id, round=1, seed=7, model=model,
        get_state=lambda: OrderedDict(weight=model.weight.detach().clone()),
        set_state=set_state, train_examples=examples,
        collate=lambda rows: {"x": torch.stack([r["x"] for r in rows]),
                              "labels": torch.tensor([r["labels"] for r in rows])},
        device=torch.device("cpu"))


def separable_examples(weight: torch.Tensor, count: int = 40) -> list[dict[str, Any]]:
    x = torch.randn(count, 3, generator=torch.Generator().manual_seed(3))
    labels = (x @ weight.T).argmax(dim=1)
    return [{"x": x[i], "labels": int(labels[i])} for i in range(count)]


def test_ifca_client_trains_the_cluster_with_the_lowest_training_loss() -> None:
    truth = torch.tensor([[2.0, -1.0, 0.5], [-2.0, 1.0, -0.5]])
    examples = separable_examples(truth)
    models = [OrderedDict(weight=-truth), OrderedDict(weight=truth),
              OrderedDict(weight=torch.zeros(2, 3))]  # the good one is not the first
    extras = {cluster_key(j): m for j, m in enumerate(models)}
    local = LocalTrainingConfig(steps=2, batch_size=8, lr=0.1, optimizer="sgd")
    client = IFCAClient(DeltaClient(local))
    ctx = linear_context(examples, client_id=5)
    result = client.run(ctx, Broadcast(OrderedDict(weight=torch.zeros(2, 3)), extras, 1))

    batch = ctx.collate(examples)
    losses = [float(F.cross_entropy(batch["x"] @ m["weight"].T, batch["labels"]))
              for m in models]
    assert int(np.argmin(losses)) == 1 and losses[1] < 0.5 < losses[0]
    assert result.update.metadata["cluster"] == 1
    assert result.update.metrics["selection_loss"] == pytest.approx(losses[1], rel=1e-6)
    # the delta is taken from the chosen cluster's model, not from the global State
    trained = ctx.get_state()
    assert torch.equal(result.update.payload["weight"], trained["weight"] - truth)
    assert float(result.update.payload["weight"].abs().max()) > 0
    assert [int(v) for v in result.client_state["cluster"].values()] == [5, 1]

    # the personal model: argmin again with the client's context, else the recorded choice
    fresh = linear_context(examples, client_id=5)
    assert client.personal_state({}, None, extras, ctx=fresh) is models[1]
    assert client.personal_state({}, result.client_state, extras) is models[1]
    sentinel = OrderedDict(weight=torch.ones(2, 3))
    assert client.personal_state(sentinel, None, extras) is sentinel


# ------------------------------------------------------------------------------ IFCA server


def random_state(seed: int) -> OrderedDict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return OrderedDict(a=torch.randn(4, 3, generator=g), b=torch.randn(5, generator=g))


def update(client: int, cluster: int, seed: int, examples: int) -> ClientUpdate:
    return ClientUpdate(client, random_state(seed), examples, metadata={"cluster": cluster})


def test_ifca_initial_clusters_are_seeded_antithetic_perturbations() -> None:
    cfg = AlgorithmConfig(name="ifca", cluster=ClusterConfig(k=3))
    start = random_state(0)
    first, again, other = (IFCAServer(cfg, 4) for _ in range(3))
    other.seed = 1
    models = [cluster_models(s.broadcast_extras(start)) for s in (first, again, other)]
    assert len(models[0]) == 3
    assert all(S.equal(a, b) for a, b in zip(models[0], models[1], strict=True))
    assert not S.equal(models[0][0], models[2][0])
    midpoint = S.weighted_mean(models[0][:2], [1.0, 1.0])
    assert S.max_abs_diff(midpoint, start) < 1e-6
    assert not S.equal(models[0][0], models[0][2]) and not S.equal(models[0][1], start)


def test_ifca_aggregates_each_cluster_as_the_fedavg_of_its_members() -> None:
    cfg = AlgorithmConfig(name="ifca", cluster=ClusterConfig(k=3))
    server = build_ifca(cfg, 6).server
    server.groups = {0: "a", 1: "b", 2: "a", 3: "b", 4: "b"}
    before = cluster_models(server.broadcast_extras(random_state(0)))
    updates = [update(0, 0, 10, 5), update(1, 1, 11, 7), update(2, 0, 12, 9),
               update(3, 1, 13, 2), update(4, 0, 14, 4)]
    for u in updates:
        server.check_update(u, before[0])
    new_global = server.aggregate(random_state(0), updates, 1)
    after = cluster_models(server.broadcast_extras(new_global))
    for cluster in (0, 1):
        members = [u for u in updates if u.metadata["cluster"] == cluster]
        fedavg = build_delta_server(cfg).aggregate(before[cluster], members, 1)
        assert S.equal(after[cluster], fedavg)
        mean = S.weighted_mean([u.payload for u in members],
                               [float(u.num_examples) for u in members])
        assert S.max_abs_diff(after[cluster], S.add(before[cluster], mean)) < 1e-6
    assert S.equal(after[2], before[2])  # nobody chose it: unchanged
    expected_global = S.weighted_mean(after[:2], [3.0, 2.0])  # 3 members, 2 members
    assert S.max_abs_diff(new_global, expected_global) < 1e-6
    report = server.round_metrics()
    assert report["clusters"] == {"0": 0, "1": 1, "2": 0, "3": 1, "4": 0}
    assert report["num_clusters"] == 3 and report["cluster_sizes"] == [3, 2, 0]
    assert report["cluster_purity"] == pytest.approx(4 / 5)
    with pytest.raises(ValueError, match="one of the 3 clusters"):
        server.check_update(update(5, 3, 15, 1), before[0])


# ------------------------------------------------------------------------------ CFL server


def opposite_updates(norm: float, mean_offset: float = 0.0) -> list[ClientUpdate]:
    """Clients 0, 2, 4 push along +v, clients 1, 3, 5 along -v (plus a little noise); every
    update has norm ``norm``; ``mean_offset`` adds a shared direction w to all of them."""
    g = torch.Generator().manual_seed(0)
    v, w = torch.randn(12, generator=g), torch.randn(12, generator=g)
    updates = []
    for client in range(6):
        sign = 1.0 if client % 2 == 0 else -1.0
        vector = sign * v + 0.05 * torch.randn(12, generator=g)
        vector = norm * vector / vector.norm() + mean_offset * w / w.norm()
        updates.append(ClientUpdate(client, OrderedDict(a=vector[:8].reshape(2, 4).clone(),
                                                        b=vector[8:].clone()),
                                    10, metadata={"cluster": 0}))
    return updates


def cfl_server(**cluster: Any) -> CFLServer:
    cfg = AlgorithmConfig(name="cfl", cluster=ClusterConfig(**cluster))
    server = build_cfl(cfg, 6).server
    server.broadcast_extras(OrderedDict(a=torch.zeros(2, 4), b=torch.zeros(4)))
    return server


def test_cfl_split_criterion() -> None:
    cfg = ClusterConfig(eps1=0.4, eps2=1.6)
    assert should_split(0.39, 1.61, cfg)
    assert not should_split(0.41, 1.61, cfg)  # the cluster is still moving as a whole
    assert not should_split(0.39, 1.59, cfg)  # every client is near its own optimum too


def test_bipartition_separates_opposite_directions() -> None:
    similarity = cosine_similarities([u.payload for u in opposite_updates(2.0)])
    assert similarity[0, 2] > 0.9 and similarity[0, 1] < -0.9
    assert bipartition(similarity) == ([0, 2, 4], [1, 3, 5])
    # complete linkage: 3 joins {0,1} (farthest pair 0.4) rather than {2} (0.5), and the two
    # parts are what is left once three groups become two
    distance = np.array([[0.0, 0.1, 0.9, 0.4], [0.1, 0.0, 0.9, 0.3],
                         [0.9, 0.9, 0.0, 0.5], [0.4, 0.3, 0.5, 0.0]])
    assert bipartition(1.0 - distance) == ([0, 1, 3], [2])


def test_cfl_splits_when_stationary_on_average_but_not_per_client() -> None:
    server = cfl_server()
    server.groups = {c: "ab"[c % 2] for c in range(6)}
    before = cluster_models(server.broadcast_extras({}))[0]
    updates = opposite_updates(2.0)
    new_global = server.aggregate(before, updates, 1)
    report = server.round_metrics()
    assert report["cluster_mean_norm"]["0"] < 0.4 and report["cluster_max_norm"]["0"] > 1.6
    assert report["cluster_splits"] == [[0, 1]]
    assert report["clusters"] == {"0": 0, "1": 1, "2": 0, "3": 1, "4": 0, "5": 1}
    assert report["num_clusters"] == 2 and report["cluster_purity"] == 1.0
    extras = server.broadcast_extras(new_global)
    assert extras["cluster.assignment"]["cluster"].tolist() == [0, 1, 0, 1, 0, 1]
    for cluster, models in enumerate(cluster_models(extras)):
        members = [u for u in updates if u.client_id % 2 == cluster]
        mean = S.weighted_mean([u.payload for u in members], [10.0] * 3)
        assert S.equal(models, S.add(before, mean))  # the inherited model + its members
    with pytest.raises(ValueError, match="server assigned it cluster 1"):
        server.check_update(update(1, 0, 3, 1), before)
    # client 3 trained in cluster 0 this round; its own model is now that of cluster 1
    client = CFLClient(DeltaClient(LocalTrainingConfig()))
    record = {"cluster": client_record(3, 0)}
    assert client.personal_state(before, record, extras) is cluster_models(extras)[1]
    assert client.personal_state(before, None, extras) is before  # never trained, no context


@pytest.mark.parametrize(("norm", "offset", "cluster"), [
    (1.0, 0.0, {}),  # max norm 1.0 < eps2
    (2.0, 3.0, {}),  # a shared direction: mean norm 3 > eps1
    (2.0, 0.0, {"min_cluster_size": 4}),  # 6 members cannot make two parts of 4
    (2.0, 0.0, {"max_clusters": 1}),
])
def test_cfl_does_not_split(norm, offset, cluster) -> None:
    server = cfl_server(**cluster)
    before = cluster_models(server.broadcast_extras({}))[0]
    server.aggregate(before, opposite_updates(norm, offset), 1)
    assert server.round_metrics()["cluster_splits"] == []
    assert len(cluster_models(server.broadcast_extras({}))) == 1


def test_cfl_state_dict_round_trips_clusters_and_assignment() -> None:
    server = cfl_server(eps1=1.0, eps2=0.5)
    before = cluster_models(server.broadcast_extras({}))[0]
    server.aggregate(before, opposite_updates(2.0)[:4], 1)  # clients 4 and 5 unseen
    states = server.state_dict()
    assert all(isinstance(t, torch.Tensor) for s in states.values() for t in s.values())
    restored = cfl_server(eps1=1.0, eps2=0.5)
    restored.load_state_dict({k: S.clone(v) for k, v in states.items()})
    for key, value in server.broadcast_extras({}).items():
        assert S.equal(value, restored.broadcast_extras({})[key]), key
    assert restored.round_metrics()["clusters"] == {"0": 0, "1": 1, "2": 0, "3": 1}


# ------------------------------------------------------------------------------ end to end


def flipped_config(tmp: Path, algorithm: dict[str, Any], rounds: int) -> Any:
    """SST-2 rows (3 positive : 1 negative) held by group ``a`` with their labels and by
    group ``b`` with the labels flipped; two clients per group (natural partition)."""
    rows = [json.loads(line) for line in (DATA / "sst2_train.jsonl").read_text().splitlines()]
    positive = [r for r in rows if r["label"] == 1][:60]
    negative = [r for r in rows if r["label"] == 0][:20]
    data = tmp / "flipped.jsonl"
    data.write_text("".join(
        json.dumps({**r, "group": "a"}) + "\n" + json.dumps(
            {**r, "label": 1 - r["label"], "group": "b"}) + "\n"
        for r in positive + negative))
    validation = tmp / "validation.jsonl"
    validation.write_text("".join(
        json.dumps({**json.loads(line), "group": "a"}) + "\n"
        for line in (DATA / "sst2_validation.jsonl").read_text().splitlines()[:32]))
    local = {"steps": 5, "batch_size": 8, "lr": 0.02}  # purity 1.0 in every round, seeds 0-6
    return config_from_dict(cls_config_dict(
        tmp, data={"path": str(data), "validation_path": str(validation), "max_rows": None,
                   "group_by": "group",
                   "partition": {"kind": "natural", "by": "group", "min_size": 1}},
        federation={"num_clients": 4, "clients_per_round": 4, "rounds": rounds},
        algorithm={**algorithm, "local": local},
        eval={"every": 3, "batch_size": 64}, runtime={"num_threads": 1}))


ALGORITHMS = {
    "ifca": {"name": "ifca", "cluster": {"k": 2}},
    "cfl": {"name": "cfl", "cluster": {"eps1": 100.0, "eps2": 0.0, "max_clusters": 2}},
}


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory) -> dict[str, Any]:
    return {name: api.run(flipped_config(tmp_path_factory.mktemp(name), algorithm, 3))
            for name, algorithm in ALGORITHMS.items()}


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_two_latent_groups_are_recovered(full_runs, name) -> None:
    result = full_runs[name]
    last = result.metrics[-1]
    clusters = last["clusters"]  # clients 0, 1: group a; 2, 3: group b
    assert clusters["0"] == clusters["1"] != clusters["2"] == clusters["3"]
    assert [r["cluster_purity"] for r in result.metrics] == [1.0, 1.0, 1.0]
    assert last["num_clusters"] == 2
    if name == "cfl":
        assert sum(len(r["cluster_splits"]) for r in result.metrics) == 1
    size = S.num_bytes(result.final_state)  # every cluster model has the global's keys
    for record in result.metrics:
        extra = 0
        if name == "cfl":  # the models before this round's split, and the assignment
            split_before = any(r["cluster_splits"] for r in result.metrics
                               if r["round"] < record["round"])
            models = 2 if split_before else 1
            extra = S.num_bytes({"cluster": torch.zeros(4, dtype=torch.int64)})
        else:
            models = 2
        assert record["bytes_down"] == 4 * ((models + 1) * size + extra)
    personal = last["eval"]["personalized"]
    assert set(personal) == {"0", "1", "2", "3"} and personal != last["eval"]["per_client"]
    assert "personal_accuracy_mean" in result.summary["final_metrics"]


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_resume_continues_exactly(full_runs, tmp_path, name) -> None:
    shorter = api.run(flipped_config(tmp_path, ALGORITHMS[name], 2))
    resumed = api.run(resume=shorter.run_dir, overrides=["federation.rounds=3"])
    whole = full_runs[name]
    # bitwise equal values (a checkpoint gives its States back in sorted key order)
    assert sorted(resumed.final_state) == sorted(whole.final_state)
    assert S.max_abs_diff(resumed.final_state, whole.final_state) == 0.0
    for key in ("clusters", "cluster_purity", "num_clusters", "bytes_down"):
        assert [r[key] for r in resumed.metrics] == [r[key] for r in whole.metrics], key
