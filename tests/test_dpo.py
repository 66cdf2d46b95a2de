"""Federated DPO (issue 10, item 4): the loss, the log-probabilities it sums, the adapter-disabled
reference, evaluation, config checks and a short federated run on real preference pairs."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import fedfm
from fedfm.adaptability.preference.dpo import (
    DPOLoss,
    build_fed_dpo,
    check_dpo,
    collate_pairs,
    dpo_terms,
    reference_logps,
    response_logps,
    sequence_logps,
)
from fedfm.api import build_algorithm, build_workload, check_components
from fedfm.config import AlgorithmConfig, ConfigError, DataConfig, DPOConfig, ModelConfig
from fedfm.data import DataError, build_federated_data, collate
from fedfm.data.formats import IGNORE_INDEX, load_records, tokenize_records
from fedfm.eval.evaluator import evaluate_examples, example_length, primary_metric
from fedfm.models import ModelBundle, apply_adapter, load_model
from fedfm.runtime.fast import prepare_fast_path
from tests.conftest import DATA, SMALL_LLAMA, deep_update

PAIRS = DATA / "hh_harmless_pref.jsonl"
LOG2 = math.log(2.0)
CPU = torch.device("cpu")


def tiny_llama(adapter: bool = True) -> ModelBundle:
    bundle = load_model(ModelConfig(name="tiny-llama", config_overrides=SMALL_LLAMA), seed=0)
    if not adapter:
        return bundle
    from fedfm.config import AdapterConfig

    return apply_adapter(bundle, AdapterConfig(kind="lora", r=4, alpha=8), seed=0)


def pair_examples(bundle: ModelBundle, rows: int = 4, max_length: int = 64) -> list[dict]:
    records = load_records(str(PAIRS), DataConfig(path=str(PAIRS), format="preference"),
                           max_rows=rows)
    out = tokenize_records(records, bundle.tokenizer, fmt="preference", task="causal_lm",
                           max_length=max_length)
    return [e for e in out.examples if e is not None]


def write_pairs(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def randomize_lora_b(model: torch.nn.Module, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))


# --------------------------------------------------------------------------- the math


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_dpo_loss_equals_the_hand_computation(label_smoothing: float) -> None:
    # rows: chosen pairs 0..2, then rejected pairs 0..2
    policy = torch.tensor([-10.0, -4.0, -7.5, -12.0, -3.0, -7.5], requires_grad=True)
    reference = torch.tensor([-11.0, -4.5, -6.0, -11.5, -2.0, -8.0])
    beta = 0.3
    terms = dpo_terms(policy, reference, beta=beta, label_smoothing=label_smoothing)
    p = policy.detach()
    for i in range(3):
        h = float((p[i] - reference[i]) - (p[3 + i] - reference[3 + i]))
        sig = 1.0 / (1.0 + math.exp(-beta * h))
        expected = -(1 - label_smoothing) * math.log(sig) - label_smoothing * math.log(1 - sig)
        assert float(terms.losses[i].detach()) == pytest.approx(expected, rel=1e-6)
        assert float(terms.chosen_rewards[i]) == pytest.approx(beta * float(p[i] - reference[i]))
        assert float(terms.rejected_rewards[i]) == pytest.approx(
            beta * float(p[3 + i] - reference[3 + i]))
    # d loss / d log pi(chosen) = -beta * ((1 - eps) * (1 - sig) - eps * sig)
    terms.losses.sum().backward()
    h0 = 1.0 - (-0.5)  # pair 0: chosen ratio 1.0, rejected ratio -0.5
    sig0 = 1.0 / (1.0 + math.exp(-beta * h0))
    grad = -beta * ((1 - label_smoothing) * (1 - sig0) - label_smoothing * sig0)
    assert float(policy.grad[0]) == pytest.approx(grad, rel=1e-5)
    assert float(policy.grad[3]) == pytest.approx(-grad, rel=1e-5)
    assert not terms.chosen_rewards.requires_grad  # rewards are reported, not trained


def test_log_probs_sum_the_response_tokens_only() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, requires_grad=True)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 7, 1, IGNORE_INDEX],  # padded tail
                           [IGNORE_INDEX, 5, 2, 2, 9, 4]])
    got = response_logps(logits, labels)
    logp = F.log_softmax(logits.detach().double(), dim=-1)
    for row in range(2):
        expected = sum(float(logp[row, t - 1, labels[row, t]]) for t in range(1, 6)
                       if labels[row, t] != IGNORE_INDEX)
        assert float(got[row].detach()) == pytest.approx(expected, rel=1e-6)
    got.sum().backward()  # no gradient reaches positions that predict prompt or padding
    assert torch.all(logits.grad[0, [0, 4, 5]] == 0) and torch.all(logits.grad[1, 5] == 0)
    assert torch.all(logits.grad[0, 1] != 0)


def test_pairs_share_one_prompt_and_collate_chosen_first(tmp_path: Path) -> None:
    bundle = tiny_llama(adapter=False)
    row = {"prompt": "Human: hi there, tell me a long story please " * 6 + "Assistant:",
           "chosen": " ok", "rejected": " no, that is a very long answer " * 5}
    path = write_pairs(tmp_path / "long.jsonl", [row])
    records = load_records(str(path), DataConfig(path=str(path), format="preference"))
    example = tokenize_records(records, bundle.tokenizer, fmt="preference", task="causal_lm",
                               max_length=48).examples[0]
    assert example is not None
    prompt = example["prompt_ids"]
    assert len(example["chosen_input_ids"]) <= 48 and len(example["rejected_input_ids"]) == 48
    for side in ("chosen", "rejected"):  # the same (cut) prompt, unsupervised, on both sides
        assert example[f"{side}_input_ids"][: len(prompt)] == prompt
        assert example[f"{side}_labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
        assert IGNORE_INDEX not in example[f"{side}_labels"][len(prompt):]
    batch = collate_pairs([example, example], pad_token_id=0)
    assert batch["input_ids"].shape == (4, 48)
    assert batch["labels"][0].tolist()[: len(example["chosen_labels"])] == \
        example["chosen_labels"]
    assert batch["labels"][3].tolist() == example["rejected_labels"]
    assert batch["attention_mask"][0].sum() == len(example["chosen_input_ids"])
    assert example_length(example) == len(example["chosen_input_ids"]) + 48


# --------------------------------------------------------------------------- the reference


def test_reference_is_the_base_model_with_no_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = tiny_llama()
    model = bundle.model
    randomize_lora_b(model)  # the policy now differs from the base model
    batch = collate_pairs(pair_examples(bundle), pad_token_id=0)
    base = tiny_llama(adapter=False).model  # the same seed: the same base weights
    with torch.no_grad():
        expected = sequence_logps(base.eval(), batch)
    monkeypatch.setattr(copy, "deepcopy", lambda *a, **k: pytest.fail("deepcopy"))
    embed = model.get_input_embeddings()
    calls: list[int] = []
    embed.register_forward_hook(lambda *_: calls.append(1))
    params_before = [(n, p.data_ptr()) for n, p in model.named_parameters()]
    model.train()
    reference = reference_logps(model, batch)
    policy = sequence_logps(model, batch)
    torch.testing.assert_close(reference, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(policy, reference, atol=1e-3)  # the adapter is back on after
    assert calls == [1, 1]  # both passes ran through the one embedding module
    assert [(n, p.data_ptr()) for n, p in model.named_parameters()] == params_before
    assert model.training and not reference.requires_grad


def test_at_initialisation_policy_is_reference_so_loss_is_log2() -> None:
    bundle = tiny_llama()  # LoRA B = 0
    batch = collate(pair_examples(bundle), pad_token_id=0, task="causal_lm")
    for smoothing in (0.0, 0.25):
        loss_fn = DPOLoss(DPOConfig(beta=0.1, label_smoothing=smoothing))
        bundle.model.train()
        loss = loss_fn(bundle.model, batch)
        assert float(loss.detach()) == pytest.approx(LOG2, abs=1e-7)
        stats = loss_fn.stats.metrics()
        assert stats["reward_margin"] == 0.0 and stats["chosen_reward"] == 0.0
        assert stats["preference_accuracy"] == 0.0  # a tie is not a win
    loss.backward()  # the gradient still moves the adapter (B first), never the base
    grads = {n: p.grad for n, p in bundle.model.named_parameters() if p.requires_grad}
    assert any(float(g.abs().sum()) > 0 for n, g in grads.items() if "lora_B" in n)
    assert all(p.grad is None for p in bundle.model.parameters() if not p.requires_grad)


def test_evaluation_scores_pairs_under_the_configured_beta() -> None:
    bundle = tiny_llama()
    randomize_lora_b(bundle.model)
    examples = pair_examples(bundle, rows=6)
    collate_fn = lambda rows: collate(rows, pad_token_id=0, task="causal_lm")  # noqa: E731
    metrics = {beta: evaluate_examples(bundle.model, examples, task="causal_lm",
                                       collate_fn=collate_fn, batch_size=4, device=CPU,
                                       dpo=DPOConfig(beta=beta))
               for beta in (0.1, 0.5)}
    low, high = metrics[0.1], metrics[0.5]
    assert set(low) == {"dpo_loss", "preference_accuracy", "reward_margin", "chosen_reward",
                        "rejected_reward", "examples"} and low["examples"] == len(examples)
    assert high["chosen_reward"] == pytest.approx(5 * low["chosen_reward"], rel=1e-4)
    assert high["preference_accuracy"] == low["preference_accuracy"]
    batch = collate_pairs(examples, pad_token_id=0)
    with torch.no_grad():
        terms = dpo_terms(sequence_logps(bundle.model.eval(), batch),
                          reference_logps(bundle.model, batch), beta=0.1)
    assert low["dpo_loss"] == pytest.approx(float(terms.losses.mean()), rel=1e-5)
    margin = terms.chosen_rewards - terms.rejected_rewards
    assert low["reward_margin"] == pytest.approx(float(margin.mean()), rel=1e-4, abs=1e-6)
    assert low["preference_accuracy"] == pytest.approx(float((margin > 0).float().mean()))
    assert primary_metric("causal_lm", "preference") == ("preference_accuracy", True)


def test_the_fast_path_probes_a_preference_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedfm.config import RuntimeConfig
    from fedfm.runtime import fast

    timed = fast.time_training_step  # one timed forward + backward per candidate is enough here
    monkeypatch.setattr(fast, "time_training_step",
                        lambda model, batch, loss_fn, autocast, **_: timed(
                            model, batch, loss_fn, autocast, repeats=1, warmup=0))
    bundle = tiny_llama()
    probe = collate_pairs(pair_examples(bundle, rows=2, max_length=48), pad_token_id=0)
    plan, _, _ = prepare_fast_path(bundle, RuntimeConfig(), CPU, probe)
    assert plan.attention in ("sdpa", "eager") and plan.attention_source == "measured"
    assert plan.fused_loss, plan.fused_loss_note


# --------------------------------------------------------------------------- data and config


@pytest.mark.parametrize(("bad", "message"), [
    ({"prompt": "p", "rejected": "r"}, r"line 3: missing field 'chosen'"),
    ({"prompt": "p", "chosen": "c", "rejected": ["r"]},
     r"line 3: field 'rejected' must be a string, got list"),
])
def test_schema_errors_name_the_field_and_the_row(tmp_path: Path, bad: dict,
                                                  message: str) -> None:
    good = {"prompt": "p", "chosen": "c", "rejected": "r"}
    path = write_pairs(tmp_path / "pairs.jsonl", [good, good, bad, good])
    with pytest.raises(DataError, match=message):
        build_federated_data(DataConfig(path=str(path), format="preference"), num_clients=1,
                             tokenizer=tiny_llama(adapter=False).tokenizer, task="causal_lm",
                             max_length=32, seed=0)


def test_config_pairs_preference_data_with_fed_dpo(lm_config) -> None:
    pref = {"path": str(PAIRS), "format": "preference"}
    with pytest.raises(ConfigError, match="preference.*fed_dpo"):
        check_components(lm_config(data=pref))  # preference data under fedavg
    with pytest.raises(ConfigError, match="fed_dpo needs preference data"):
        check_components(lm_config(algorithm={"name": "fed_dpo"}))
    dpo = {"data": pref, "algorithm": {"name": "fed_dpo"}}
    ok = lm_config(**dpo)
    check_components(ok)
    check_dpo(ok)
    refused = {
        "trains the base weights": {"adapter": {"kind": "bitfit"}},
        "packing": {"algorithm": {"local": {"packing": True}}},
        "dp_sgd": {"privacy": {"dp_sgd": {"noise_multiplier": 1.0}}},
        "finetune_steps": {"eval": {"finetune_steps": 2}},
        "label_flip": {"robustness": {"attack": {"kind": "label_flip"}}},
    }
    for match, changes in refused.items():
        with pytest.raises(ConfigError, match=match):
            check_dpo(lm_config(**deep_update(dpo, changes)))
    check_dpo(lm_config(**dpo, adapter={"kind": "ia3"}))
    with pytest.raises(ConfigError, match="algorithm.dpo is read by algorithm 'fed_dpo'"):
        check_dpo(lm_config(algorithm={"dpo": {"beta": 0.5}}))
    # a run directory's config.yaml lists every field, defaults included: resuming it is fine
    saved = lm_config().model_dump(mode="json")
    check_dpo(lm_config(algorithm=saved["algorithm"]))
    with pytest.raises(ConfigError, match="packing"):
        build_fed_dpo(AlgorithmConfig(name="fed_dpo", local={"packing": True}), 2)


# --------------------------------------------------------------------------- a federated run


def test_federated_dpo_run_learns_the_clients_preferences(lm_config) -> None:
    config = lm_config(
        model={"max_length": 64},
        data={"path": str(PAIRS), "format": "preference", "max_rows": 48,
              "validation_fraction": 0.1, "client_validation_fraction": 0.2},
        federation={"num_clients": 3, "clients_per_round": 3, "rounds": 2},
        algorithm={"name": "fed_dpo", "dpo": {"beta": 0.5},
                   "local": {"steps": 4, "batch_size": 4, "lr": 5e-3}},
        eval={"every": 2, "at_start": True, "batch_size": 16})
    result = fedfm.run(config)
    trained = [r for r in result.metrics if "clients" in r]
    for client in trained[-1]["clients"].values():  # per-client training metrics
        assert {"train_loss", "train_preference_accuracy", "train_reward_margin",
                "train_chosen_reward", "train_rejected_reward"} <= set(client)
    assert trained[-1]["train_loss"] < LOG2 - 0.05  # the DPO loss, mean over the clients
    assert 0.5 < trained[-1]["padding_efficiency"] < 1.0  # chosen + rejected rows, padded
    evals = [r["eval"] for r in result.metrics if "eval" in r]
    start, end = evals[0], evals[-1]
    assert start["global"]["dpo_loss"] == pytest.approx(LOG2, abs=1e-6)  # round 0: pi = ref
    assert start["global"]["reward_margin"] == 0.0
    wanted = {"dpo_loss", "preference_accuracy", "reward_margin", "chosen_reward",
              "rejected_reward"}
    assert wanted <= set(end["global"]) and end["global"]["dpo_loss"] != start["global"]["dpo_loss"]
    assert set(end["per_client"]) == {"0", "1", "2"}
    assert all(wanted <= set(m) for m in end["per_client"].values())
    assert "preference_accuracy_worst10" in end["fairness"]  # the headline across clients
    final = result.summary["final_metrics"]
    assert {"val_preference_accuracy", "val_reward_margin",
            "clients_preference_accuracy_mean"} <= set(final)
    # the final global model prefers the clients' chosen answers over their rejected ones
    workload = build_workload(config, build_algorithm(config))
    seen = [e for client in workload.data.clients for e in client.train]
    learned = workload.evaluate_examples(result.final_state, seen)
    assert learned["dpo_loss"] < LOG2 - 0.05 and learned["preference_accuracy"] > 0.6
    assert learned["reward_margin"] > 0
