"""Reports (issue 4, item 4): a two-run comparison renders its table, plots and HTML page."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedfm import api
from fedfm.cli import app
from fedfm.tracking.report import ReportError, build_report, comparison_table, load_runs

pytest.importorskip("matplotlib")

FEW = {"federation": {"num_clients": 3, "clients_per_round": 2, "rounds": 3},
       "algorithm": {"local": {"steps": 2}}}


@pytest.fixture
def two_runs(cls_config) -> list[api.RunResult]:
    return [api.run(cls_config(name="fedavg", **FEW)),
            api.run(cls_config(name="fedprox", algorithm={"name": "fedprox", "mu": 0.1,
                                                          "local": {"steps": 2}},
                               federation=FEW["federation"]))]


def test_two_run_report_renders_everything(two_runs, tmp_path: Path) -> None:
    from PIL import Image

    out = tmp_path / "report"
    built = build_report([r.run_dir for r in two_runs], out, with_html=True)
    titles = set(built.figures)
    assert {"val_accuracy by round", "train_loss by round", "bytes communicated",
            "wall time per phase"} <= titles
    assert sum(t.startswith("per-client accuracy") for t in titles) == 2
    for png in built.figures.values():
        with Image.open(png) as image:  # a real, non-trivial picture
            assert image.format == "PNG" and image.size[0] >= 600 and image.size[1] >= 300
            assert len(set(image.convert("L").getdata())) > 20
    page = built.html.read_text()
    embedded = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(embedded) == len(built.figures)
    assert base64.b64decode(embedded[0])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "src='http" not in page and "<script" not in page  # offline, self-contained
    assert page.count("config.yaml</summary>") == 2 and "fedprox" in page


def test_comparison_table_numbers(two_runs) -> None:
    runs = load_runs([r.run_dir for r in two_runs])
    table = comparison_table(runs)
    assert [row["algorithm"] for row in table] == ["fedavg", "fedprox"]
    for row, result in zip(table, two_runs, strict=True):
        assert row["rounds"] == 3 and row["clients"] == "2/3"
        assert row["val_accuracy"] == result.summary["final_metrics"]["val_accuracy"]
        assert row["MB_up"] == pytest.approx(result.summary["bytes_up"] / 2**20)


def test_cli_report_and_bad_input(two_runs, tmp_path: Path) -> None:
    runner = CliRunner()
    done = runner.invoke(app, ["report", *(str(r.run_dir) for r in two_runs), "--out",
                               str(tmp_path / "r"), "--html"], env={"COLUMNS": "200"})
    assert done.exit_code == 0, done.output
    assert Path(done.stdout.strip().splitlines()[-1]).name == "report.html"
    assert "fedprox" in done.stdout
    bad = runner.invoke(app, ["report", str(tmp_path / "missing")])
    assert bad.exit_code == 2 and "not a fedfm run directory" in bad.output
    with pytest.raises(ReportError, match="at least one run"):
        load_runs([])
