"""Split learning (SplitFed / SplitLoRA): the cut is real in the autograd sense, a client's round
equals centralized training of the unsplit model, a run equals FedAvg (SplitFed V1), and the
bytes that cross the cut are counted exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import fedfm
from fedfm.algorithms.fedavg import build_delta_server
from fedfm.algorithms.local_train import LocalTrainer, train_locally, trainable_parameters
from fedfm.api import build_algorithm, build_workload, check_components, seed_everything
from fedfm.config import (
    AlgorithmConfig,
    ConfigError,
    LocalTrainingConfig,
    RunConfig,
    SplitConfig,
    config_from_dict,
)
from fedfm.core import state as state_ops
from fedfm.core.client_store import MemoryClientStore
from fedfm.core.update import Broadcast, ClientUpdate
from fedfm.efficiency.split import check_split
from fedfm.efficiency.split.cut import Wire
from fedfm.efficiency.split.splitfed import SplitFedClient, SplitFedServer
from fedfm.runtime.local import LocalRuntime
from tests.conftest import cls_config_dict, lm_config_dict

LM_LOCAL = {"steps": 2, "batch_size": 3, "grad_accum": 2, "lr": 5e-3, "max_grad_norm": 0.5}
CLS_LOCAL = {"steps": 3, "batch_size": 4, "optimizer": "sgd", "momentum": 0.9, "lr": 5e-2}
SGD = {"steps": 2, "batch_size": 4, "optimizer": "sgd", "lr": 0.5}


FAST = {"attention": "eager"}  # no attention timing when the workload is built


def lm(tmp_path: Path, local: dict[str, Any] = LM_LOCAL, **split: Any) -> RunConfig:
    return config_from_dict(lm_config_dict(
        tmp_path, runtime=FAST, algorithm={"name": "splitfed", "local": local, "split": split}))


def cls(tmp_path: Path, local: dict[str, Any] = CLS_LOCAL, **split: Any) -> RunConfig:
    return config_from_dict(cls_config_dict(
        tmp_path, runtime=FAST, algorithm={"name": "splitfed", "local": local, "split": split}))


def built(config: RunConfig) -> tuple[Any, LocalRuntime]:
    check_components(config)
    check_split(config)
    seed_everything(config.seed)
    algorithm = build_algorithm(config)
    workload = build_workload(config, algorithm)
    return algorithm, LocalRuntime(workload, MemoryClientStore())


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunConfig, Any, LocalRuntime]:
    """One tiny-llama workload cut after block 0, shared (every test starts from ``start``)."""
    config = lm(tmp_path_factory.mktemp("split"), cut_layer=1)
    algorithm, runtime = built(config)
    return config, algorithm, runtime


def sgd_client(config: RunConfig, **split: Any) -> SplitFedClient:
    return SplitFedClient(LocalTrainingConfig(**SGD),
                          config.algorithm.split.model_copy(update=split))


def split_round(runtime: LocalRuntime, client: Any, start: dict[str, torch.Tensor]
                ) -> tuple[dict[str, torch.Tensor], ClientUpdate]:
    runtime.workload.set_state(start)
    result = client.run(runtime.client_context(0, 1), Broadcast(start))
    return runtime.workload.get_state(), result.update


def centralized_round(runtime: LocalRuntime, config: RunConfig,
                      start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    runtime.workload.set_state(start)
    train_locally(runtime.client_context(0, 1), config.algorithm.local)
    return runtime.workload.get_state()


def drawn_batches(runtime: LocalRuntime, config: RunConfig) -> list[dict[str, torch.Tensor]]:
    """The micro-batches client 0 trains on in round 1, drawn again by a fresh trainer."""
    ctx = runtime.client_context(0, 1)
    trainer = LocalTrainer(ctx, config.algorithm.local, trainable_parameters(ctx.model))
    count = trainer.total_steps * config.algorithm.local.grad_accum
    return [ctx.collate(trainer.next_rows()) for _ in range(count)]


def client_side(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in state if ".layers.0." in k or ".layer.0." in k]


@pytest.mark.parametrize("kind", ["lm", "cls"])
def test_a_client_round_equals_centralized_training_and_counts_its_bytes(
        tmp_path: Path, kind: str, llama: tuple[RunConfig, Any, LocalRuntime]) -> None:
    if kind == "lm":
        config, algorithm, runtime = llama
    else:
        config = cls(tmp_path, cut_layer=1)
        algorithm, runtime = built(config)
    start = runtime.workload.get_state()
    split_state, update = split_round(runtime, algorithm.client, start)
    central = centralized_round(runtime, config, start)
    assert state_ops.max_abs_diff(split_state, central) < 1e-6
    assert state_ops.max_abs_diff(split_state, start) > 1e-4  # it did train
    hidden = runtime.workload.model.config.hidden_size
    batches = drawn_batches(runtime, config)
    activations = sum(b["input_ids"].numel() * hidden * 4 for b in batches)
    metrics = update.metrics
    assert metrics["split_activation_bytes"] == activations
    assert metrics["split_gradient_bytes"] == activations
    assert metrics["split_label_bytes"] == sum(b["labels"].numel() * 8 for b in batches)
    assert metrics["split_mask_bytes"] == sum(b["attention_mask"].numel() * 8 for b in batches)
    keys = client_side(start)
    assert keys and len(keys) < len(start)
    assert metrics["split_client_state_bytes"] == state_ops.num_bytes(
        state_ops.select(start, keys))
    assert metrics["split_client_delta_bytes"] == state_ops.num_bytes(
        state_ops.select(update.payload, keys))


def test_only_the_returned_gradient_reaches_the_client_part(
        llama: tuple[RunConfig, Any, LocalRuntime], monkeypatch: pytest.MonkeyPatch) -> None:
    config, _, runtime = llama
    start = runtime.workload.get_state()
    monkeypatch.setattr(Wire, "return_gradient", lambda self, grad: torch.zeros_like(grad))
    trained, _ = split_round(runtime, sgd_client(config), start)
    client = set(client_side(start))
    assert all(torch.equal(trained[k], start[k]) for k in client)
    moved = [k for k in start if k not in client and not torch.equal(trained[k], start[k])]
    assert any(".layers.1." in k for k in moved)


def test_bf16_wire_halves_the_bytes_and_differs_slightly(
        llama: tuple[RunConfig, Any, LocalRuntime]) -> None:
    config, _, runtime = llama
    start = runtime.workload.get_state()
    fp32, fp32_update = split_round(runtime, sgd_client(config), start)
    bf16, bf16_update = split_round(runtime, sgd_client(config, activation_dtype="bfloat16"),
                                    start)
    gap = state_ops.max_abs_diff(fp32, bf16)
    assert 0 < gap < 0.05 * state_ops.max_abs_diff(fp32, start)
    for name in ("split_activation_bytes", "split_gradient_bytes"):
        assert bf16_update.metrics[name] * 2 == fp32_update.metrics[name]


def test_a_run_equals_fedavg_and_books_what_crossed_the_wire(tmp_path: Path) -> None:
    common = {"federation": {"num_clients": 3, "clients_per_round": 2, "rounds": 2},
              "model": {"max_length": 48}, "eval": {"every": 2, "max_examples": 4},
              "runtime": FAST}
    local = {"steps": 1, "batch_size": 2, "lr": 5e-3}
    raw = lm_config_dict(tmp_path, **common, algorithm={"name": "splitfed", "local": local,
                                                        "split": {"cut_layer": 1}})
    split = fedfm.run(config_from_dict(raw))
    plain = fedfm.run(config_from_dict(lm_config_dict(
        tmp_path, **common, algorithm={"name": "fedavg", "local": local})))
    assert state_ops.max_abs_diff(split.final_state, plain.final_state) < 1e-5
    for record in split.metrics:
        for client in record["clients"].values():
            up = sum(client[k] for k in ("split_client_delta_bytes", "split_activation_bytes",
                                         "split_label_bytes", "split_mask_bytes"))
            down = client["split_client_state_bytes"] + client["split_gradient_bytes"]
            assert (client["bytes_up"], client["bytes_down"]) == (up, down)
        assert record["bytes_up"] == sum(c["bytes_up"] for c in record["clients"].values())


def test_the_batched_runtime_runs_split_clients_one_by_one(
        llama: tuple[RunConfig, Any, LocalRuntime]) -> None:
    from fedfm.runtime.batched import unsupported_reason

    _, _, runtime = llama
    assert "SplitFedClient" in (unsupported_reason(runtime.workload) or "")


def test_check_split_refuses_what_it_cannot_do(
        tmp_path: Path, llama: tuple[RunConfig, Any, LocalRuntime]) -> None:
    with pytest.raises(ConfigError, match=r"algorithm\.split\.cut_layer=2 .* 2 transformer"):
        check_split(lm(tmp_path, cut_layer=2))  # SMALL_LLAMA has 2 blocks
    server = SplitFedServer(build_delta_server(AlgorithmConfig()), SplitConfig(cut_layer=2))
    with pytest.raises(ConfigError, match=r"algorithm\.split\.cut_layer=2 .* 2 transformer"):
        server.bind_workload(llama[2].workload)  # a model whose size only loading tells
    refused = {"privacy": {"dp_sgd": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}}}
    with pytest.raises(ConfigError, match="privacy.dp_sgd"):
        check_split(config_from_dict(lm_config_dict(
            tmp_path, **refused, algorithm={"name": "splitfed"})))
    with pytest.raises(ConfigError, match="prefix_tuning"):
        check_split(config_from_dict(lm_config_dict(
            tmp_path, adapter={"kind": "prefix_tuning"}, algorithm={"name": "splitfed"})))
    check_split(lm(tmp_path, cut_layer=1))
    check_split(config_from_dict(lm_config_dict(tmp_path, **refused)))  # not splitfed


def test_a_parameter_on_both_sides_of_the_cut_is_refused(tmp_path: Path) -> None:
    raw = lm_config_dict(tmp_path, adapter={"kind": "full"}, runtime=FAST,
                         algorithm={"name": "splitfed", "local": SGD, "split": {"cut_layer": 1}})
    raw["model"] = {"name": "tiny-gpt2", "max_length": 64}
    config = config_from_dict(raw)  # GPT-2 ties its input and output embeddings
    algorithm, runtime = built(config)
    with pytest.raises(ValueError, match="both sides of the cut"):
        split_round(runtime, algorithm.client, runtime.workload.get_state())


def test_a_cut_inside_the_frozen_prefix_drops_the_prefix_cache(tmp_path: Path) -> None:
    raw = lm_config_dict(tmp_path, adapter={"kind": "last_layers", "num_layers": 1},
                         runtime=FAST,
                         algorithm={"name": "splitfed", "local": SGD, "split": {"cut_layer": 1}})
    config = config_from_dict(raw)  # block 0 frozen: the cache would replay the cut block
    algorithm, runtime = built(config)
    assert runtime.workload.speed.cache is None
    assert "split learning" in runtime.workload.speed.prefix_cache_note
    start = runtime.workload.get_state()
    trained, update = split_round(runtime, algorithm.client, start)
    assert state_ops.max_abs_diff(trained, centralized_round(runtime, config, start)) < 1e-6
    assert update.metrics["split_activation_bytes"] > 0
    assert update.metrics["split_gradient_bytes"] == 0  # nothing trains on the client
    assert update.metrics["split_client_state_bytes"] == 0
