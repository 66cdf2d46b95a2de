"""Tracking sinks (issue 4, item 3): JSONL, TensorBoard and MLflow receive the same numbers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fedfm import api
from fedfm.config import ConfigError
from fedfm.tracking.sinks import flatten_record

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")


def test_flatten_record_paths() -> None:
    record = {"round": 3, "selected": [1, 4, 5], "completed": [1, 5], "bytes_up": 10,
              "train_loss": 1.5, "clients": {"1": {"status": "ok", "train_loss": 2.0,
                                                   "wall_time": 0.5},
                                             "4": {"status": "dropped", "bytes_up": 0}},
              "eval": {"global": {"accuracy": 0.75, "loss": float("nan")},
                       "fairness": {"accuracy_worst10": 0.5}},
              "wall_time": {"clients": 1.0, "aggregate": 0.1, "eval": 0.2, "round": 1.4},
              "flag": True}
    assert flatten_record(record) == {
        "clients_selected": 3.0, "clients_completed": 2.0, "bytes_up": 10.0, "train_loss": 1.5,
        "clients/1/train_loss": 2.0, "clients/1/wall_time": 0.5, "clients/4/bytes_up": 0.0,
        "eval/global/accuracy": 0.75, "eval/fairness/accuracy_worst10": 0.5,
        "wall_time/clients": 1.0, "wall_time/aggregate": 0.1, "wall_time/eval": 0.2,
        "wall_time/round": 1.4}


def tensorboard_scalars(log_dir: Path) -> dict[tuple[str, int], float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {(tag, event.step): event.value
            for tag in events.Tags()["scalars"] for event in events.Scalars(tag)}


def mlflow_metrics(result: api.RunResult) -> tuple[dict[tuple[str, int], float], dict]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{result.run_dir / 'mlflow.db'}")
    run_id = (result.run_dir / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    values = {}
    for key in run.data.metrics:
        for metric in client.get_metric_history(run_id, key):
            values[(key, metric.step)] = metric.value
    return values, {"status": run.info.status, "params": run.data.params}


def test_every_sink_gets_the_same_numbers(cls_config) -> None:
    result = api.run(cls_config(
        tracking={"tensorboard": True, "mlflow": True},
        eval={"every": 1, "at_start": True},
        federation={"num_clients": 3, "clients_per_round": 2, "rounds": 2}))
    expected = {(key, int(record["round"])): value for record in result.metrics
                for key, value in flatten_record(record).items()}
    # what the issue names is there: global and per-client metrics, fairness, bytes, phases
    keys = {key for key, _ in expected}
    for wanted in ("train_loss", "eval/global/accuracy", "eval/fairness/accuracy_worst10",
                   "bytes_up", "bytes_down", "wall_time/clients", "wall_time/aggregate",
                   "wall_time/eval"):
        assert wanted in keys, wanted
    assert any(k.startswith("eval/per_client/") for k in keys)
    assert any(k.startswith("clients/") and k.endswith("/train_loss") for k in keys)
    assert (("eval/global/accuracy", 0)) in expected  # the evaluation at start

    board = tensorboard_scalars(result.run_dir / "tensorboard")
    assert board.keys() == expected.keys()
    for key, value in expected.items():  # TensorBoard stores float32
        assert math.isclose(board[key], value, rel_tol=1e-6, abs_tol=1e-12), key

    logged, info = mlflow_metrics(result)
    assert logged == expected  # MLflow stores doubles: exactly the JSONL numbers
    assert info["status"] == "FINISHED"
    assert info["params"]["algorithm.local.lr"] == "0.01"
    assert info["params"]["model.name"] == "tiny-bert"


def test_missing_sink_package_fails_before_loading(cls_config, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"tracking.mlflow: true needs the mlflow package"):
        api.check_components(cls_config(tracking={"mlflow": True}))
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sqlalchemy" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs the sqlalchemy package"):
        api.check_components(cls_config(tracking={"mlflow": True}))
    api.check_components(cls_config(tracking={"mlflow": True,  # a server needs no sqlalchemy
                                              "mlflow_tracking_uri": "http://127.0.0.1:5000"}))


def test_resumed_run_continues_the_same_mlflow_run(cls_config) -> None:
    from mlflow.tracking import MlflowClient

    first = api.run(cls_config(tracking={"mlflow": True},
                               federation={"num_clients": 3, "clients_per_round": 2,
                                           "rounds": 1}))
    run_id = (first.run_dir / "mlflow_run_id").read_text().strip()
    again = api.run(resume=first.run_dir, overrides=["federation.rounds=2"])
    assert (again.run_dir / "mlflow_run_id").read_text().strip() == run_id
    client = MlflowClient(tracking_uri=f"sqlite:///{first.run_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("fedfm").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    steps = [m.step for m in client.get_metric_history(run_id, "train_loss")]
    assert steps == [1, 2]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_run_result_history_and_dataframe(cls_config) -> None:
    result = api.run(cls_config(federation={"num_clients": 3, "clients_per_round": 2,
                                            "rounds": 2}))
    history = result.history
    assert [row["round"] for row in history] == [1, 2]
    assert history[1]["eval/global/accuracy"] == result.metrics[1]["eval"]["global"]["accuracy"]
    assert history[0]["train_loss"] == result.metrics[0]["train_loss"]
    pd = pytest.importorskip("pandas")
    frame = result.to_pandas()
    assert isinstance(frame, pd.DataFrame) and list(frame.index) == [1, 2]
    assert frame.loc[2, "bytes_up"] == result.metrics[1]["bytes_up"]


def test_console_line_shows_metrics_bytes_and_phases() -> None:
    from rich.console import Console

    from fedfm.tracking.console import ConsoleProgress

    console = Console(record=True, width=200)
    progress = ConsoleProgress(total_rounds=2, console=console)
    progress.on_round_end({"round": 1, "train_loss": 0.5, "selected": [0, 1, 2],
                           "completed": [0, 2], "bytes_up": 3 * 2**20, "bytes_down": 2048,
                           "eval": {"global": {"accuracy": 0.75}},
                           "wall_time": {"clients": 1.5, "aggregate": 0.02, "eval": 0.25}})
    text = console.export_text()
    for part in ("round 1:", "train_loss=0.5", "val_accuracy=0.75", "clients=2/3",
                 "up=3.0MiB", "down=2.0KiB", "train=1.50s", "agg=0.02s", "eval=0.25s"):
        assert part in text, part
