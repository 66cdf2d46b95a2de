"""End-to-end federated runs on tiny models and real data, checked against the math:
determinism, FedAvg == plain training for one client, FedProx(mu=0) == FedAvg, exact resume,
the run directory's contents, dropouts and byte accounting."""

from __future__ import annotations

import json

import pytest
import torch

import fedfm.core.loop as loop_module
from fedfm import api
from fedfm.algorithms.local_train import batch_indices
from fedfm.core import state as S
from fedfm.core.loop import derive_seed
from fedfm.data import collate
from fedfm.models import get_state, set_state


def test_same_seed_twice_gives_bitwise_equal_states(lm_config) -> None:
    first = api.run(lm_config())
    second = api.run(lm_config())
    assert S.equal(first.final_state, second.final_state)
    other = api.run(lm_config(seed=1))
    assert not S.equal(first.final_state, other.final_state)


def test_fedavg_with_one_client_equals_plain_training(lm_config) -> None:
    """One client, SGD, server lr 1: R rounds of K steps == R*K plain SGD steps (the plain loop
    uses the model's own loss; fedfm's run uses the fused chunked loss, so this also checks it)."""
    rounds, steps, lr = 3, 4, 0.05
    config = lm_config(
        federation={"num_clients": 1, "clients_per_round": 1, "rounds": rounds},
        algorithm={"local": {"steps": steps, "batch_size": 4, "lr": lr, "optimizer": "sgd"}},
        eval={"enabled": False})
    result = api.run(config)

    # the plain loop: the same model init and data, torch.optim.SGD, no fedfm machinery
    api.seed_everything(config.seed)
    workload = api.build_workload(config, api.build_algorithm(config))
    model, examples = workload.model, workload.data.clients[0].train
    assert workload.speed.fused_loss
    lengths = [len(ex["input_ids"]) for ex in examples]  # group_by_length is on by default
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for round_index in range(1, rounds + 1):
        seed = derive_seed(config.seed, round_index, 0, 3)
        order = batch_indices(len(examples), 4, steps, torch.Generator().manual_seed(seed),
                              lengths)
        torch.manual_seed(seed)
        for chunk in order:
            batch = collate([examples[i] for i in chunk], pad_token_id=workload.pad_token_id,
                            task="causal_lm")
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    plain = get_state(model)
    assert S.max_abs_diff(result.final_state, plain) < 1e-6
    assert S.max_abs_diff(result.final_state, workload.get_state()) < 1e-6


def test_fedprox_with_mu_zero_equals_fedavg(lm_config) -> None:
    fedavg = api.run(lm_config())
    fedprox = api.run(lm_config(algorithm={"name": "fedprox", "mu": 0.0}))
    assert S.equal(fedavg.final_state, fedprox.final_state)
    proximal = api.run(lm_config(algorithm={"name": "fedprox", "mu": 1.0}))
    assert not S.equal(fedavg.final_state, proximal.final_state)


@pytest.mark.parametrize("algorithm", [
    {"name": "scaffold", "local": {"optimizer": "sgd", "lr": 0.05}},
    {"name": "fedavg", "server_optimizer": {"name": "adam", "lr": 0.01}},
])
def test_resume_ends_with_the_same_state(lm_config, monkeypatch, algorithm) -> None:
    changes = dict(algorithm=algorithm, federation={"rounds": 4, "dropout_prob": 0.2},
                   eval={"every": 2})
    uninterrupted = api.run(lm_config(**changes))

    original = loop_module.RoundLoop.run_round

    def crash_after_round_two(self, snapshot):
        if snapshot.round == 2:
            raise KeyboardInterrupt("simulated crash")
        return original(self, snapshot)

    monkeypatch.setattr(loop_module.RoundLoop, "run_round", crash_after_round_two)
    with pytest.raises(KeyboardInterrupt):
        api.run(lm_config(**changes))
    monkeypatch.setattr(loop_module.RoundLoop, "run_round", original)
    runs = sorted((uninterrupted.run_dir.parent).glob("test-lm-*"))
    crashed = next(r for r in runs if r != uninterrupted.run_dir)
    resumed = api.run(resume=crashed)
    assert S.equal(uninterrupted.final_state, resumed.final_state)
    assert [r["round"] for r in resumed.metrics] == [1, 2, 3, 4]
    assert resumed.summary["rounds"] == 4


def test_run_directory_contents(lm_config) -> None:
    result = api.run(lm_config(eval={"generation": {"enabled": True, "num_samples": 2,
                                                    "max_new_tokens": 4}}))
    run_dir = result.run_dir
    assert (run_dir / "config.yaml").exists()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3]
    last = records[-1]
    assert {"loss", "perplexity", "rouge_l"} <= set(last["eval"]["global"])
    assert last["eval"]["global"]["perplexity"] == pytest.approx(
        torch.tensor(last["eval"]["global"]["loss"]).exp().item(), rel=1e-5)
    assert {"loss_mean", "loss_std", "loss_worst10"} <= set(last["eval"]["fairness"])
    assert len(last["clients"]) == 2 and all(c["wall_time"] > 0 for c in last["clients"].values())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 3 and len(summary["config_hash"]) == 64
    assert summary["bytes_up"] == sum(r["bytes_up"] for r in records)
    assert (run_dir / "checkpoints" / "round_0003" / "global.safetensors").exists()
    final = (run_dir / "final" / "global.safetensors")
    from safetensors.torch import load_file
    assert S.equal(dict(load_file(str(final))), dict(result.final_state))


def test_bytes_are_serialized_sizes_and_dropouts_are_recorded(lm_config) -> None:
    result = api.run(lm_config(federation={"num_clients": 4, "clients_per_round": 4,
                                           "rounds": 2, "dropout_prob": 0.5}))
    state_bytes = S.num_bytes(result.final_state)
    statuses = []
    for record in result.metrics:
        for client in record["clients"].values():
            statuses.append(client["status"])
            assert client["bytes_down"] == state_bytes
            if client["status"] == "ok":
                assert client["bytes_up"] == state_bytes  # a delta has the State's layout
            else:
                assert client["bytes_up"] == 0
    assert "dropped" in statuses and "ok" in statuses


@pytest.mark.parametrize("kind", ["lora", "ia3", "prompt_tuning", "prefix_tuning", "bitfit",
                                  "layernorm", "last_layers", "head", "full"])
def test_every_adapter_family_trains_federated(cls_config, kind) -> None:
    config = cls_config(adapter={"kind": kind, "num_virtual_tokens": 4},
                        federation={"rounds": 1}, eval={"per_client": False})
    result = api.run(config)
    api.seed_everything(config.seed)
    workload = api.build_workload(config, api.build_algorithm(config))
    initial = workload.get_state()
    assert list(result.final_state) == list(initial)
    assert not S.equal(result.final_state, initial)  # the communicated State moved
    set_state(workload.model, result.final_state)  # and loads back into a fresh model
    assert "accuracy" in result.metrics[-1]["eval"]["global"]


def test_resume_before_the_first_checkpoint_starts_clean(lm_config, monkeypatch) -> None:
    changes = dict(algorithm={"name": "scaffold", "local": {"optimizer": "sgd", "lr": 0.05}},
                   runtime={"client_store": "disk"}, tracking={"checkpoint_every": 2},
                   eval={"at_start": True})
    uninterrupted = api.run(lm_config(**changes))
    original = loop_module.RoundLoop.run_round

    def crash_in_round_two(self, snapshot):
        if snapshot.round == 1:
            raise KeyboardInterrupt("simulated crash")
        return original(self, snapshot)

    monkeypatch.setattr(loop_module.RoundLoop, "run_round", crash_in_round_two)
    with pytest.raises(KeyboardInterrupt):
        api.run(lm_config(**changes))
    monkeypatch.setattr(loop_module.RoundLoop, "run_round", original)
    crashed = next(r for r in uninterrupted.run_dir.parent.glob("test-lm-*")
                   if r != uninterrupted.run_dir)
    resumed = api.run(resume=crashed)
    assert S.equal(uninterrupted.final_state, resumed.final_state)
    assert [r["round"] for r in resumed.metrics] == [0, 1, 2, 3]
