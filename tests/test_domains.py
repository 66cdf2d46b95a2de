"""Multi-domain adaptation (``domain_lora``): shared + per-domain LoRA adapters, and the router."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch

import fedfm
from fedfm.adaptability.domains import check_domains
from fedfm.adaptability.domains.adapters import (
    ROUTER_MODULE,
    SHARED,
    active_adapters,
    domain_of_key,
    split_keys,
    tuner_layers,
)
from fedfm.adaptability.domains.domain_lora import (
    METADATA_KEY,
    DomainServer,
    combine_metrics,
    routed_metrics,
)
from fedfm.algorithms.fedavg import build_delta_server
from fedfm.api import build_algorithm, build_workload
from fedfm.config import AlgorithmConfig, ConfigError, RunConfig, config_from_dict
from fedfm.core.checkpoint import latest_checkpoint, load_checkpoint
from fedfm.core.update import Broadcast, ClientUpdate
from tests.conftest import DATA, cls_config_dict, deep_update

# --------------------------------------------------------------------------- helpers


def domain_rows(path: Path, per_domain: int, domains: tuple[str, ...] = ("a", "b")) -> Path:
    """SST-2 rows tagged with a ``domain`` column; domain ``a`` is 80% positive, domain ``b``
    has the same kind of rows with every label flipped (so the domains conflict)."""
    rows = [json.loads(line) for line in (DATA / "sst2_train.jsonl").read_text().splitlines()]
    pos = iter(r for r in rows if r["label"] == 1)
    neg = iter(r for r in rows if r["label"] == 0)
    major = per_domain * 4 // 5
    out: list[dict[str, Any]] = []
    for index, domain in enumerate(domains):
        picked = [next(pos) for _ in range(major)] + [next(neg) for _ in range(per_domain - major)]
        flip = index % 2 == 1
        out += [dict(r, domain=domain, label=1 - r["label"] if flip else r["label"])
                for r in picked]
    path.write_text("".join(json.dumps(r) + "\n" for r in out), encoding="utf-8")
    return path


def domain_config(tmp_path: Path, *, per_domain: int = 100, domains: tuple[str, ...] = ("a", "b"),
                  algorithm: dict[str, Any] | None = None, **changes: Any) -> RunConfig:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = domain_rows(tmp_path / "domains.jsonl", per_domain, domains)
    base = cls_config_dict(
        tmp_path,
        data={"path": str(data), "validation_path": None, "max_rows": None,
              "max_validation_rows": None, "validation_fraction": 0.15, "group_by": "domain",
              "client_validation_fraction": 0.2,
              "partition": {"kind": "natural", "by": "domain", "min_size": 1}},
        federation={"num_clients": 2 * len(domains), "clients_per_round": 2 * len(domains),
                    "rounds": 3},
        algorithm={"name": "domain_lora",
                   "local": {"steps": 5, "batch_size": 16, "lr": 3e-2}, **(algorithm or {})},
        eval={"every": 100, "batch_size": 64},
        runtime={"attention": "eager", "prefix_cache": "off", "num_threads": 1})
    return config_from_dict(deep_update(base, changes))


def workload_for(config: RunConfig) -> Any:
    return build_workload(config, build_algorithm(config))


def random_state(state: OrderedDict[str, torch.Tensor], seed: int) -> OrderedDict:
    generator = torch.Generator().manual_seed(seed)
    return OrderedDict((k, 0.1 * torch.randn(v.shape, generator=generator))
                       for k, v in state.items())


def batch_of(workload: Any, count: int = 8) -> dict[str, torch.Tensor]:
    return workload.collate_fn()(workload.data.clients[0].train[:count])


# --------------------------------------------------------------------------- the model


def test_domain_adapters_mirror_the_shared_one_and_start_at_zero(tmp_path: Path) -> None:
    workload = workload_for(domain_config(tmp_path))
    state = workload.get_state()
    shared, domains = split_keys(state)
    assert sorted(domains) == ["domain_0", "domain_1"]  # sorted domain names a, b
    lora_shared = [k for k in shared if ".lora_" in k]
    for name, keys in domains.items():
        assert keys == [k.replace(f".{SHARED}.", f".{name}.") for k in lora_shared]
        assert all(not state[k].any() for k in keys if ".lora_B." in k)  # B = 0: adds nothing
    assert [k for k in shared if ".lora_" not in k] == [  # one head, the shared adapter's
        "base_model.model.classifier.modules_to_save.default.weight",
        "base_model.model.classifier.modules_to_save.default.bias"]
    assert all(layer.active_adapters == [SHARED, "domain_0", "domain_1"]
               for layer in tuner_layers(workload.model))


def test_one_domain_is_a_single_lora_of_twice_the_rank(tmp_path: Path) -> None:
    """shared (A_s, B_s) + domain (A_d, B_d), both at scale alpha/r, is the rank-2r LoRA with
    A = [A_s; A_d], B = [B_s, B_d] at scale 2 alpha / 2r: same outputs, and a client's round of
    domain_lora is a FedAvg client's round of that LoRA, factor by factor."""
    local = {"steps": 3, "batch_size": 8, "lr": 0.1, "optimizer": "sgd"}
    one = domain_config(tmp_path / "one", domains=("a",), algorithm={"local": local})
    single = domain_config(tmp_path / "single", domains=("a",),
                           algorithm={"name": "fedavg", "local": local},
                           adapter={"r": 8, "alpha": 16})
    work_one, work_single = workload_for(one), workload_for(single)
    state_one = random_state(work_one.get_state(), seed=1)
    state_single = concatenated(state_one)
    work_one.set_state(state_one)
    work_single.set_state(state_single)
    batch = batch_of(work_one)
    work_one.model.eval()
    work_single.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(work_one.model(**batch).logits,
                                   work_single.model(**batch).logits, rtol=0, atol=1e-5)
    adapters = {"domain_0": OrderedDict((k, v) for k, v in state_one.items()
                                        if domain_of_key(k) is not None)}
    updates = []
    for work, state, extras in ((work_one, state_one, adapters), (work_single, state_single, {})):
        ctx = work.client_context(work.data.clients[0].train, client_id=0, round=1, seed=7)
        torch.manual_seed(0)
        updates.append(work.client.run(ctx, Broadcast(state, extras, 1)).update)
    assert updates[0].metadata == {METADATA_KEY: "domain_0"}
    torch.testing.assert_close(dict(concatenated(updates[0].payload)), dict(updates[1].payload),
                               rtol=0, atol=1e-5)


def concatenated(state: OrderedDict) -> OrderedDict:
    """The rank-2r single adapter holding the shared and domain_0 factors side by side."""
    out: OrderedDict = OrderedDict()
    for key, value in state.items():
        if domain_of_key(key) is not None:
            continue
        twin = key.replace(f".{SHARED}.", ".domain_0.")
        if ".lora_A." in key:
            out[key] = torch.cat([value, state[twin]], dim=0)
        elif ".lora_B." in key:
            out[key] = torch.cat([value, state[twin]], dim=1)
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------- the server


KEYS = ["q.lora_A.default.weight", "q.lora_B.default.weight",
        "q.lora_A.domain_0.weight", "q.lora_B.domain_0.weight",
        "q.lora_A.domain_1.weight", "q.lora_B.domain_1.weight", "classifier.weight"]


def upload(client: int, domain: str, examples: int, global_state: OrderedDict) -> ClientUpdate:
    generator = torch.Generator().manual_seed(100 + client)
    payload = OrderedDict((k, torch.randn(v.shape, generator=generator, dtype=torch.float64))
                          for k, v in global_state.items()
                          if domain_of_key(k) in (None, domain))
    return ClientUpdate(client, payload, examples, metadata={METADATA_KEY: domain})


def server_round(server: DomainServer, global_state: OrderedDict,
                 uploads: list[ClientUpdate]) -> OrderedDict:
    server.broadcast_extras(global_state)
    decoded = [server.decode_update(u, global_state) for u in uploads]
    return server.aggregate(global_state, decoded, 1)


def fedavg_of(uploads: list[ClientUpdate], key: str) -> torch.Tensor:
    total = sum(u.num_examples for u in uploads)
    return sum(u.num_examples * u.payload[key] for u in uploads) / total


def test_shared_is_fedavg_over_all_clients_and_each_domain_over_its_own() -> None:
    generator = torch.Generator().manual_seed(0)
    global_state = OrderedDict((k, torch.randn(3, 2, generator=generator, dtype=torch.float64))
                               for k in KEYS)
    server = DomainServer(build_delta_server(AlgorithmConfig()), AlgorithmConfig())
    uploads = [upload(0, "domain_0", 5, global_state), upload(1, "domain_0", 12, global_state),
               upload(2, "domain_1", 7, global_state), upload(3, "domain_0", 3, global_state),
               upload(4, "domain_1", 20, global_state)]
    next_state = server_round(server, global_state, uploads)
    adapters = server.evaluation_extras(next_state)
    for key in KEYS:
        domain = domain_of_key(key)
        if domain is None:
            expected = global_state[key] + fedavg_of(uploads, key)
            torch.testing.assert_close(next_state[key], expected, rtol=0, atol=1e-12)
        else:  # the global slot keeps its initialisation; the server holds the adapter
            assert torch.equal(next_state[key], global_state[key])
            own = [u for u in uploads if u.metadata[METADATA_KEY] == domain]
            expected = global_state[key] + fedavg_of(own, key)
            torch.testing.assert_close(adapters[domain][key], expected, rtol=0, atol=1e-12)


def test_an_upload_never_touches_another_domains_adapter() -> None:
    global_state = OrderedDict((k, torch.ones(2, 2, dtype=torch.float64)) for k in KEYS)
    cfg = AlgorithmConfig(server_optimizer={"name": "adam", "lr": 0.1})
    server = DomainServer(build_delta_server(cfg), cfg)
    server_round(server, global_state, [upload(0, "domain_0", 4, global_state)])
    before = server.evaluation_extras(global_state)
    server_round(server, global_state, [upload(1, "domain_0", 9, global_state),
                                        upload(2, "domain_0", 2, global_state)])
    after = server.evaluation_extras(global_state)
    assert all(torch.equal(after["domain_1"][k], before["domain_1"][k])
               for k in before["domain_1"])
    assert not torch.equal(after["domain_0"]["q.lora_A.domain_0.weight"],
                           before["domain_0"]["q.lora_A.domain_0.weight"])
    resumed = DomainServer(build_delta_server(cfg), cfg)  # checkpoint: adapters + moments
    resumed.load_state_dict(server.state_dict())
    again = upload(3, "domain_0", 5, global_state)
    expected = server_round(server, global_state, [again])
    torch.testing.assert_close(server_round(resumed, global_state, [again]), expected)
    assert all(torch.equal(resumed.adapters["domain_0"][k], server.adapters["domain_0"][k])
               for k in server.adapters["domain_0"])


@pytest.mark.parametrize("change, message", [
    ({"payload": "other"}, "unexpected"), ({"payload": "missing"}, "missing"),
    ({METADATA_KEY: "domain_7"}, "unknown domain adapter")])
def test_malformed_uploads_are_refused(change: dict[str, str], message: str) -> None:
    global_state = OrderedDict((k, torch.zeros(2, 2, dtype=torch.float64)) for k in KEYS)
    server = DomainServer(build_delta_server(AlgorithmConfig()), AlgorithmConfig())
    update = upload(0, "domain_0", 3, global_state)
    if change.get("payload") == "other":
        update.payload["q.lora_A.domain_1.weight"] = torch.zeros(2, 2, dtype=torch.float64)
    elif change.get("payload") == "missing":
        del update.payload["q.lora_B.domain_0.weight"]
    else:
        update.metadata.update(change)
    with pytest.raises(ValueError, match=message):
        server.decode_update(update, global_state)


# --------------------------------------------------------------------------- the router


def test_router_mixes_the_domain_adapters_by_softmax_weights(tmp_path: Path) -> None:
    work = workload_for(domain_config(tmp_path, algorithm={"domains": {"router": True}}))
    state = random_state(work.get_state(), seed=3)
    gate = f"{ROUTER_MODULE}.gate"
    state[f"{gate}.weight"] = torch.zeros_like(state[f"{gate}.weight"])
    state[f"{gate}.bias"] = torch.log(torch.tensor([1.0, 3.0]))  # weights 1/4, 3/4
    work.set_state(state)
    layer = tuner_layers(work.model)[0]
    seen: dict[str, torch.Tensor] = {}
    layer.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    work.model.eval()
    batch = batch_of(work)
    with torch.no_grad():
        work.model(**batch)
        x = seen["x"]
        expected = layer.base_layer(x)
        for name, weight in ((SHARED, 1.0), ("domain_0", 0.25), ("domain_1", 0.75)):
            lora = layer.lora_B[name].weight @ layer.lora_A[name].weight
            expected = expected + weight * layer.scaling[name] * x @ lora.T
    torch.testing.assert_close(seen["y"], expected, rtol=1e-5, atol=1e-6)
    router = getattr(work.model, ROUTER_MODULE)
    padded = torch.cat([batch["input_ids"][:1], torch.zeros(1, 5, dtype=torch.long)], dim=1)
    embed = work.model.get_input_embeddings()
    with torch.no_grad():  # padding does not move the gate: it pools real tokens only
        state[f"{gate}.weight"] = torch.randn(state[f"{gate}.weight"].shape)
        work.set_state(state)
        short = router.route(batch["input_ids"][:1], embed(batch["input_ids"][:1]))
        torch.testing.assert_close(router.route(padded, embed(padded)), short)


def test_router_run_federates_the_gate_and_every_adapter(tmp_path: Path) -> None:
    config = domain_config(tmp_path, algorithm={"domains": {"router": True}},
                           federation={"rounds": 1})
    result = fedfm.run(config)
    state = result.final_state
    assert f"{ROUTER_MODULE}.gate.weight" in state and state[f"{ROUTER_MODULE}.gate.weight"].any()
    assert any(state[k].any() for k in split_keys(state)[1]["domain_1"] if ".lora_B." in k)
    assert "personal_accuracy_mean" not in result.summary["final_metrics"]


# --------------------------------------------------------------------------- end to end


def test_domain_adapters_beat_one_global_adapter_when_domains_conflict(tmp_path: Path) -> None:
    """Domain b's labels are domain a's flipped: one adapter cannot fit both, the shared +
    domain adapters fit each (personalized: each client's domain model on its own split)."""
    config = domain_config(tmp_path / "domains")
    run = fedfm.run(config)
    domains = run.summary["final_metrics"]
    single = fedfm.run(domain_config(tmp_path / "single", algorithm={"name": "fedavg"})
                       ).summary["final_metrics"]
    assert single["clients_accuracy_mean"] < 0.6
    assert domains["personal_accuracy_mean"] > single["clients_accuracy_mean"] + 0.2
    assert domains["personal_accuracy_min"] > 0.5
    # the global validation set, each row routed to its domain's adapter (kept by the server,
    # read back from the checkpoint), against the single adapter on the same rows
    latest = latest_checkpoint(run.run_dir / "checkpoints")
    assert latest is not None
    checkpoint = load_checkpoint(latest)
    server = DomainServer(build_delta_server(config.algorithm), config.algorithm)
    server.load_state_dict(checkpoint.snapshot.server_state)
    workload = workload_for(config)
    routed = routed_metrics(workload, run.final_state, server.evaluation_extras(run.final_state))
    assert routed["examples"] == len(workload.data.global_validation)
    assert routed["accuracy"] > single["val_accuracy"] + 0.2


def test_with_active_adapters_the_others_get_no_gradient(tmp_path: Path) -> None:
    work = workload_for(domain_config(tmp_path))
    work.set_state(random_state(work.get_state(), seed=5))
    keys = set(work.get_state())
    with active_adapters(work.model, [SHARED, "domain_1"]):
        work.model(**batch_of(work)).loss.backward()
        assert set(work.get_state()) == keys  # the State keeps every adapter
    grads = {n: p.grad for n, p in work.model.named_parameters() if p.requires_grad}
    assert all(grads[k] is None for k in keys if domain_of_key(k) == "domain_0")
    assert all(grads[k] is not None for k in keys if domain_of_key(k) in (None, "domain_1"))
    assert tuner_layers(work.model)[0].active_adapters == [SHARED, "domain_0", "domain_1"]


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("changes, message", [
    ({"data": {"group_by": None}}, "needs data.group_by"),
    ({"adapter": {"kind": "bitfit"}}, "use lora"),
    ({"algorithm": {"name": "fedavg", "domains": {"router": True}}}, "would ignore it"),
    ({"algorithm": {"compression": {"chain": [{"kind": "qsgd", "bits": 4}]}}},
     "algorithm.compression"),
    ({"runtime": {"kind": "batched"}}, "batched"),
    ({"algorithm": {"aggregator": "fltrust"}}, "fltrust"),
    ({"runtime": {"kind": "remote"}}, "declared domain names"),
    ({"algorithm": {"domains": {"router": True}}, "runtime": {"compile": True}},
     "runtime.compile"),
])
def test_config_errors(tmp_path: Path, changes: dict[str, Any], message: str) -> None:
    base = cls_config_dict(tmp_path, data={"group_by": "label"},
                           algorithm={"name": "domain_lora"})
    with pytest.raises(ConfigError, match=message):
        check_domains(config_from_dict(deep_update(base, changes)))


def test_combined_metrics_are_those_of_the_union() -> None:
    parts = [{"loss": 0.5, "accuracy": 1.0, "examples": 3.0},
             {"loss": 1.0, "accuracy": 0.0, "examples": 1.0}]
    assert combine_metrics(parts) == {"loss": 0.625, "accuracy": 0.75, "examples": 4.0}
    lm = combine_metrics([{"loss": 1.0, "perplexity": 2.7, "tokens": 10.0},
                          {"loss": 3.0, "perplexity": 20.1, "tokens": 30.0}])
    assert lm["loss"] == 2.5 and lm["tokens"] == 40.0
    assert lm["perplexity"] == pytest.approx(torch.exp(torch.tensor(2.5)).item())
