"""The skew methods against their math (issue 11, items 1 and 5): FedLC's calibrated logits and
loss, FedRS's restricted softmax, MOON's contrastive term, FedNova's normalized weights for
unequal local steps, FedBABU's head bitwise frozen across rounds; each composes with FedProx,
SCAFFOLD, FedOpt and several adapters; what cannot compose is refused at config time."""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch

import fedfm
from fedfm.adaptability.heterogeneity.base import class_counts, pooled_representation
from fedfm.adaptability.heterogeneity.fedlc import LogitCalibration, calibrated_logits
from fedfm.adaptability.heterogeneity.fednova import (
    NovaServer,
    gradient_weight_norm,
    nova_scales,
)
from fedfm.adaptability.heterogeneity.fedrs import RestrictedSoftmax, restricted_logits
from fedfm.adaptability.heterogeneity.moon import STATE_KEY, contrastive_loss
from fedfm.algorithms.aggregation import WeightedMean
from fedfm.algorithms.fedavg import DeltaServer
from fedfm.algorithms.server_opt import build_server_optimizer
from fedfm.api import build_algorithm, build_workload, check_components, seed_everything
from fedfm.config import (
    ConfigError,
    LocalTrainingConfig,
    ServerOptimizerConfig,
    config_from_dict,
)
from fedfm.core.client_store import MemoryClientStore
from fedfm.core.update import Broadcast, ClientUpdate
from fedfm.runtime.local import LocalRuntime
from tests.conftest import cls_config_dict, deep_update, lm_config_dict

HEAD = ".classifier."


def raw(tmp_path: Path, skew: list[dict[str, Any]], **changes: Any) -> dict[str, Any]:
    base = cls_config_dict(tmp_path, data={"max_rows": 96, "max_validation_rows": 16},
                           runtime={"num_threads": 1},
                           algorithm={"skew": skew, "local": {"steps": 2}})
    return deep_update(base, changes)


def final_state(raw_config: dict[str, Any]) -> OrderedDict[str, torch.Tensor]:
    result = fedfm.run(config_from_dict(raw_config), console=False)
    return result.final_state


# ------------------------------------------------------------------------------- FedLC


def test_fedlc_calibrated_logits_and_loss_match_the_hand_computation() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    counts = torch.tensor([16.0, 1.0, 0.0])  # 16^(-1/4) = 0.5, 1^(-1/4) = 1, absent
    calibrated = calibrated_logits(logits, counts, tau=2.0)
    assert calibrated[0, 0].item() == pytest.approx(1.0 - 2.0 * 0.5)
    assert calibrated[0, 1].item() == pytest.approx(2.0 - 2.0 * 1.0)
    assert calibrated[0, 2].item() == float("-inf")  # an absent class leaves the softmax
    loss = LogitCalibration(tau=2.0).loss(logits, torch.tensor([0]), counts)
    expected = -math.log(math.exp(0.0) / (math.exp(0.0) + math.exp(0.0)))
    assert loss.item() == pytest.approx(expected)


def test_fedlc_on_a_balanced_client_is_plain_cross_entropy() -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 1, 2])
    balanced = torch.full((4,), 25.0)  # same offset for every class: softmax is unchanged
    loss = LogitCalibration(tau=3.0).loss(logits, labels, balanced)
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(),
                                        abs=1e-6)


def test_fedlc_pushes_rare_class_logits_up_more_than_frequent_ones() -> None:
    logits = torch.zeros(1, 2, requires_grad=True)
    counts = torch.tensor([100.0, 1.0])
    LogitCalibration(tau=1.0).loss(logits, torch.tensor([1]), counts).backward()
    plain = torch.zeros(1, 2, requires_grad=True)
    torch.nn.functional.cross_entropy(plain, torch.tensor([1])).backward()
    # the rare true class gets a larger push than under plain cross-entropy
    assert logits.grad[0, 1] < plain.grad[0, 1] < 0


def test_class_counts_counts_each_label() -> None:
    rows = [{"labels": 0}, {"labels": 2}, {"labels": 2}]
    assert class_counts(rows, 3).tolist() == [1.0, 0.0, 2.0]


# ------------------------------------------------------------------------------- FedRS


def test_fedrs_scales_only_absent_classes_and_alpha_one_is_cross_entropy() -> None:
    logits = torch.tensor([[2.0, -1.0, 4.0]])
    counts = torch.tensor([5.0, 0.0, 3.0])
    assert restricted_logits(logits, counts, 0.25).tolist() == [[2.0, -0.25, 4.0]]
    labels = torch.tensor([0])
    expected = -torch.log_softmax(torch.tensor([2.0, -0.25, 4.0]), dim=0)[0]
    assert RestrictedSoftmax(0.25).loss(logits, labels, counts).item() == pytest.approx(
        expected.item())
    plain = torch.nn.functional.cross_entropy(logits, labels)
    assert RestrictedSoftmax(1.0).loss(logits, labels, counts).item() == pytest.approx(
        plain.item())


# -------------------------------------------------------------------------------- MOON


def test_moon_contrastive_loss_matches_the_formula() -> None:
    z = torch.tensor([[1.0, 0.0]])
    z_glob = torch.tensor([[1.0, 1.0]])  # cos = 1/sqrt(2)
    z_prev = torch.tensor([[0.0, 1.0]])  # cos = 0
    t = 0.5
    pos, neg = math.exp((1 / math.sqrt(2)) / t), math.exp(0.0)
    expected = -math.log(pos / (pos + neg))
    assert contrastive_loss(z, z_glob, z_prev, t).item() == pytest.approx(expected)
    # global and previous models alike: the term is log 2 whatever z is
    same = torch.ones(3, 4)
    assert contrastive_loss(torch.randn(3, 4), same, same, t).item() == pytest.approx(
        math.log(2))


def test_pooled_representation_averages_real_tokens_only() -> None:
    hidden = torch.tensor([[[1.0], [3.0], [100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    pooled = pooled_representation((hidden,), {"attention_mask": mask})
    assert pooled.tolist() == [[2.0]]


def test_moon_with_mu_zero_is_fedavg_and_keeps_the_previous_model(tmp_path: Path) -> None:
    plain = final_state(raw(tmp_path / "a", []))
    moon = final_state(raw(tmp_path / "b", [{"name": "moon", "mu": 0.0}]))
    for key in plain:
        assert torch.allclose(plain[key], moon[key], atol=1e-6), key
    config = config_from_dict(raw(tmp_path / "c", [{"name": "moon", "mu": 1.0}]))
    check_components(config)
    seed_everything(config.seed)
    algorithm = build_algorithm(config)
    workload = build_workload(config, algorithm)
    runtime = LocalRuntime(workload, MemoryClientStore())
    start = workload.get_state()
    outcome = next(iter(runtime.run_clients([0], Broadcast(start, {}, 1), 1)))
    assert outcome.client_state is not None
    kept = outcome.client_state[STATE_KEY]
    trained = OrderedDict((k, start[k] + outcome.update.payload[k]) for k in start)
    for key in start:  # the stored previous model is the model this round ended with
        assert torch.allclose(kept[key], trained[key], atol=1e-6), key


def test_moon_term_equals_the_formula_on_a_batch_and_restores_the_model(tmp_path: Path) -> None:
    from fedfm.adaptability.heterogeneity.base import RegularizerStep
    from fedfm.adaptability.heterogeneity.moon import ModelContrast, representation_under

    config = config_from_dict(raw(tmp_path, [{"name": "moon", "mu": 2.0,
                                              "temperature": 0.7}]))
    check_components(config)
    algorithm = build_algorithm(config)
    workload = build_workload(config, algorithm)
    start = workload.get_state()
    previous = OrderedDict((k, v + 0.05 * torch.randn_like(v)) for k, v in start.items())
    examples = workload.data.clients[0].train[:4]
    ctx = workload.client_context(examples, client_id=0, round=2, seed=1,
                                  client_state={STATE_KEY: previous})
    current = OrderedDict((k, v + 0.02 * torch.randn_like(v)) for k, v in start.items())
    workload.set_state(current)
    batch = ctx.collate(examples)
    workload.model.eval()
    with torch.no_grad():
        out = workload.model(**batch, output_hidden_states=True)
    z = pooled_representation(out.hidden_states, batch)
    term = ModelContrast(2.0, 0.7).term(RegularizerStep(ctx, Broadcast(start, {}, 2), batch, z))
    after = workload.get_state()  # the term restored the model it was called with
    assert all(torch.equal(after[k], current[k]) for k in current)
    z_glob = representation_under(ctx, start, batch)
    z_prev = representation_under(ctx, previous, batch)
    assert term.item() == pytest.approx(2.0 * contrastive_loss(z, z_glob, z_prev, 0.7).item(),
                                        rel=1e-5)


# ------------------------------------------------------------------------------ FedNova


def test_fednova_gradient_weights_for_sgd_with_and_without_momentum() -> None:
    plain = LocalTrainingConfig(steps=5, optimizer="sgd", lr=0.1)
    assert gradient_weight_norm(5, plain) == pytest.approx(5.0)
    rho = 0.9
    momentum = LocalTrainingConfig(steps=5, optimizer="sgd", lr=0.1, momentum=rho)
    tau = 5  # the paper's closed form for constant-rate momentum SGD
    closed = (tau - rho * (1 - rho ** tau) / (1 - rho)) / (1 - rho)
    assert gradient_weight_norm(5, momentum) == pytest.approx(closed)
    linear = LocalTrainingConfig(steps=4, optimizer="sgd", lr=0.1, schedule="linear")
    assert gradient_weight_norm(4, linear) == pytest.approx(1.0 + 0.75 + 0.5 + 0.25)


def nova_update(client: int, steps: int, examples: int, value: float) -> ClientUpdate:
    return ClientUpdate(client_id=client, payload=OrderedDict(w=torch.tensor([value])),
                        num_examples=examples, metrics={"steps": float(steps)})


def test_fednova_normalizes_unequal_local_steps_exactly() -> None:
    local = LocalTrainingConfig(steps=1, optimizer="sgd", lr=0.1)
    updates = [nova_update(0, 2, 10, 2.0), nova_update(1, 6, 30, 12.0)]
    # p = (1/4, 3/4); a = (2, 6); tau_eff = 1/2 + 9/2 = 5; factors 5/2 and 5/6
    assert nova_scales(updates, local, "examples") == pytest.approx([2.5, 5 / 6])
    server = NovaServer(DeltaServer(WeightedMean("examples"),
                                    build_server_optimizer(ServerOptimizerConfig())),
                        local, "examples")
    start = OrderedDict(w=torch.tensor([1.0]))
    new = server.aggregate(start, updates, 1)
    # normalized per-step updates 1 and 2, averaged 1/4 * 1 + 3/4 * 2 = 1.75, times tau_eff 5
    assert new["w"].item() == pytest.approx(1.0 + 5 * 1.75)
    fedavg = 1.0 + 0.25 * 2.0 + 0.75 * 12.0
    assert new["w"].item() != pytest.approx(fedavg)
    # equal steps: FedNova is FedAvg, bit for bit
    equal = [nova_update(0, 3, 10, 2.0), nova_update(1, 3, 30, 12.0)]
    assert server.aggregate(start, equal, 1)["w"].item() == 1.0 + 0.25 * 2.0 + 0.75 * 12.0


@pytest.mark.parametrize("steps", [None, 0, -1, 2.5, float("nan"), "3"])
def test_fednova_rejects_a_bad_step_count(steps: Any) -> None:
    local = LocalTrainingConfig(steps=1)
    server = NovaServer(DeltaServer(WeightedMean("examples"),
                                    build_server_optimizer(ServerOptimizerConfig())),
                        local, "examples")
    update = nova_update(0, 1, 10, 1.0)
    update.metrics = {} if steps is None else {"steps": steps}
    with pytest.raises(ValueError, match="FedNova needs metrics"):
        server.check_update(update, OrderedDict(w=torch.tensor([0.0])))


def test_fednova_equals_fedavg_when_steps_are_equal_and_differs_under_epochs(
        tmp_path: Path) -> None:
    plain = final_state(raw(tmp_path / "a", []))
    nova = final_state(raw(tmp_path / "b", [{"name": "fednova"}]))
    assert all(torch.equal(plain[k], nova[k]) for k in plain)
    epochs = {"algorithm": {"local": {"steps": None, "epochs": 1.0}},
              "data": {"partition": {"kind": "quantity", "alpha": 1.5}},
              "federation": {"clients_per_round": 4}}
    plain_e = final_state(raw(tmp_path / "c", [], **epochs))
    nova_e = final_state(raw(tmp_path / "d", [{"name": "fednova"}], **epochs))
    assert any(not torch.allclose(plain_e[k], nova_e[k]) for k in plain_e)


# ------------------------------------------------------------------------------ FedBABU


def head_and_body(state: dict[str, torch.Tensor]) -> tuple[set[str], set[str]]:
    heads = {k for k in state if HEAD in k}
    return heads, set(state) - heads


@pytest.mark.parametrize("server_optimizer", ["sgd", "adam"])
def test_fedbabu_head_is_bitwise_frozen_and_the_body_trains(tmp_path: Path,
                                                            server_optimizer: str) -> None:
    config = raw(tmp_path, [{"name": "fedbabu"}],
                 algorithm={"server_optimizer": {"name": server_optimizer, "lr": 0.01}},
                 federation={"rounds": 3}, privacy={})
    checked = config_from_dict(config)
    check_components(checked)
    seed_everything(checked.seed)
    initial = build_workload(checked, build_algorithm(checked)).get_state()
    final = final_state(config)
    heads, body = head_and_body(initial)
    assert heads and body
    assert all(torch.equal(initial[k], final[k]) for k in heads)
    assert any(not torch.equal(initial[k], final[k]) for k in body)


def test_fedbabu_head_rounds_train_only_the_head(tmp_path: Path) -> None:
    body_only = final_state(raw(tmp_path / "a", [{"name": "fedbabu"}],
                                federation={"rounds": 2}))
    with_head = final_state(raw(tmp_path / "b", [{"name": "fedbabu", "head_rounds": 1}],
                                federation={"rounds": 3}))
    heads, body = head_and_body(body_only)
    # round 3 trained the head alone: the body is where round 2 left it
    assert all(torch.equal(body_only[k], with_head[k]) for k in body)
    assert any(not torch.equal(body_only[k], with_head[k]) for k in heads)


# ------------------------------------------------------------------------- composition


@pytest.mark.parametrize(("algorithm", "skew", "adapter"), [
    ({"name": "fedprox", "mu": 0.1}, [{"name": "fedlc"}, {"name": "moon"}], "lora"),
    ({"name": "scaffold", "local": {"optimizer": "sgd", "lr": 0.05}},
     [{"name": "fedbabu"}, {"name": "fedrs"}, {"name": "fednova"}], "lora"),
    ({"name": "fedavg", "server_optimizer": {"name": "adam", "lr": 0.01}},
     [{"name": "fednova"}, {"name": "fedlc"}], "ia3"),
    ({"name": "fedavg"}, [{"name": "moon"}, {"name": "fedrs"}], "bitfit"),
    ({"name": "fedper"}, [{"name": "fedlc"}], "lora"),
])
def test_skew_methods_compose_with_algorithms_and_adapters(
        tmp_path: Path, algorithm: dict[str, Any], skew: list[dict[str, Any]],
        adapter: str) -> None:
    config = raw(tmp_path, skew, algorithm=algorithm,
                 adapter={"kind": adapter, "train_head": True})
    built = config_from_dict(config)
    check_components(built)
    assert build_algorithm(built).info["skew"] == [s["name"] for s in skew]
    result = fedfm.run(built, console=False)
    losses = [r["train_loss"] for r in result.metrics if "train_loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)
    assert "accuracy" in result.metrics[-1]["eval"]["global"]


@pytest.mark.parametrize(("skew", "changes", "message"), [
    ([{"name": "fedfoo"}], {}, "unknown skew method 'fedfoo'"),
    ([{"name": "fedlc"}, {"name": "fedlc"}], {}, "more than once"),
    ([{"name": "fedlc"}, {"name": "fedrs"}], {}, "pick one"),
    ([{"name": "moon"}], {"algorithm": {"name": "fedkseed",
                                        "local": {"optimizer": "sgd"}}}, "does not train"),
    ([{"name": "fedbabu"}], {"algorithm": {"name": "fedper"}}, "plain client half"),
    ([{"name": "fedbabu", "head_rounds": 2}], {}, "head_rounds"),
    ([{"name": "fednova"}], {"privacy": {"client_dp": {"noise_multiplier": 0.0}}},
     "privacy.client_dp"),
    ([{"name": "fednova"}], {"algorithm": {"name": "ifca"}}, "aggregates another way"),
    ([{"name": "fedlc"}], {"privacy": {"dp_sgd": {"noise_multiplier": 0.5}}},
     "privacy.dp_sgd"),
])
def test_what_cannot_compose_is_refused_with_the_reason(
        tmp_path: Path, skew: list[dict[str, Any]], changes: dict[str, Any],
        message: str) -> None:
    config = config_from_dict(raw(tmp_path, skew, **changes))
    with pytest.raises(ConfigError, match=message):
        check_components(config)


def test_logit_methods_refuse_a_language_model(tmp_path: Path) -> None:
    config = config_from_dict(deep_update(lm_config_dict(tmp_path),
                                          {"algorithm": {"skew": [{"name": "fedrs"}]}}))
    with pytest.raises(ConfigError, match="needs a classification model"):
        check_components(config)


def test_fedbabu_refuses_a_model_without_a_trainable_head(tmp_path: Path) -> None:
    config = config_from_dict(raw(tmp_path, [{"name": "fedbabu"}],
                                  adapter={"train_head": False}))
    check_components(config)
    with pytest.raises(ConfigError, match="no head tensor"):
        build_workload(config, build_algorithm(config))


def test_moon_trains_a_language_model(tmp_path: Path) -> None:
    config = deep_update(lm_config_dict(tmp_path), {
        "algorithm": {"skew": [{"name": "moon", "mu": 0.5}], "local": {"steps": 2}},
        "federation": {"rounds": 1}})
    result = fedfm.run(config_from_dict(config), console=False)
    assert math.isfinite(result.metrics[-1]["train_loss"])


# ------------------------------------------------------------------ recipe and CLI advice

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "label_skew.yaml"


def test_the_recipe_is_what_the_cli_suggests_and_it_validates() -> None:
    import yaml

    from fedfm.adaptability.heterogeneity.advice import LABEL_SKEW_ALGORITHM, LABEL_SKEW_MODEL
    from fedfm.config import load_config
    from fedfm.models.loader import minilm_dir
    from fedfm.models.pooling import declared_pooling

    recipe = yaml.safe_load(RECIPE.read_text())
    assert recipe["algorithm"] == LABEL_SKEW_ALGORITHM
    # the advice's ``auto`` is the recipe's ``mean`` on the recipe's model
    assert (LABEL_SKEW_MODEL, recipe["model"]["pooling"]) == ({"pooling": "auto"}, "mean")
    assert recipe["model"]["name"] == "minilm" and declared_pooling(minilm_dir()) == "mean"
    config = load_config(RECIPE)
    check_components(config)
    assert Path(config.data.path).is_file()


def test_skew_advice_suggests_the_recipe_under_label_skew_once(tmp_path: Path) -> None:
    from fedfm.adaptability.heterogeneity.advice import skew_advice
    from fedfm.data.stats import ClientStats, DataStats

    config = config_from_dict(raw(tmp_path, []))

    def stats(*histograms: dict[str, int]) -> DataStats:
        clients = [ClientStats(i, sum(h.values()), 0, h) for i, h in enumerate(histograms)]
        return DataStats("s", "classification", "classification", "p", "label", clients, 0,
                         "v", 0, label_names=["a", "b"])

    skewed = stats({"a": 90, "b": 10}, {"a": 10, "b": 90})  # skew 0.4
    rare = skew_advice(skewed, config)
    assert rare is not None and "pooling: auto" in rare.snippet and "fedavg" in rare.snippet
    assert "skew:" not in rare.snippet
    assert skew_advice(stats({"a": 50, "b": 40}, {"a": 40, "b": 50}), config) is None
    pooled = config_from_dict(raw(tmp_path, [], model={"pooling": "mean"}))
    assert skew_advice(skewed, pooled) is None  # already applied


def test_data_stats_suggests_the_recipe_under_strong_label_skew_only(tmp_path: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from fedfm.cli import app

    runner = CliRunner()

    def stats(name: str, **changes: Any) -> str:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw(tmp_path, [], **changes)))
        result = runner.invoke(app, ["data", "stats", str(path)])
        assert result.exit_code == 0, result.output
        return result.output

    one_class = stats("lq", data={"partition": {"kind": "label_quantity",
                                                "classes_per_client": 1, "min_size": 1}})
    assert "label-skew recipe" in one_class and "pooling: auto" in one_class
    assert "label-skew recipe" not in stats("iid", data={"partition": {"kind": "iid"}})
    treated = stats("treated", algorithm={"skew": [{"name": "fedrs"}]},
                    data={"partition": {"kind": "label_quantity", "classes_per_client": 1,
                                        "min_size": 1}})
    assert "label-skew recipe" not in treated
    by_length = stats("length", data={"partition": {"kind": "length", "alpha": 0.05,
                                                    "groups": 4, "min_size": 1}})
    assert "feature skew" in by_length and "finetune_steps" in by_length


def test_every_bench_run_is_a_valid_config() -> None:
    """bench/heterogeneity.py's runs (every partition x method) pass the config checks, and
    centralized sees as many examples per round as the federation."""
    import argparse
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "heterogeneity.py"
    spec = importlib.util.spec_from_file_location("bench_heterogeneity", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = argparse.Namespace(rounds=10, rows=2000, local_steps=10, seed=0, lr=5e-3,
                              central_lr=1e-3,
                              sgd_lr=0.05, server_lr=0.01, nova_epochs=1.0)
    for partition in bench.PARTITIONS:
        for method in bench.METHODS:
            config = config_from_dict(bench.method_config(partition, method, args))
            check_components(config)
        central = bench.method_config(partition, "centralized", args)
        federated = bench.method_config(partition, "fedavg", args)
        assert central["algorithm"]["local"]["steps"] == (
            federated["algorithm"]["local"]["steps"]
            * federated["federation"]["clients_per_round"])
