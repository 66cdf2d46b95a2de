"""Algorithms against hand-computed math: FedOpt server optimizers (Reddi et al., 2021),
FedAvgM, SCAFFOLD's control variates (Karimireddy et al., 2020) and FedProx's proximal
gradient, on a quadratic model whose gradients are known in closed form."""

from __future__ import annotations

import math
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch

from fedfm.algorithms.fedavg import build_fedavg
from fedfm.algorithms.fedprox import build_fedprox
from fedfm.algorithms.scaffold import CONTROL, CONTROL_DELTA, build_scaffold
from fedfm.algorithms.server_opt import build_server_optimizer
from fedfm.config import AlgorithmConfig, LocalTrainingConfig, ServerOptimizerConfig
from fedfm.core import state as S
from fedfm.core.algorithm import ClientContext
from fedfm.core.update import Broadcast, ClientUpdate
from fedfm.models import get_state, set_state

# ----------------------------------------------------------------------------- FedOpt


def _run_server_optimizer(name: str, deltas: list[list[float]], **kwargs) -> list[list[float]]:
    optimizer = build_server_optimizer(ServerOptimizerConfig(name=name, **kwargs))
    x = OrderedDict(w=torch.tensor([0.5, -1.0], dtype=torch.float64))
    trajectory = []
    for delta in deltas:
        x = optimizer.step(x, OrderedDict(w=torch.tensor(delta, dtype=torch.float64)))
        trajectory.append(x["w"].tolist())
    return trajectory


def _by_hand(name: str, deltas: list[list[float]], lr: float, b1: float, b2: float,
             tau: float, momentum: float = 0.9) -> list[list[float]]:
    """Reddi et al. (2021), Algorithm 2, coordinate by coordinate in plain floats."""
    x, m, v, vel = [0.5, -1.0], [0.0, 0.0], [tau * tau] * 2, [0.0, 0.0]
    out = []
    for delta in deltas:
        for i, d in enumerate(delta):
            if name == "sgd":
                x[i] += lr * d
                continue
            if name == "avgm":
                vel[i] = momentum * vel[i] + d
                x[i] += lr * vel[i]
                continue
            m[i] = b1 * m[i] + (1 - b1) * d
            if name == "adagrad":
                v[i] = v[i] + d * d
            elif name == "adam":
                v[i] = b2 * v[i] + (1 - b2) * d * d
            else:  # yogi
                v[i] = v[i] - (1 - b2) * d * d * math.copysign(1.0, v[i] - d * d) * (
                    0.0 if v[i] == d * d else 1.0)
            x[i] += lr * m[i] / (math.sqrt(v[i]) + tau)
        out.append(list(x))
    return out


@pytest.mark.parametrize("name", ["sgd", "avgm", "adagrad", "adam", "yogi"])
def test_server_optimizers_match_hand_computation(name: str) -> None:
    deltas = [[0.1, -0.2], [0.3, 0.05], [-0.4, 0.0], [0.2, 0.2]]
    params = dict(lr=0.3, beta1=0.8, beta2=0.95, tau=0.01, momentum=0.7)
    got = _run_server_optimizer(name, deltas, **params)
    want = _by_hand(name, deltas, params["lr"], params["beta1"], params["beta2"],
                    params["tau"], params["momentum"])
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, rel=1e-12, abs=1e-12)


def test_server_optimizer_state_round_trips() -> None:
    cfg = ServerOptimizerConfig(name="adam", lr=0.1)
    first, second = build_server_optimizer(cfg), build_server_optimizer(cfg)
    x = OrderedDict(w=torch.tensor([1.0, 2.0]))
    d = OrderedDict(w=torch.tensor([0.1, -0.1]))
    x1 = first.step(x, d)
    second.load_state_dict(first.state_dict())
    assert S.equal(first.step(x1, d), second.step(x1, d))


# ----------------------------------------------------------------------------- quadratic clients


class Quadratic(torch.nn.Module):
    """loss(w) = 0.5 ||w - t||^2 per example, so grad = w - mean(t) exactly."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(dim))
        self.frozen = torch.nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, target: torch.Tensor, labels: torch.Tensor | None = None):
        loss = 0.5 * ((self.w * self.frozen - target) ** 2).sum(-1).mean()
        return SimpleNamespace(loss=loss)


def _collate(examples):
    return {"target": torch.tensor([e["target"] for e in examples], dtype=torch.float32)}


def _ctx(model, client_id: int, target: list[float], client_state=None) -> ClientContext:
    return ClientContext(client_id=client_id, round=1, seed=client_id, model=model,
                         get_state=lambda: get_state(model),
                         set_state=lambda s: set_state(model, s),
                         train_examples=[{"target": target}] * 4, collate=_collate,
                         device=torch.device("cpu"), client_state=client_state)


LOCAL = LocalTrainingConfig(steps=3, batch_size=2, optimizer="sgd", lr=0.1)


def _sgd_by_hand(w: list[float], target: list[float], steps: int, lr: float,
                 correction: list[float] | None = None, mu: float = 0.0,
                 anchor: list[float] | None = None) -> list[float]:
    w = list(w)
    anchor = anchor or w
    for _ in range(steps):
        for i in range(len(w)):
            grad = w[i] - target[i] + (correction[i] if correction else 0.0)
            grad += mu * (w[i] - anchor[i])
            w[i] -= lr * grad
    return w


def test_fedavg_client_sends_local_minus_global() -> None:
    model = Quadratic(2)
    algorithm = build_fedavg(AlgorithmConfig(local=LOCAL), num_clients=1)
    x = OrderedDict(w=torch.tensor([0.0, 1.0]))
    set_state(model, x)
    result = algorithm.client.run(_ctx(model, 0, [1.0, -1.0]), Broadcast(x))
    want = _sgd_by_hand([0.0, 1.0], [1.0, -1.0], 3, 0.1)
    assert result.update.payload["w"].tolist() == pytest.approx(
        [want[0] - 0.0, want[1] - 1.0], abs=1e-6)
    assert result.update.num_examples == 4


def test_fedprox_adds_proximal_gradient() -> None:
    model = Quadratic(2)
    algorithm = build_fedprox(AlgorithmConfig(local=LOCAL, mu=0.5), num_clients=1)
    x = OrderedDict(w=torch.tensor([0.2, 0.4]))
    set_state(model, x)
    result = algorithm.client.run(_ctx(model, 0, [1.0, -1.0]), Broadcast(x))
    want = _sgd_by_hand([0.2, 0.4], [1.0, -1.0], 3, 0.1, mu=0.5, anchor=[0.2, 0.4])
    got = (result.update.payload["w"] + x["w"]).tolist()
    assert got == pytest.approx(want, abs=1e-6)


def test_scaffold_matches_algorithm_1_over_two_rounds() -> None:
    targets = {0: [1.0, 0.0], 1: [-1.0, 2.0], 2: [3.0, 3.0]}
    num_clients, lr, steps, lr_g = 3, 0.1, 3, 0.5
    cfg = AlgorithmConfig(local=LOCAL, server_optimizer=ServerOptimizerConfig(lr=lr_g))
    algorithm = build_scaffold(cfg, num_clients=num_clients)
    model = Quadratic(2)
    x = OrderedDict(w=torch.tensor([0.0, 0.0]))
    client_states: dict[int, dict] = {}
    # hand-computed mirror
    hx, hc = [0.0, 0.0], [0.0, 0.0]
    hci = {k: [0.0, 0.0] for k in targets}
    for round_clients in ([0, 1], [1, 2]):
        extras = algorithm.server.broadcast_extras(x)
        assert extras[CONTROL]["w"].tolist() == pytest.approx(hc, abs=1e-6)
        updates: list[ClientUpdate] = []
        dys, dcs = [], []
        for cid in round_clients:
            set_state(model, x)
            result = algorithm.client.run(_ctx(model, cid, targets[cid], client_states.get(cid)),
                                          Broadcast(x, extras))
            client_states[cid] = result.client_state
            updates.append(result.update)
            corr = [hc[i] - hci[cid][i] for i in range(2)]
            y = _sgd_by_hand(hx, targets[cid], steps, lr, correction=corr)
            new_ci = [hci[cid][i] - hc[i] + (hx[i] - y[i]) / (steps * lr) for i in range(2)]
            dys.append([y[i] - hx[i] for i in range(2)])
            dcs.append([new_ci[i] - hci[cid][i] for i in range(2)])
            hci[cid] = new_ci
            assert result.update.payload["w"].tolist() == pytest.approx(dys[-1], abs=1e-5)
            assert result.update.aux[CONTROL_DELTA]["w"].tolist() == pytest.approx(
                dcs[-1], abs=1e-5)
            assert result.client_state[CONTROL]["w"].tolist() == pytest.approx(new_ci, abs=1e-5)
        x = algorithm.server.aggregate(x, updates, round=1)
        # weights: every client has 4 examples, so example weighting == uniform here
        for i in range(2):
            hx[i] += lr_g * sum(d[i] for d in dys) / len(dys)
            hc[i] += len(dcs) / num_clients * sum(d[i] for d in dcs) / len(dcs)
        assert x["w"].tolist() == pytest.approx(hx, abs=1e-5)
    assert algorithm.server.state_dict()[CONTROL]["w"].tolist() == pytest.approx(hc, abs=1e-5)


def test_scaffold_rejects_update_without_controls() -> None:
    algorithm = build_scaffold(AlgorithmConfig(local=LOCAL), num_clients=2)
    x = OrderedDict(w=torch.zeros(2))
    bad = ClientUpdate(0, OrderedDict(w=torch.zeros(2)), num_examples=1)
    with pytest.raises(ValueError, match="control_delta"):
        algorithm.server.check_update(bad, x)


def test_epochs_become_full_batches_and_steps_default() -> None:
    from fedfm.algorithms.local_train import num_optimizer_steps

    assert LocalTrainingConfig().steps == 10
    assert num_optimizer_steps(LocalTrainingConfig(epochs=1, batch_size=8), 20) == 2
    assert num_optimizer_steps(LocalTrainingConfig(epochs=2.5, batch_size=4), 20) == 13
    assert num_optimizer_steps(LocalTrainingConfig(epochs=1, batch_size=8, grad_accum=2),
                               40) == 2
    assert num_optimizer_steps(LocalTrainingConfig(epochs=1, batch_size=64), 10) == 1
    with pytest.raises(ValueError, match="not both"):
        LocalTrainingConfig(steps=3, epochs=1)


def test_scaffold_requires_sgd_local_steps() -> None:
    with pytest.raises(ValueError, match="must be 'sgd' for scaffold"):
        AlgorithmConfig(name="scaffold")


def test_group_by_length_keeps_every_example_once_and_cuts_padding() -> None:
    from fedfm.algorithms.local_train import batch_indices

    gen = torch.Generator().manual_seed(0)
    lengths = [int(x) for x in torch.randint(1, 60, (103,), generator=gen)]
    batches = list(batch_indices(103, 8, 12, torch.Generator().manual_seed(1), lengths))
    flat = [i for b in batches for i in b]
    assert len(batches) == 12 and all(len(b) == 8 for b in batches)
    assert len(set(flat)) == len(flat) == 96  # one epoch of full batches, no repeats

    def padded_tokens(batch_list):
        return sum(max(lengths[i] for i in b) * len(b) for b in batch_list)

    plain = list(batch_indices(103, 8, 12, torch.Generator().manual_seed(1)))
    assert padded_tokens(batches) < 0.8 * padded_tokens(plain)
    again = list(batch_indices(103, 8, 12, torch.Generator().manual_seed(1), lengths))
    assert again == batches
