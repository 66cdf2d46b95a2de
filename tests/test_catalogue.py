"""The methods catalogue (issue 4, item 5): built from the registries, every snippet valid."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from fedfm.catalogue import LEAVES, CatalogueError, catalogue, entries, registries
from fedfm.cli import app
from fedfm.config import config_from_dict
from fedfm.core.registry import Registry
from tests.conftest import deep_update

BASE = {"model": {"name": "tiny-llama"}, "data": {"path": "x.jsonl", "format": "instruction"}}
CLASSIFICATION = {"model": {"name": "tiny-bert"},
                  "data": {"path": "x.jsonl", "format": "classification"}}


def test_every_registered_component_is_in_the_catalogue() -> None:
    listed = {(e.registry, e.name) for e in entries()}
    registered = {(r.kind, name) for r in registries() for name in r.names()}
    assert listed == registered
    shown = {(m["registry"], m["name"]) for leaf in catalogue()["leaves"]
             for m in leaf["methods"]}
    assert shown == registered


@pytest.mark.parametrize("entry", entries(), ids=lambda e: f"{e.registry}:{e.name}")
def test_each_config_snippet_enables_its_method(entry) -> None:
    snippet = yaml.safe_load(entry.info.config)
    base = CLASSIFICATION if entry.name == "head" else BASE  # head tuning: classifiers only
    config = config_from_dict(deep_update(base, snippet)).model_dump()
    where = {"adapter": ("adapter", "kind"), "algorithm": ("algorithm", "name"),
             "server optimizer": ("algorithm", "server_optimizer", "name"),
             "partitioner": ("data", "partition", "kind"), "runtime": ("runtime", "kind"),
             "aggregator": ("algorithm", "aggregator"),
             "poisoning attack": ("robustness", "attack", "kind")}
    if entry.registry == "attack":  # run after training; the snippet sets what it needs
        if entry.name == "canary_exposure":
            assert config["eval"]["canaries"] is not None
        return
    if entry.registry == "privacy mechanism":
        assert config["privacy"][entry.name] is not None
        return
    if entry.registry == "compressor":
        kinds = [step["kind"] for step in config["algorithm"]["compression"]["chain"]]
        assert entry.name in kinds
        return
    if entry.registry == "skew method":  # a list: the snippet lists the method
        assert entry.name in [item["name"] for item in config["algorithm"]["skew"]]
        return
    if entry.name == "secure_mean":  # chosen by privacy.secure_aggregation
        assert config["privacy"]["secure_aggregation"] is not None
        return
    value = config
    for key in where[entry.registry]:
        value = value[key]
    assert value == entry.name


def test_taxonomy_reaches_the_leaves_the_survey_names() -> None:
    titles = {title for path in LEAVES.values() for title in path}
    for wanted in ("Selective tuning", "Prompt tuning", "Reparameterization-based tuning (LoRA)",
                   "Split learning", "Zeroth-order optimization", "Personalization",
                   "Clustering", "Black-box tuning", "Privacy attacks", "Poisoning attacks"):
        assert wanted in titles
    assert {path[0] for path in LEAVES.values()} == {"Efficiency", "Adaptability",
                                                     "Trustworthiness"}


def test_a_component_without_catalogue_info_is_an_error(monkeypatch) -> None:
    import fedfm.catalogue as cat

    bare: Registry[object] = Registry("widget")
    bare.register("nameless")(object())
    monkeypatch.setattr(cat, "registries", lambda: [bare])
    with pytest.raises(CatalogueError, match="widget 'nameless' is registered without"):
        cat.entries()


def test_cli_methods_table_and_json() -> None:
    runner = CliRunner()
    shown = runner.invoke(app, ["methods"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert "Reparameterization-based tuning (LoRA)" in shown.output
    assert "adapter: {kind: lora" in shown.output
    dumped = runner.invoke(app, ["methods", "--json"])
    data = json.loads(dumped.stdout)
    names = {m["name"] for leaf in data["leaves"] for m in leaf["methods"]}
    assert {"lora", "fedavg", "scaffold", "dirichlet", "batched", "adam"} <= names
    assert "tiny-llama" in data["model_presets"]
