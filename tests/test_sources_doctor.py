"""Hub paths and ``fedfm doctor`` (issue 4, item 6)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedfm.cli import app
from fedfm.config import ConfigError, config_from_dict
from fedfm.data import DataError
from fedfm.data.sources import looks_like_hub_id, read_rows


def test_model_path_is_a_synonym_of_name() -> None:
    base = {"data": {"path": "x.jsonl", "format": "instruction"}}
    config = config_from_dict({**base, "model": {"path": "Qwen/Qwen2.5-0.5B"}})
    assert config.model.name == "Qwen/Qwen2.5-0.5B"
    with pytest.raises(ConfigError, match="model.name .* and model.path .* disagree"):
        config_from_dict({**base, "model": {"name": "tiny-llama", "path": "tiny-bert"}})


def test_a_directory_of_data_files_reads_them_all_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "b.jsonl").write_text('{"text": "b1"}\n{"text": "b2"}\n')
    (tmp_path / "a.csv").write_text("text\na1\n")
    (tmp_path / "notes.md").write_text("ignored")
    rows = read_rows(str(tmp_path))
    assert [r["text"] for r in rows.rows] == ["a1", "b1", "b2"]
    assert rows.locations[1].endswith("b.jsonl, line 1")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no data files"):
        read_rows(str(empty))


def test_hub_ids_are_told_apart_from_paths() -> None:
    assert looks_like_hub_id("databricks/databricks-dolly-15k")
    for path in ("data/train.jsonl", "./x/y", "/abs/x", "a/b/c", "single", "x/y.csv"):
        assert not looks_like_hub_id(path)


def test_hub_dataset_goes_through_datasets_load_dataset(monkeypatch) -> None:
    import datasets

    calls = []

    def fake_load(dataset_id: str, split: str):
        calls.append((dataset_id, split))
        return datasets.Dataset.from_list([{"text": "hub row", "label": 1}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    rows = read_rows("stanfordnlp/sst2::validation")
    assert calls == [("stanfordnlp/sst2", "validation")]
    assert rows.rows == [{"text": "hub row", "label": 1}]
    assert rows.locations == ["stanfordnlp/sst2::validation, row 0"]


def test_unreachable_hub_dataset_names_the_id(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"hub dataset 'nobody-here/no-such-set' \(split 'train'"
                                        r"\) failed"):
        read_rows("nobody-here/no-such-set")


def test_doctor_reports_versions_devices_and_reachability(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    runner = CliRunner()
    done = runner.invoke(app, ["doctor", "--json"])
    assert done.exit_code == 0, done.output
    found = json.loads(done.stdout)
    import torch

    assert found["packages"]["core"]["torch"] == torch.__version__.split("+")[0] or \
        found["packages"]["core"]["torch"] == torch.__version__
    assert found["devices"]["cuda"]["available"] == torch.cuda.is_available()
    assert found["devices"]["cpu"]["threads"] == torch.get_num_threads()
    hub = found["reachable"]["huggingface_hub"]
    assert hub["reachable"] is False and hub["why"] == "HF_HUB_OFFLINE is set"
    assert "tensorboard" in found["packages"]["optional"]
    shown = runner.invoke(app, ["doctor"], env={"COLUMNS": "200", "HF_HUB_OFFLINE": "1"})
    assert shown.exit_code == 0 and "huggingface hub" in shown.output
