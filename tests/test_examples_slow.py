"""The shipped examples, run for real (slow: `make test-all` or `pytest -m slow`)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fedfm import api

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
def test_quickstart_reaches_080_accuracy_within_five_minutes(tmp_path) -> None:
    start = time.perf_counter()
    result = api.run(EXAMPLES / "quickstart.yaml",
                     overrides=[f"tracking.output_dir={tmp_path}"], console=False)
    elapsed = time.perf_counter() - start
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["final_metrics"]["val_accuracy"] >= 0.80
    assert elapsed <= 300, f"quickstart took {elapsed:.0f} s"


@pytest.mark.slow
def test_instruction_dolly_lowers_validation_loss(tmp_path) -> None:
    result = api.run(EXAMPLES / "instruction_dolly.yaml",
                     overrides=[f"tracking.output_dir={tmp_path}", "eval.at_start=true"],
                     console=False)
    losses = [r["eval"]["global"]["loss"] for r in result.metrics if "eval" in r]
    assert losses[-1] < losses[0]
    assert "rouge_l" in result.metrics[-1]["eval"]["global"]
    assert len(result.summary["client_train_sizes"]) == 8
