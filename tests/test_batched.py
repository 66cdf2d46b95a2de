"""The batched runtime (issue 3, item 4): K clients in one forward/backward must produce the
per-client updates the local runtime produces, client by client."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fedfm import api
from fedfm.config import RunConfig, config_from_dict
from fedfm.core.client_store import MemoryClientStore
from fedfm.core.update import Broadcast
from fedfm.runtime.batched import BatchedRuntime
from fedfm.runtime.local import LocalRuntime
from tests.conftest import SMALL_LLAMA, cls_config_dict, lm_config_dict

SMALL_BERT = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
              "num_attention_heads": 4, "hidden_dropout_prob": 0.0,
              "attention_probs_dropout_prob": 0.0}


def cls_config(tmp_path: Path, **changes: Any) -> RunConfig:
    base = {"model": {"name": "tiny-bert", "max_length": 48, "config_overrides": SMALL_BERT},
            "federation": {"num_clients": 5, "clients_per_round": 5, "rounds": 1},
            "runtime": {"kind": "batched", "clients_per_pass": 3}}
    return config_from_dict(cls_config_dict(tmp_path, **{**base, **changes}))


def lm_config(tmp_path: Path, **changes: Any) -> RunConfig:
    base = {"model": {"name": "tiny-llama", "max_length": 64, "config_overrides": SMALL_LLAMA},
            "adapter": {"kind": "lora", "r": 4, "alpha": 8},
            "federation": {"num_clients": 4, "clients_per_round": 4, "rounds": 1},
            "runtime": {"kind": "batched", "clients_per_pass": 4}}
    return config_from_dict(lm_config_dict(tmp_path, **{**base, **changes}))


def updates(config: RunConfig, runtime_cls: type, dtype: torch.dtype,
            perturb: float = 0.0, nudge_seed: int = 6) -> dict[int, dict[str, torch.Tensor]]:
    """Each client's payload and aux States after one round from the same broadcast."""
    algorithm = api.build_algorithm(config)
    workload = api.build_workload(config, algorithm)
    workload.model.to(dtype)
    store = MemoryClientStore()
    global_state = workload.get_state()
    generator = torch.Generator().manual_seed(5)
    nudges = torch.Generator().manual_seed(nudge_seed)
    for name, tensor in global_state.items():  # LoRA B starts at zero: move off it
        if "lora_B" in name:
            tensor.normal_(0, 0.05, generator=generator)
        if perturb:
            tensor.mul_(1 + perturb * torch.randn(tensor.shape, generator=nudges,
                                                  dtype=tensor.dtype).sign())
    extras = algorithm.server.broadcast_extras(global_state)
    if "control" in extras:  # SCAFFOLD: a non-zero server control, and a stored client one
        extras = {"control": {k: torch.full_like(v, 0.01) for k, v in global_state.items()}}
        store.put(1, {"control": {k: torch.full_like(v, -0.02) for k, v in
                                  global_state.items()}})
    runtime = runtime_cls(workload, store)
    if isinstance(runtime, BatchedRuntime):
        assert runtime.fallback is None, runtime.fallback
    broadcast = Broadcast(global_state=global_state, extras=extras, round=1)
    ids = list(range(config.federation.num_clients))
    out = {}
    for outcome in runtime.run_clients(ids, broadcast, 1):
        assert outcome.update is not None
        states = {f"payload/{k}": v for k, v in outcome.update.payload.items()}
        for aux_name, aux in outcome.update.aux.items():
            states.update({f"{aux_name}/{k}": v for k, v in aux.items()})
        states["metric/train_loss"] = torch.tensor([outcome.update.metrics["train_loss"]],
                                                   dtype=torch.float64)
        out[outcome.client_id] = states
    return out


def relative_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    diff = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in b)
    norm = sum(float(b[k].double().pow(2).sum()) for k in b)
    return (diff / norm) ** 0.5


def worst_gap(a: dict[int, dict], b: dict[int, dict]) -> float:
    assert a.keys() == b.keys()
    return max(relative_gap(a[c], b[c]) for c in b)


CASES = {
    "fedavg_adamw_clip_epochs": dict(algorithm={"name": "fedavg", "local": {
        "steps": None, "epochs": 1, "batch_size": 8, "lr": 1e-2, "max_grad_norm": 0.5,
        "schedule": "cosine", "warmup_steps": 1}}),
    "fedprox_accum": dict(algorithm={"name": "fedprox", "mu": 0.5, "local": {
        "steps": 3, "batch_size": 4, "grad_accum": 2, "lr": 1e-2}}),
    "scaffold_sgd": dict(algorithm={"name": "scaffold", "local": {
        "steps": 3, "batch_size": 8, "lr": 5e-2, "optimizer": "sgd"}}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_batched_classification_equals_local_in_float64(tmp_path: Path, case: str) -> None:
    config = cls_config(tmp_path, **CASES[case])
    local = updates(config, LocalRuntime, torch.float64)
    batched = updates(config, BatchedRuntime, torch.float64)
    assert worst_gap(batched, local) < 1e-6


def test_clients_with_fewer_steps_stop_early_and_still_match(tmp_path: Path) -> None:
    config = cls_config(tmp_path, **CASES["fedavg_adamw_clip_epochs"])
    algorithm = api.build_algorithm(config)
    workload = api.build_workload(config, algorithm)
    sizes = [len(c.train) for c in workload.data.clients]
    assert len({size // 8 for size in sizes}) > 1  # different step counts in one pass
    local = updates(config, LocalRuntime, torch.float64)
    batched = updates(config, BatchedRuntime, torch.float64)
    for client_id in local:
        assert relative_gap(batched[client_id], local[client_id]) < 1e-6


@pytest.mark.parametrize("packing", [False, True])
def test_batched_causal_lm_equals_local_in_float64(tmp_path: Path, packing: bool) -> None:
    config = lm_config(tmp_path, algorithm={"name": "fedavg", "local": {
        "steps": 3, "batch_size": 2, "lr": 1e-2, "packing": packing}})
    local = updates(config, LocalRuntime, torch.float64)
    batched = updates(config, BatchedRuntime, torch.float64)
    assert worst_gap(batched, local) < 1e-6


def test_batched_float32_is_within_the_local_runtimes_own_noise(tmp_path: Path) -> None:
    """The local runtime's noise: how far its own fp32 updates move when the starting State
    moves by one float32 rounding (relative 2**-24 per element, three draws; the largest) -- a
    perturbation the arithmetic cannot tell from rounding. The batched runtime must stay
    within it."""
    config = cls_config(tmp_path, **CASES["fedavg_adamw_clip_epochs"])
    local = updates(config, LocalRuntime, torch.float32)
    local_again = updates(config, LocalRuntime, torch.float32)
    assert worst_gap(local_again, local) == 0.0  # CPU kernels are deterministic
    noise = max(worst_gap(updates(config, LocalRuntime, torch.float32, perturb=2.0**-24,
                                  nudge_seed=seed), local) for seed in (6, 7, 8))
    batched = updates(config, BatchedRuntime, torch.float32)
    assert noise > 0.0
    assert worst_gap(batched, local) <= noise


def test_unsupported_adapters_fall_back_to_local_with_a_reason(tmp_path: Path,
                                                                caplog) -> None:
    config = cls_config(tmp_path, adapter={"kind": "ia3"})
    algorithm = api.build_algorithm(config)
    workload = api.build_workload(config, algorithm)
    with caplog.at_level("WARNING"):
        runtime = BatchedRuntime(workload, MemoryClientStore())
    assert runtime.fallback is not None and "ia3" in runtime.fallback
    assert "runs clients one by one" in caplog.text


def test_a_batched_run_end_to_end(tmp_path: Path) -> None:
    config = cls_config(tmp_path, federation={"num_clients": 4, "clients_per_round": 4,
                                              "rounds": 2})
    result = api.run(config, console=False)
    assert result.summary["rounds"] == 2
    assert all(r["completed"] == [0, 1, 2, 3] for r in result.metrics if "completed" in r)


def test_lora_on_an_embedding_falls_back_to_local(tmp_path: Path) -> None:
    config = lm_config(tmp_path, adapter={"kind": "lora", "r": 4, "alpha": 8,
                                          "target_modules": ["q_proj", "embed_tokens"]})
    algorithm = api.build_algorithm(config)
    workload = api.build_workload(config, algorithm)
    runtime = BatchedRuntime(workload, MemoryClientStore())
    assert runtime.fallback is not None and "embed_tokens" in runtime.fallback
    broadcast = Broadcast(global_state=workload.get_state(), extras={}, round=1)
    outcomes = list(runtime.run_clients([0, 1], broadcast, 1))
    assert [o.client_id for o in outcomes] == [0, 1] and all(o.update for o in outcomes)
