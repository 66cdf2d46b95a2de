"""Robustness end to end (issue 6): attacks and robust aggregators inside real runs, their
metrics in the round records, config rules, and checkpointed aggregator state."""

from __future__ import annotations

import pytest

from fedfm import api
from fedfm.config import ConfigError

FED = {"num_clients": 6, "clients_per_round": 6, "rounds": 2}


def test_backdoor_run_reports_attack_success_and_detection(cls_config) -> None:
    config = cls_config(federation=FED, algorithm={"aggregator": "multi_krum",
                                                   "robust": {"byzantine_fraction": 0.2}},
                        robustness={"attack": {"kind": "backdoor", "fraction": 0.2,
                                               "target_label": 1}})
    result = api.run(config)
    for record in result.metrics:
        assert 0.0 <= record["eval"]["global"]["attack_success_rate"] <= 1.0
        attack = record["attack"]
        assert attack["kind"] == "backdoor" and len(attack["malicious"]) == 1
        assert {"detection_precision", "detection_recall"} <= set(attack)
        assert record["robust_aggregation"]["f"] == 1.0
    from fedfm.export.card import _robustness, _robustness_text
    from fedfm.tracking.run_record import read_run

    card = _robustness(read_run(result.run_dir))
    assert card["aggregator"] == "multi_krum" and card["byzantine_robust"] is True
    assert card["attacks_simulated"]["kind"] == "backdoor"
    assert "simulated attack: backdoor by 0.2 of the clients" in _robustness_text(card)


def test_model_poisoning_changes_what_the_server_aggregates(cls_config) -> None:
    clean = api.run(cls_config(federation=FED))
    attacked = api.run(cls_config(federation=FED, robustness={
        "attack": {"kind": "sign_flip", "fraction": 0.34}}))
    from fedfm.trust.robust.attacks import malicious_clients

    assert attacked.metrics[0]["attack"]["malicious"] == malicious_clients(6, 0.34, 0)
    assert len(attacked.metrics[0]["attack"]["malicious"]) == 2
    # the same honest updates in round 1 (clean run: the applied mean is their mean), but two
    # of six arrive negated (the exact identity is in test_poisoning.py)
    assert attacked.metrics[0]["update_norm"] == pytest.approx(clean.metrics[0]["update_norm"])
    assert abs(attacked.metrics[0]["attack"]["applied_update_norm"]
               - clean.metrics[0]["update_norm"]) > 1e-3
    from fedfm.core import state as S
    assert S.max_abs_diff(clean.final_state, attacked.final_state) > 1e-4


def test_language_model_backdoor_runs(lm_config) -> None:
    result = api.run(lm_config(robustness={"attack": {"kind": "backdoor", "fraction": 0.25,
                                                      "poison_fraction": 1.0}},
                               algorithm={"aggregator": "norm_bounding"},
                               federation={"num_clients": 4, "clients_per_round": 4,
                                           "rounds": 1}))
    record = result.metrics[-1]
    assert "attack_success_rate" in record["eval"]["global"]
    assert record["robust_aggregation"]["norm_bound"] > 0


def test_fltrust_takes_root_rows_out_of_validation(cls_config) -> None:
    algorithm_cfg = {"aggregator": "fltrust", "robust": {"root_rows": 12}}
    config = cls_config(federation=FED, algorithm=algorithm_cfg)
    algorithm = api.build_algorithm(config)
    workload = api.build_workload(config, algorithm)
    assert len(workload.data.global_validation) == 32 - 12
    result = api.run(config)
    assert result.metrics[-1]["robust_aggregation"]["root_norm"] > 0
    with pytest.raises(ConfigError, match="root_rows=40"):
        too_many = cls_config(federation=FED, algorithm={"aggregator": "fltrust",
                                                         "robust": {"root_rows": 40}})
        api.build_workload(too_many, api.build_algorithm(too_many))


def test_attack_config_rules(cls_config, lm_config) -> None:
    with pytest.raises(ConfigError, match="unknown poisoning attack 'nope'"):
        api.check_components(cls_config(robustness={"attack": {"kind": "nope"}}))
    with pytest.raises(ConfigError, match="'label_flip' needs classification data"):
        api.check_components(lm_config(robustness={"attack": {"kind": "label_flip"}}))
    with pytest.raises(ConfigError, match="fraction"):
        cls_config(robustness={"attack": {"kind": "ipm", "fraction": 0.0}})
    with pytest.raises(ConfigError, match="byzantine_fraction"):
        cls_config(algorithm={"robust": {"byzantine_fraction": 0.5}})


def test_aggregator_state_is_checkpointed_and_resumed(cls_config, tmp_path) -> None:
    fed = {"num_clients": 5, "clients_per_round": 5, "rounds": 3}
    whole = api.run(cls_config(federation=fed, algorithm={"aggregator": "centered_clipping"}))
    first = api.run(cls_config(federation={**fed, "rounds": 2},
                               algorithm={"aggregator": "centered_clipping"},
                               tracking={"output_dir": str(tmp_path / "split"),
                                         "console": False}))
    import yaml
    saved = first.run_dir / "config.yaml"
    raw = yaml.safe_load(saved.read_text())
    raw["federation"]["rounds"] = 3
    saved.write_text(yaml.safe_dump(raw))
    resumed = api.run(resume=first.run_dir)
    from fedfm.core import state as S
    assert S.max_abs_diff(whole.final_state, resumed.final_state) < 1e-6
