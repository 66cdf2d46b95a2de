"""Membership inference (issue 5, item 5, first part): the statistics against their definitions,
and the attack finding a signal where there is one and none where there is none."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from fedfm import api
from fedfm.cli import app
from fedfm.trust.attacks.membership import (
    attack_report,
    membership_inference,
    roc_auc,
    tpr_at_fpr,
)


def test_auc_is_the_pairwise_win_rate_with_half_ties() -> None:
    rng = np.random.default_rng(0)
    members = rng.integers(0, 6, size=40).astype(float)  # many ties
    others = rng.integers(0, 5, size=30).astype(float)
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0
               for a, b in itertools.product(members, others))
    assert roc_auc(members, others) == pytest.approx(wins / (40 * 30), abs=1e-12)
    assert roc_auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0


def test_tpr_at_one_percent_fpr() -> None:
    others = np.arange(1000, dtype=float)  # the top 1% of non-members: 990..999
    members = np.array([995.5, 999.5, 1200.0, 10.0])
    assert tpr_at_fpr(members, others) == pytest.approx(0.75)  # 3 of 4 above the 99th pct
    flat = np.zeros(100)
    assert tpr_at_fpr(np.zeros(10), flat) == 0.0  # ties never count as flagged


def test_identical_models_give_no_signal() -> None:
    losses_in, losses_out = np.random.default_rng(1).random((2, 200))
    found = membership_inference(losses_in, losses_out, losses_in, losses_out)
    assert found["reference_calibrated"]["auc"] == 0.5  # every calibrated score is 0
    assert attack_report(-losses_in, -losses_out)["members"] == 200


def test_attack_on_an_overfit_run_and_cli(cls_config) -> None:
    overfit = cls_config(
        data={"max_rows": 32, "max_validation_rows": 400},
        runtime={"attention": "eager"},  # measured choices may differ run to run
        federation={"num_clients": 2, "clients_per_round": 2, "rounds": 4},
        adapter={"kind": "full"},
        algorithm={"local": {"steps": 60, "batch_size": 16, "lr": 1e-3}})
    result = api.run(overfit)
    runner = CliRunner()
    done = runner.invoke(app, ["attack", "privacy", str(result.run_dir), "--clients", "1",
                               "--json"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert report == json.loads((result.run_dir / "attacks" / "privacy.json").read_text())
    # 32 members against 200 non-members: the AUC's standard error is about 0.05. Over seeds
    # 0-2 on a host without AVX-512 the global model gave 0.68-0.79 (loss), 0.61-0.81 (trained
    # reference), 0.54-0.70 (start). Which calibration wins varies with seed and CPU on this
    # tiny random-init model, so the test only asks each attack to find the memorised rows.
    assert report["global"]["loss_threshold"]["auc"] > 0.62
    assert report["global"]["reference_calibrated"]["auc"] > 0.57
    assert len(report["clients"]) == 1
    client = next(iter(report["clients"].values()))
    assert client["loss_threshold"]["members"] > 0 and client["loss_threshold"]["auc"] > 0.62
    shown = runner.invoke(app, ["attack", "privacy", str(result.run_dir), "--clients", "0"],
                          env={"COLUMNS": "160"})
    assert shown.exit_code == 0 and "reference_calibrated" in shown.output


# --------------------------------------------------------------------------- canaries, tokens


@pytest.mark.slow
def test_canaries_are_planted_and_exposed(lm_config) -> None:
    from fedfm.trust.attacks.evaluate import privacy_attacks

    canaries = {"client": 0, "count": 2, "repeats": 30, "secret_length": 4,
                "candidates": 300}
    config = lm_config(eval={"every": 3, "max_examples": 8, "canaries": canaries},
                       adapter={"kind": "full"},
                       federation={"num_clients": 2, "clients_per_round": 2, "rounds": 3},
                       algorithm={"local": {"steps": 20, "batch_size": 8, "lr": 3e-3}})
    result = api.run(config)
    report = privacy_attacks(result.run_dir, max_examples=50, clients=1)
    found = report["canaries"]
    assert len(found["global"]) == 2 and found["client"] == 0
    for trained, untouched in zip(found["global"], found["reference"], strict=True):
        assert trained["max_exposure_bits"] == pytest.approx(4 * np.log2(10))
        assert trained["exposure_bits"] > untouched["exposure_bits"] + 2  # memorised
        assert trained["rank_in_candidates"] < untouched["rank_in_candidates"]


def test_tokens_are_read_off_an_embedding_update(lm_config) -> None:
    from fedfm.trust.attacks.evaluate import privacy_attacks

    result = api.run(lm_config(adapter={"kind": "full"}, eval={"enabled": False},
                               federation={"num_clients": 2, "clients_per_round": 2,
                                           "rounds": 1}))
    report = privacy_attacks(result.run_dir, max_examples=20, clients=1)
    tokens = next(iter(report["clients"].values()))["token_recovery"]
    # every recovered token was really fed; a token seen only as a row's last token predicts
    # nothing in a causal LM, gets no gradient and stays hidden
    assert tokens["applicable"] and tokens["precision"] == 1.0 and tokens["recall"] > 0.95
    assert tokens["true_tokens"] > 20


def test_lora_runs_leak_tokens_through_the_first_layer_update(lm_config) -> None:
    from fedfm.trust.attacks.evaluate import privacy_attacks

    result = api.run(lm_config(federation={"num_clients": 2, "clients_per_round": 2,
                                           "rounds": 1}))
    report = privacy_attacks(result.run_dir, max_examples=20, clients=1)
    tokens = next(iter(report["clients"].values()))["token_recovery"]
    assert tokens["applicable"] and tokens["method"] == "first_layer_span"
    # 3 Adam steps on ~380 token positions against a rank-8 update: a weak but real signal
    # (the exact and strong cases are in test_token_recovery.py)
    assert tokens["auc"] > 0.5 and tokens["true_tokens"] > 20


def test_canaries_need_causal_lm_data(cls_config) -> None:
    from fedfm.config import ConfigError

    with pytest.raises(ConfigError, match="eval.canaries needs causal-LM data"):
        cls_config(eval={"canaries": {"client": 0}})


def test_reference_model_is_trained_with_the_runs_privacy_mechanism(cls_config) -> None:
    from fedfm.core import state as state_ops
    from fedfm.trust.attacks.evaluate import train_reference

    clip = 1e-3
    config = cls_config(privacy={"client_dp": {"noise_multiplier": 0.0, "clip_norm": clip,
                                               "sampling": "fixed"}})
    algorithm = api.build_algorithm(config)
    workload = api.build_workload(config, algorithm)
    start = workload.get_state()
    population = workload.data.global_validation[:16]
    reference = train_reference(workload, config, population, start)
    moved = state_ops.global_norm(state_ops.sub(reference, start))
    # DP-FedAvg's server moves by at most the clip norm per round (2 rounds here)
    assert 0 < moved <= 2 * clip * 1.001
    plain = cls_config()
    unclipped = train_reference(workload, plain, population, start)
    assert state_ops.global_norm(state_ops.sub(unclipped, start)) > 10 * moved
