"""Config errors are caught before any work, naming the field path, the bad value and what
is allowed; --set overrides parse as YAML values."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedfm import api
from fedfm.config import ConfigError, apply_overrides, load_config

from .conftest import cls_config_dict


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_example_configs_are_valid() -> None:
    root = Path(__file__).resolve().parents[1] / "examples"
    for path in sorted(root.glob("*.yaml")):
        config = load_config(path)
        api.check_components(config)


def test_unknown_key_is_named_with_its_path(tmp_path) -> None:
    raw = cls_config_dict(tmp_path)
    raw["algorithm"]["local"]["learning_rate"] = 0.1
    with pytest.raises(ConfigError, match=r"algorithm\.local\.learning_rate: unknown key"):
        load_config(_write(tmp_path, raw))


def test_bad_literal_lists_the_allowed_values(tmp_path) -> None:
    raw = cls_config_dict(tmp_path)
    raw["adapter"]["kind"] = "lorax"
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, raw))
    message = str(info.value)
    assert "adapter.kind" in message and "'lorax'" in message and "'prefix_tuning'" in message


def test_out_of_range_value_names_field_and_value(tmp_path) -> None:
    raw = cls_config_dict(tmp_path)
    raw["federation"]["dropout_prob"] = 1.5
    with pytest.raises(ConfigError, match=r"federation\.dropout_prob: .*less than 1.*1\.5"):
        load_config(_write(tmp_path, raw))


def test_missing_required_field(tmp_path) -> None:
    raw = cls_config_dict(tmp_path)
    del raw["data"]["path"]
    with pytest.raises(ConfigError, match=r"data\.path: required field is missing"):
        load_config(_write(tmp_path, raw))


def test_cross_field_errors(tmp_path) -> None:
    raw = cls_config_dict(tmp_path)
    raw["federation"]["clients_per_round"] = 9
    with pytest.raises(ConfigError, match="clients_per_round=9 exceeds num_clients=4"):
        load_config(_write(tmp_path, raw))


def test_unknown_component_names_are_rejected_before_loading(tmp_path) -> None:
    for override, field in (("algorithm.name=fedsgd", "algorithm.name"),
                            ("algorithm.server_optimizer.name=lamb",
                             "algorithm.server_optimizer.name"),
                            ("runtime.kind=mpi", "runtime.kind")):
        path = _write(tmp_path, cls_config_dict(tmp_path))
        config = load_config(path, [override]) if "server_optimizer" not in override else None
        if config is None:  # server optimizer names are a closed Literal: schema error
            with pytest.raises(ConfigError, match=field):
                load_config(path, [override])
            continue
        with pytest.raises(ConfigError, match=rf"{field}: unknown .*available: "):
            api.check_components(config)


def test_overrides_set_nested_values_as_yaml(tmp_path) -> None:
    path = _write(tmp_path, cls_config_dict(tmp_path))
    config = load_config(path, ["algorithm.local.lr=3e-4", "adapter.target_modules=[query]",
                                "federation.fraction=0.5", "federation.clients_per_round=null"])
    assert config.algorithm.local.lr == 3e-4
    assert config.adapter.target_modules == ["query"]
    assert config.federation.sample_size() == 2


def test_override_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["algorithm.lr"])
    with pytest.raises(ConfigError, match="seed is a value, not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])
    path = _write(tmp_path, cls_config_dict(tmp_path))
    with pytest.raises(ConfigError, match=r"algorithm\.local\.steps"):
        load_config(path, ["algorithm.local.steps=many"])


def test_not_a_file_or_not_yaml(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_config_hash_is_stable_and_sensitive(tmp_path) -> None:
    path = _write(tmp_path, cls_config_dict(tmp_path))
    assert load_config(path).config_hash() == load_config(path).config_hash()
    assert load_config(path).config_hash() != load_config(path, ["seed=5"]).config_hash()
