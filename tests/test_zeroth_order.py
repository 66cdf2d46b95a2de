"""Zeroth-order tuning against its math: the two-point estimate, the server's replay equals the
client's own steps, FedKSeed's upload is a few kilobytes on W1, no backward pass, hostile pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import fedfm
from fedfm.api import build_algorithm, build_workload, check_components, seed_everything
from fedfm.config import ConfigError, config_from_dict
from fedfm.core import state as state_ops
from fedfm.core.client_store import MemoryClientStore
from fedfm.core.update import Broadcast, ClientUpdate
from fedfm.efficiency.zeroth_order.common import dense_step, directions, two_point
from fedfm.efficiency.zeroth_order.fedkseed import check_pairs, encode_pairs
from fedfm.runtime.local import LocalRuntime
from tests.conftest import lm_config_dict

ZO_LOCAL = {"optimizer": "sgd", "lr": 1e-3, "steps": 12, "batch_size": 4}


def build(tmp_path: Path, name: str, model: dict | None = None, **algorithm: Any):
    changes: dict[str, Any] = {"algorithm": {"name": name, "local": ZO_LOCAL, **algorithm}}
    if model is not None:
        changes["model"] = model
    config = config_from_dict(lm_config_dict(tmp_path, **changes))
    check_components(config)
    seed_everything(config.seed)
    algo = build_algorithm(config)
    return config, algo, build_workload(config, algo)


def test_two_point_estimate_is_the_directional_derivative() -> None:
    """For L = ||theta||^2 the central difference is exact: g = 2 theta . z."""
    theta = torch.nn.Parameter(torch.randn(7, 3, dtype=torch.float64))
    named = [("w", theta)]
    before = theta.detach().clone()
    grad, _ = two_point(None, named, {}, seed=5, eps=1e-3,  # type: ignore[arg-type]
                        loss_of=lambda batch: (theta.detach() ** 2).sum())
    z = dict(directions(5, [("w", theta.shape)]))["w"].double()
    assert grad == pytest.approx(float(2 * (before * z).sum()), rel=1e-6)
    assert torch.allclose(theta.detach(), before, atol=1e-12)  # restored


def test_directions_do_not_depend_on_the_order_tensors_are_held_in() -> None:
    shapes = [("b", torch.Size([3])), ("a", torch.Size([2, 2]))]
    one = dict(directions(9, shapes))
    other = dict(directions(9, list(reversed(shapes))))
    assert all(torch.equal(one[k], other[k]) for k in one)


def test_server_replay_equals_the_clients_own_steps(tmp_path: Path) -> None:
    _, algo, workload = build(tmp_path, "fedkseed", zo={"num_seeds": 32})
    start = workload.get_state()
    runtime = LocalRuntime(workload, MemoryClientStore())
    update = next(iter(runtime.run_clients([0], Broadcast(start), 1))).update
    moved = state_ops.sub(workload.get_state(), start)  # where the client really went
    replayed = algo.server.decode_update(update, start).payload
    scale = max(float(v.abs().max()) for v in moved.values())
    assert scale > 0
    assert state_ops.max_abs_diff(moved, replayed) <= 1e-4 * scale
    assert all(p.grad is None for p in workload.model.parameters())  # no backward pass ran


def test_fedkseed_uploads_under_20_kb_per_client_per_round_on_w1(tmp_path: Path) -> None:
    """W1's model (tiny-llama preset: hidden 256, 4 layers, vocab 8192) with LoRA r=8."""
    local = {**ZO_LOCAL, "steps": 200, "batch_size": 2}
    raw = lm_config_dict(tmp_path, adapter={"kind": "lora", "r": 8, "alpha": 16},
                         algorithm={"name": "fedkseed", "local": local},
                         federation={"num_clients": 4, "clients_per_round": 2, "rounds": 1},
                         eval={"enabled": False})
    raw["model"] = {"name": "tiny-llama", "max_length": 48}
    config = config_from_dict(raw)
    assert config.model.config_overrides == {}
    result = fedfm.run(config)
    for entry in result.metrics[0]["clients"].values():
        assert entry["status"] == "ok"
        assert entry["steps"] == 200
        assert entry["bytes_up"] < 20 * 1024
    dense = state_ops.num_bytes(result.final_state)  # what FedAvg + LoRA uploads
    per_client = result.summary["bytes_up"] / 2
    assert dense / per_client > 50


def pairs(indices: list[int], grads: list[float]) -> dict[str, torch.Tensor]:
    return encode_pairs(torch.tensor(indices, dtype=torch.int16), torch.tensor(grads))


@pytest.mark.parametrize("payload,message", [
    (pairs([0, 32], [0.1, 0.2]), "outside the pool of 32"),
    (pairs([0, 5], [0.1, float("inf")]), "not finite"),
    ({"pairs": pairs([0, 5], [0.1, 0.2])["pairs"][:-1]}, "11 bytes is not"),
    ({"pairs": torch.zeros(12)}, "one 1-D uint8 tensor"),
    ({**pairs([1], [1.0]), "extra": torch.zeros(1)}, "one 1-D uint8 tensor"),
    ({"pairs": torch.zeros(0, dtype=torch.uint8)}, "0 bytes is not"),
])
def test_hostile_seed_pairs_are_refused(payload: dict, message: str) -> None:
    indices, grads = check_pairs(pairs([0, 5, 31], [0.1, -2.0, 3.0]), 32)
    assert indices.tolist() == [0, 5, 31] and grads.tolist() == pytest.approx([0.1, -2.0, 3.0])
    with pytest.raises(ValueError, match=message):
        check_pairs(payload, 32)


def test_a_bad_upload_is_rejected_and_the_round_goes_on(tmp_path: Path) -> None:
    _, algo, workload = build(tmp_path, "fedkseed", zo={"num_seeds": 16})
    start = workload.get_state()
    bad = ClientUpdate(0, pairs([99], [1.0]), num_examples=3)
    with pytest.raises(ValueError, match="outside the pool of 16"):
        algo.server.decode_update(bad, start)


def test_dense_step_is_linear_in_the_scalars() -> None:
    like = {"a": torch.zeros(4, 3), "b": torch.zeros(5)}
    one = dense_step(like, [(11, 2.0)], lr=0.5)
    two = dense_step(like, [(11, 1.0), (11, 1.0)], lr=0.5)
    z = dict(directions(11, [(k, v.shape) for k, v in like.items()]))
    assert state_ops.max_abs_diff(one, two) < 1e-6
    assert torch.allclose(one["a"], -0.5 * 2.0 * z["a"])


def test_fedzo_uploads_its_dense_delta_from_forward_passes_only(tmp_path: Path) -> None:
    _, algo, workload = build(tmp_path, "fedzo", zo={"directions": 3})
    start = workload.get_state()
    runtime = LocalRuntime(workload, MemoryClientStore())
    update = next(iter(runtime.run_clients([1], Broadcast(start), 1))).update
    assert set(update.payload) == set(start)
    assert state_ops.global_norm(update.payload) > 0
    assert update.metrics["forward_passes"] == 2 * 3 * ZO_LOCAL["steps"]
    assert all(p.grad is None for p in workload.model.parameters())


@pytest.mark.parametrize("changes,message", [
    ({"algorithm": {"name": "fedkseed"}}, "local.optimizer 'sgd'"),
    ({"algorithm": {"name": "fedzo", "local": {**ZO_LOCAL, "momentum": 0.9}}}, "momentum 0"),
])
def test_zeroth_order_needs_plain_sgd(tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(lm_config_dict(tmp_path, **changes))


def test_fedkseed_refuses_what_cannot_carry_its_pairs(tmp_path: Path) -> None:
    raw = lm_config_dict(tmp_path, algorithm={
        "name": "fedkseed", "local": ZO_LOCAL,
        "compression": {"chain": [{"kind": "quantize", "bits": 8}]}})
    with pytest.raises(ConfigError, match="already a few kilobytes"):
        check_components(config_from_dict(raw))
