"""Shared fixtures: small run configs over the shipped real data subsets."""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

from fedfm.config import RunConfig, config_from_dict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the attention choice cache: one per test session, never the user's
os.environ.setdefault("FEDFM_CACHE_DIR", tempfile.mkdtemp(prefix="fedfm-cache-"))

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"

SMALL_LLAMA = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 4}


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """A test that builds a workload in process with ``runtime.num_threads`` (the deploy tests'
    coordinator: 1) must not leave every later test on that many threads."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def deep_update(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = value
    return out


def lm_config_dict(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    base = {
        "name": "test-lm",
        "seed": 0,
        "model": {"name": "tiny-llama", "max_length": 96, "config_overrides": SMALL_LLAMA},
        "adapter": {"kind": "lora", "r": 4, "alpha": 8},
        "data": {"path": str(DATA / "dolly_train.jsonl"), "format": "instruction",
                 "max_rows": 120, "validation_fraction": 0.1,
                 "partition": {"kind": "iid"}},
        "federation": {"num_clients": 4, "clients_per_round": 2, "rounds": 3},
        "algorithm": {"name": "fedavg", "local": {"steps": 3, "batch_size": 4, "lr": 5e-3}},
        "eval": {"every": 1, "batch_size": 16, "max_examples": 8},
        "tracking": {"output_dir": str(tmp_path / "runs"), "console": False},
    }
    return deep_update(base, changes)


def cls_config_dict(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    base = {
        "name": "test-cls",
        "seed": 0,
        "model": {"name": "tiny-bert", "max_length": 48},
        "adapter": {"kind": "lora", "r": 4, "alpha": 8},
        "data": {"path": str(DATA / "sst2_train.jsonl"), "format": "classification",
                 "text_field": "sentence", "label_field": "label", "max_rows": 200,
                 "label_names": ["negative", "positive"],
                 "validation_path": str(DATA / "sst2_validation.jsonl"),
                 "max_validation_rows": 32,
                 "partition": {"kind": "dirichlet", "alpha": 1.0, "min_size": 10}},
        "federation": {"num_clients": 4, "clients_per_round": 2, "rounds": 2},
        "algorithm": {"name": "fedavg", "local": {"steps": 2, "batch_size": 8, "lr": 1e-2}},
        "eval": {"every": 1, "batch_size": 32},
        "tracking": {"output_dir": str(tmp_path / "runs"), "console": False},
    }
    return deep_update(base, changes)


@pytest.fixture
def lm_config(tmp_path: Path):
    def make(**changes: Any) -> RunConfig:
        return config_from_dict(lm_config_dict(tmp_path, **changes))

    return make


@pytest.fixture
def cls_config(tmp_path: Path):
    def make(**changes: Any) -> RunConfig:
        return config_from_dict(cls_config_dict(tmp_path, **changes))

    return make
