"""LoRA-aware aggregation against its exactness claims: FLoRA's merged change and FFA-LoRA's
and FlexLoRA's aggregates equal the mean of the clients' products; FedIT's error is what the
dense matrices say; heterogeneous ranks cost bytes in proportion; HetLoRA pads, weights and
prunes; FedSA-LoRA keeps B at home."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch

import fedfm
from fedfm.api import build_algorithm, build_workload, check_components, seed_everything
from fedfm.config import ConfigError, RunConfig, config_from_dict
from fedfm.core import state as state_ops
from fedfm.core.client_store import MemoryClientStore
from fedfm.core.update import Broadcast, ClientUpdate
from fedfm.efficiency.lora.common import (
    client_ranks,
    full_factors,
    lora_pairs,
    stacked_product_norm,
)
from fedfm.efficiency.lora.hetlora import HetLoRAClient, TailRegularisedClient
from fedfm.runtime.local import LocalRuntime
from tests.conftest import lm_config_dict


def build(tmp_path: Path, name: str, clients: int = 4, **algorithm: Any):
    raw = lm_config_dict(tmp_path, algorithm={"name": name, **algorithm},
                         federation={"num_clients": clients, "clients_per_round": clients,
                                     "rounds": 1})
    config = config_from_dict(raw)
    check_components(config)
    seed_everything(config.seed)
    algo = build_algorithm(config)
    return config, algo, build_workload(config, algo)


def one_round(algo, workload, global_state, clients, round_index=1, store=None):
    """Run the clients, decode their uploads as the loop does: (raw updates, decoded)."""
    runtime = LocalRuntime(workload, store or MemoryClientStore())
    broadcast = Broadcast(global_state, algo.server.broadcast_extras(global_state), round_index)
    raw = [o.update for o in runtime.run_clients(clients, broadcast, round_index)]
    decode = getattr(algo.server, "decode_update", None)
    decoded = [decode(u, global_state) if decode else u for u in raw]
    return raw, decoded


def example_weights(updates: list[ClientUpdate]) -> list[float]:
    total = sum(u.num_examples for u in updates)
    return [u.num_examples / total for u in updates]


def dense_mean_product(factors, weights, key_a, key_b) -> torch.Tensor:
    return sum(w * f[key_b].double() @ f[key_a].double() for f, w in zip(factors, weights,
                                                                         strict=True))


def test_flora_merges_exactly_the_mean_of_the_clients_products(tmp_path: Path) -> None:
    config, algo, workload = build(tmp_path, "flora", lora={"ranks": [1, 2, 4, 3]})
    start = workload.get_state()
    pairs = lora_pairs(list(start))
    base_before = {ka: workload.model.get_submodule(ka.split(".lora_A.")[0])
                   .get_base_layer().weight.detach().clone() for ka, _ in pairs}
    raw, decoded = one_round(algo, workload, start, [0, 1, 2, 3])
    assert [u.payload[pairs[0][0]].shape[0] for u in raw] == [1, 2, 4, 3]  # rank slices
    new_global = algo.server.aggregate(start, decoded, 1)
    weights = example_weights(decoded)
    factors = [full_factors(start, u, pairs) for u in decoded]
    scaling = algo.server.scaling
    for key_a, key_b in pairs:
        module = workload.model.get_submodule(key_a.split(".lora_A.")[0])
        change = module.get_base_layer().weight.detach().double() - base_before[key_a].double()
        expected = scaling[key_a] * dense_mean_product(factors, weights, key_a, key_b)
        assert torch.allclose(change, expected, atol=1e-6, rtol=1e-5)
        assert torch.count_nonzero(new_global[key_b]) == 0  # fresh LoRA: B = 0
        assert not torch.equal(new_global[key_a], start[key_a])  # A drawn afresh
    stack = algo.server.broadcast_extras(new_global)["flora.stack"]
    assert stack[pairs[0][0]].shape[0] == 1 + 2 + 4 + 3  # what the clients must merge


def test_flora_state_dict_rebuilds_the_merged_base(tmp_path: Path) -> None:
    _, algo, workload = build(tmp_path / "a", "flora")
    start = workload.get_state()
    _, decoded = one_round(algo, workload, start, [0, 1])
    algo.server.aggregate(start, decoded, 1)
    saved = algo.server.state_dict()
    _, fresh_algo, fresh = build(tmp_path / "b", "flora")
    fresh_algo.server.load_state_dict(saved)
    for (name, merged), (_, rebuilt) in zip(workload.model.named_parameters(),
                                            fresh.model.named_parameters(), strict=True):
        if "base_layer" in name:
            assert torch.allclose(merged, rebuilt, atol=1e-7)


def test_ffa_lora_freezes_a_and_its_mean_is_the_mean_of_products(tmp_path: Path) -> None:
    _, algo, workload = build(tmp_path, "ffa_lora")
    start = workload.get_state()
    assert start and all(".lora_B." in k for k in start)  # A is neither trained nor sent
    a_before = {n: p.detach().clone() for n, p in workload.model.named_parameters()
                if ".lora_A." in n}
    _, updates = one_round(algo, workload, start, [0, 1, 2, 3])
    new_global = algo.server.aggregate(start, updates, 1)
    weights = example_weights(updates)
    for name, a in a_before.items():
        key_b = name.replace(".lora_A.", ".lora_B.")
        assert torch.equal(dict(workload.model.named_parameters())[name], a)
        clients = sum(w * (start[key_b] + u.payload[key_b]).double() @ a.double()
                      for w, u in zip(weights, updates, strict=True))
        assert torch.allclose(new_global[key_b].double() @ a.double(), clients, atol=1e-7)


def test_flexlora_is_exact_when_the_ranks_fit_and_optimal_when_they_do_not(
        tmp_path: Path) -> None:
    _, algo, workload = build(tmp_path, "flexlora", lora={"ranks": [1, 1, 2, 4]})
    start = workload.get_state()
    pairs = lora_pairs(list(start))
    _, fit = one_round(algo, workload, start, [0, 1, 2])  # 1 + 1 + 2 <= 4
    new_global = algo.server.aggregate(start, fit, 1)
    factors = [full_factors(start, u, pairs) for u in fit]
    weights = example_weights(fit)
    for key_a, key_b in pairs:
        mean = dense_mean_product(factors, weights, key_a, key_b)
        assert torch.allclose(new_global[key_b].double() @ new_global[key_a].double(), mean,
                              atol=1e-6)
    assert algo.server.round_metrics()["lora"]["energy_kept"] == pytest.approx(1.0)
    _, over = one_round(algo, workload, new_global, [1, 2, 3], round_index=2)  # 1 + 2 + 4 > 4
    newer = algo.server.aggregate(new_global, over, 2)
    factors = [full_factors(new_global, u, pairs) for u in over]
    weights = example_weights(over)
    key_a, key_b = pairs[0]
    mean = dense_mean_product(factors, weights, key_a, key_b)
    singular = torch.linalg.svdvals(mean)
    residual = torch.linalg.matrix_norm(mean - newer[key_b].double() @ newer[key_a].double())
    assert float(residual) == pytest.approx(float(singular[4:].pow(2).sum().sqrt()), rel=1e-4)
    assert algo.server.round_metrics()["lora"]["energy_kept"] < 1.0


def test_fedit_reports_the_factor_averaging_error_of_the_dense_matrices(
        tmp_path: Path) -> None:
    _, algo, workload = build(tmp_path, "fedit")
    start = workload.get_state()
    _, updates = one_round(algo, workload, start, [0, 1, 2])
    algo.server.aggregate(start, updates, 1)
    reported = algo.server.round_metrics()["lora"]["product_error"]
    weights = example_weights(updates)
    gap = norm = 0.0
    for key_a, key_b in lora_pairs(list(start)):
        a_i = [(start[key_a] + u.payload[key_a]).double() for u in updates]
        b_i = [(start[key_b] + u.payload[key_b]).double() for u in updates]
        mean_product = sum(w * b @ a for w, a, b in zip(weights, a_i, b_i, strict=True))
        product_of_means = (sum(w * b for w, b in zip(weights, b_i, strict=True))
                            @ sum(w * a for w, a in zip(weights, a_i, strict=True)))
        gap += float(torch.linalg.matrix_norm(mean_product - product_of_means) ** 2)
        norm += float(torch.linalg.matrix_norm(mean_product) ** 2)
    assert reported == pytest.approx((gap / norm) ** 0.5, rel=1e-6)
    assert reported > 1e-3  # a real error, not hidden


def test_stacked_product_norm_matches_the_dense_product() -> None:
    g = torch.Generator().manual_seed(0)
    blocks = [(torch.randn(30, r, generator=g, dtype=torch.float64),
               torch.randn(r, 20, generator=g, dtype=torch.float64))
              for r in (1, 3, 2)]
    dense = sum(u @ v for u, v in blocks)
    assert stacked_product_norm(blocks) == pytest.approx(float(torch.linalg.matrix_norm(dense)),
                                                         rel=1e-9)


def test_hetlora_pads_weights_by_norm_and_bytes_follow_rank(tmp_path: Path) -> None:
    _, algo, workload = build(tmp_path, "hetlora", lora={"ranks": [1, 2, 4, 4],
                                                         "self_prune": False})
    start = workload.get_state()
    pairs = lora_pairs(list(start))
    raw, decoded = one_round(algo, workload, start, [0, 1, 2, 3])
    sizes = [u.num_bytes() for u in raw]
    assert sizes[0] < sizes[1] < sizes[2] == sizes[3]
    new_global = algo.server.aggregate(start, decoded, 1)
    factors = [full_factors(start, u, pairs) for u in decoded]
    norms = [sum(stacked_product_norm([(f[kb], f[ka])]) ** 2 for ka, kb in pairs) ** 0.5
             for f in factors]
    weights = [n / sum(norms) for n in norms]
    for key in start:
        expected = sum(w * f[key].double() for w, f in zip(weights, factors, strict=True))
        assert torch.allclose(new_global[key].double(), expected, atol=1e-7)
    key_a, key_b = pairs[0]
    assert torch.count_nonzero(factors[0][key_a][1:]) == 0  # rank 1: padded with zeros
    assert torch.count_nonzero(factors[0][key_b][:, 1:]) == 0


def test_hetlora_tail_gradient_is_the_gradient_of_the_regulariser() -> None:
    from fedfm.config import LocalTrainingConfig

    client = TailRegularisedClient(LocalTrainingConfig(), gamma=0.5, strength=0.3)
    g = torch.Generator().manual_seed(1)
    a = torch.randn(4, 6, generator=g, requires_grad=True)
    b = torch.randn(5, 4, generator=g, requires_grad=True)
    torch.linalg.matrix_norm(b[:, 2:4] @ a[2:4]).mul(0.3).backward()
    expected_a, expected_b = a.grad.clone(), b.grad.clone()
    a.grad, b.grad = torch.zeros_like(a), torch.zeros_like(b)
    broadcast = Broadcast(OrderedDict(), {"lora_rank": {"rank": torch.tensor([4])}})
    hook = client.grad_hook(None, broadcast)  # type: ignore[arg-type]
    hook([("x.lora_A.default.weight", a), ("x.lora_B.default.weight", b)])
    assert torch.allclose(a.grad, expected_a) and torch.allclose(b.grad, expected_b)


def test_hetlora_prunes_its_rank_when_the_tail_shrinks(tmp_path: Path) -> None:
    config, algo, workload = build(tmp_path, "hetlora", lora={"ranks": [4, 4, 4, 4],
                                                              "prune_gamma": 0.5})
    client: HetLoRAClient = algo.client  # type: ignore[assignment]
    start = workload.get_state()
    store = MemoryClientStore()
    raw, _ = one_round(algo, workload, start, [0], store=store)
    assert raw[0].metadata["rank"] == 4  # no previous round to compare with
    tail = raw[0].metrics["tail_norm"]
    store.put(0, {"hetlora": {"rank": torch.tensor([4]),
                              "tail_norm": torch.tensor([tail * 10.0])}})  # it was larger
    raw, _ = one_round(algo, workload, start, [0], store=store)
    assert raw[0].metadata["rank"] == 2
    assert raw[0].payload[lora_pairs(list(start))[0][0]].shape[0] == 2
    assert client.rank_for(type("C", (), {"client_id": 0, "client_state": {
        "hetlora": {"rank": torch.tensor([2])}}})(), 4) == 2


def test_fedsa_lora_shares_a_keeps_b_and_evaluates_each_client_with_its_own_b(
        tmp_path: Path) -> None:
    raw = lm_config_dict(tmp_path, algorithm={"name": "fedsa_lora"},
                         federation={"num_clients": 3, "clients_per_round": 3, "rounds": 2})
    result = fedfm.run(config_from_dict(raw))
    final = result.final_state
    b_keys = [k for k in final if ".lora_B." in k]
    assert all(torch.count_nonzero(final[k]) == 0 for k in b_keys)  # never aggregated
    per_client = result.metrics[-1]["eval"]["per_client"]
    global_loss = result.metrics[-1]["eval"]["global"]["loss"]
    # with B = 0 the global model is the base; each client's own B changes its model
    assert any(abs(m["loss"] - global_loss) > 1e-4 for m in per_client.values())
    one = result.metrics[0]["clients"]["0"]
    _, algo, workload = build(tmp_path / "b", "fedsa_lora")
    start = workload.get_state()
    assert all(not torch.equal(final[k], start[k]) for k in start if ".lora_A." in k)  # shared
    uploads, _ = one_round(algo, workload, start, [0])
    assert all(".lora_B." not in k for k in uploads[0].payload)
    assert one["bytes_up"] == uploads[0].num_bytes()


def test_client_ranks_from_tiers() -> None:
    from fedfm.config import LoraAlgorithmConfig

    cfg = LoraAlgorithmConfig(tiers=[{"rank": 2, "fraction": 0.5}, {"rank": 8, "fraction": 0.3},
                                     {"rank": 16, "fraction": 0.2}])
    assert client_ranks(cfg, 10, 16) == [2] * 5 + [8] * 3 + [16] * 2
    assert client_ranks(cfg, 10, 8) == [2] * 5 + [8] * 5
    assert client_ranks(LoraAlgorithmConfig(), 3, 8) == [8, 8, 8]


@pytest.mark.parametrize("changes,message", [
    ({"algorithm": {"name": "fedavg", "lora": {"ranks": [2, 2, 2, 2]}}}, "only hetlora"),
    ({"algorithm": {"name": "hetlora", "lora": {"ranks": [2, 2]}}}, "2 entries for 4"),
    ({"algorithm": {"name": "flora", "lora": {"ranks": [2, 2, 2, 9]}}}, "exceeds adapter.r"),
    ({"algorithm": {"name": "hetlora", "lora": {"tiers": [{"rank": 2, "fraction": 0.5}]}}},
     "add up to 1"),
])
def test_bad_rank_rules_name_the_field(tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(lm_config_dict(tmp_path, **changes))


@pytest.mark.parametrize("changes,message", [
    ({"algorithm": {"name": "flora", "server_optimizer": {"name": "adam", "lr": 0.01}}},
     "server optimizer"),
    ({"algorithm": {"name": "hetlora", "compression": {"chain": [{"kind": "quantize"}]}}},
     "rank slice, which cannot be combined with algorithm.compression"),
    ({"algorithm": {"name": "fedsa_lora"}, "privacy": {"client_dp": {
        "noise_multiplier": 1.0, "clip_norm": 1.0}}}, "privacy.client_dp"),
    ({"algorithm": {"name": "flexlora", "aggregator": "median"}}, "would be ignored"),
    ({"algorithm": {"name": "ffa_lora"}, "adapter": {"kind": "ia3"}}, "use lora"),
])
def test_invalid_lora_combinations_are_refused(tmp_path: Path, changes: dict,
                                               message: str) -> None:
    config: RunConfig = config_from_dict(lm_config_dict(tmp_path, **changes))
    with pytest.raises(ConfigError, match=message):
        check_components(config)


def test_every_lora_method_runs_with_mixed_ranks_and_logs_its_bytes(tmp_path: Path) -> None:
    for name in ("flora", "flexlora", "hetlora"):
        raw = lm_config_dict(tmp_path / name, algorithm={"name": name, "lora": {
            "ranks": [1, 4, 2, 4]}}, federation={"num_clients": 4, "clients_per_round": 4,
                                                 "rounds": 2})
        result = fedfm.run(config_from_dict(raw))
        clients = result.metrics[0]["clients"]
        assert all(e["status"] == "ok" for e in clients.values())
        assert clients["0"]["bytes_up"] < clients["2"]["bytes_up"] < clients["1"]["bytes_up"]
        assert state_ops.global_norm(result.final_state) > 0
