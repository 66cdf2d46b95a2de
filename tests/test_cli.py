"""The command line: run prints the run directory last, errors are one clean message."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from fedfm.cli import app

from .conftest import DATA, cls_config_dict

runner = CliRunner()


def _config(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cls_config_dict(tmp_path, **changes)))
    return path


def test_run_prints_run_directory_last_and_resume_continues(tmp_path) -> None:
    path = _config(tmp_path, federation={"rounds": 1})
    result = runner.invoke(app, ["run", str(path), "--quiet"])
    assert result.exit_code == 0, result.output
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    assert (run_dir / "summary.json").exists()
    again = runner.invoke(app, ["run", "--resume", str(run_dir), "--quiet",
                                "--set", "federation.rounds=2"])
    assert again.exit_code == 0, again.output
    assert Path(again.stdout.strip().splitlines()[-1]) == run_dir
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2


def test_bad_config_is_one_message_without_traceback(tmp_path) -> None:
    path = _config(tmp_path)
    result = runner.invoke(app, ["run", str(path), "--set", "adapter.kind=nope"])
    assert result.exit_code == 2
    assert "adapter.kind" in result.output and "Traceback" not in result.output


def test_missing_data_file_is_a_clean_error(tmp_path) -> None:
    path = _config(tmp_path, data={"path": str(tmp_path / "missing.jsonl")})
    result = runner.invoke(app, ["run", str(path), "--quiet"])
    assert result.exit_code == 2
    assert "missing.jsonl" in result.output and "Traceback" not in result.output


def test_data_stats_prints_per_client_table(tmp_path) -> None:
    result = runner.invoke(app, ["data", "stats", str(_config(tmp_path))])
    assert result.exit_code == 0, result.output
    assert "negative" in result.output or "0:" in result.output
    assert "total" in result.output.lower()


def test_validate_and_methods(tmp_path) -> None:
    ok = runner.invoke(app, ["validate", str(_config(tmp_path))])
    assert ok.exit_code == 0 and "ok" in ok.output
    listing = runner.invoke(app, ["methods"])
    assert listing.exit_code == 0
    for name in ("fedavg", "fedprox", "scaffold", "yogi", "dirichlet", "tiny-llama", "lora"):
        assert name in listing.output


def test_unsupported_adapter_and_markup_in_messages_are_clean(tmp_path) -> None:
    path = _config(tmp_path, model={"name": "tiny-llama"})  # classification data, causal LM
    result = runner.invoke(app, ["run", str(path), "--quiet"])
    assert result.exit_code == 2 and "needs task classification" in result.output
    bitfit = runner.invoke(app, ["run", str(_config(tmp_path)), "--quiet",
                                 "--set", "model.name=tiny-llama", "--set", "model.task=causal_lm",
                                 "--set", "data.path=" + str(DATA / "dolly_train.jsonl"),
                                 "--set", "data.format=instruction", "--set", "data.max_rows=40",
                                 "--set", "data.validation_path=null",
                                 "--set", "data.partition.kind=iid",
                                 "--set", "adapter.kind=bitfit"])
    assert bitfit.exit_code == 2 and "bitfit" in bitfit.output
    assert "Traceback" not in bitfit.output
    markup = runner.invoke(app, ["run", str(_config(tmp_path)), "--quiet",
                                 "--set", "data.text_field='[/x]'"])
    assert markup.exit_code == 2 and "[/x]" in markup.output
