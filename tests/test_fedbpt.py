"""FedBPT: the adapter becomes theta_0 + A z, clients search z by forward queries only (CMA-ES),
the server averages the means and step sizes."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch

import fedfm
from fedfm.api import build_algorithm, build_workload, check_components, seed_everything
from fedfm.config import BlackBoxConfig, ConfigError, LocalTrainingConfig, config_from_dict
from fedfm.core.algorithm import ClientContext
from fedfm.core.update import Broadcast, ClientUpdate
from fedfm.trust.ip.fedbpt import EXTRAS_KEY, Z_NAME, FedBPTClient
from tests.conftest import cls_config_dict

BPT = {"intrinsic_dim": 40, "population": 8, "generations": 3}


def config(tmp_path: Path, **changes):
    raw = cls_config_dict(tmp_path, adapter={"kind": "prompt_tuning", "num_virtual_tokens": 4},
                          algorithm={"name": "fedbpt", "bpt": BPT}, **changes)
    return config_from_dict(raw)


def test_z_is_the_only_tensor_and_the_prompt_follows_it(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    check_components(cfg)
    seed_everything(0)
    algo = build_algorithm(cfg)
    workload = build_workload(cfg, algo)
    state = workload.get_state()
    assert list(state) == [Z_NAME] and state[Z_NAME].shape == (40,)
    intrinsic = workload.model.fedbpt_intrinsic
    z = torch.randn(40)
    workload.set_state({Z_NAME: z})
    batch = workload.collate_fn()(workload.data.clients[0].train[:2])
    with torch.no_grad():
        workload.model(**batch)
    theta = torch.cat([p.detach().reshape(-1) for _, p in intrinsic.targets])
    assert torch.allclose(theta, intrinsic.theta0 + intrinsic.projection @ z, atol=1e-5)
    assert all(not p.requires_grad for n, p in workload.model.named_parameters()
               if n != Z_NAME)
    from fedfm.core.client_store import MemoryClientStore
    from fedfm.runtime.local import LocalRuntime

    runtime = LocalRuntime(workload, MemoryClientStore())
    update = next(iter(runtime.run_clients([0], Broadcast(state), 1))).update
    assert update.metrics["queries"] == 8 * 3
    assert all(p.grad is None for p in workload.model.parameters())  # no backward pass ran


class Quadratic:
    """A stand-in model whose loss is ||z - target||^2: CMA-ES must find target."""

    def __init__(self, target: torch.Tensor) -> None:
        self.target = target
        self.z = torch.zeros_like(target)


def quadratic_context(target: torch.Tensor, seed: int = 3) -> tuple[ClientContext, Quadratic]:
    model = Quadratic(target)

    def set_state(state):
        model.z = state[Z_NAME].clone()

    ctx = ClientContext(
        client_id=0, round=1, seed=seed, model=torch.nn.Identity(), get_state=dict,
        set_state=set_state, train_examples=[{"x": i} for i in range(64)],
        collate=lambda rows: {}, device=torch.device("cpu"),
        loss_fn=lambda module, batch: ((model.z - model.target) ** 2).sum())
    return ctx, model


def test_clients_search_by_queries_only_and_cma_es_finds_the_minimum() -> None:
    target = torch.linspace(-1.0, 1.0, 6)
    ctx, _ = quadratic_context(target)
    client = FedBPTClient(LocalTrainingConfig(batch_size=4),
                          BlackBoxConfig(intrinsic_dim=6, population=10, generations=60,
                                         sigma=0.5))
    start = OrderedDict([(Z_NAME, torch.zeros(6))])
    update = client.run(ctx, Broadcast(start)).update
    found = start[Z_NAME] + update.payload[Z_NAME]
    assert float((found - target).norm()) < 0.05 * float(target.norm())
    assert update.metrics["queries"] == 10 * 60
    assert 0 < float(update.aux[EXTRAS_KEY]["sigma"]) < 0.5  # the step size shrank


def test_a_run_averages_means_and_step_sizes(tmp_path: Path) -> None:
    result = fedfm.run(config(tmp_path, federation={"num_clients": 3, "clients_per_round": 3,
                                                    "rounds": 2}))
    first = result.metrics[0]["clients"]
    assert all(e["queries"] == 8 * 3 for e in first.values())
    assert all(e["bytes_up"] < 40 * 4 + 400 for e in first.values())  # z and one step size
    assert list(result.final_state) == [Z_NAME]


def test_server_averages_the_clients_step_sizes(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    algo = build_algorithm(cfg)
    like = OrderedDict([(Z_NAME, torch.zeros(40))])
    updates = [ClientUpdate(i, OrderedDict([(Z_NAME, torch.full((40,), float(i)))]), 1,
                            aux={EXTRAS_KEY: OrderedDict(sigma=torch.tensor([s]))})
               for i, s in enumerate([0.2, 0.4])]
    new = algo.server.aggregate(like, updates, 1)
    assert torch.allclose(new[Z_NAME], torch.full((40,), 0.5))
    assert float(algo.server.broadcast_extras(new)[EXTRAS_KEY]["sigma"]) == pytest.approx(0.3)
    saved = algo.server.state_dict()
    other = build_algorithm(cfg)
    other.server.load_state_dict(saved)
    assert other.server.sigma == pytest.approx(0.3)
    with pytest.raises(ValueError, match="step size"):
        algo.server.check_update(ClientUpdate(0, like, 1), like)


@pytest.mark.parametrize("changes,message", [
    ({"adapter": {"kind": "lora"}}, "use prompt_tuning"),
    ({"privacy": {"client_dp": {"noise_multiplier": 1.0, "clip_norm": 1.0}}},
     "privacy.client_dp"),
])
def test_invalid_fedbpt_combinations(tmp_path: Path, changes: dict, message: str) -> None:
    raw = cls_config_dict(tmp_path, adapter={"kind": "prompt_tuning"},
                          algorithm={"name": "fedbpt", "bpt": BPT})
    from tests.conftest import deep_update

    with pytest.raises(ConfigError, match=message):
        check_components(config_from_dict(deep_update(raw, changes)))
