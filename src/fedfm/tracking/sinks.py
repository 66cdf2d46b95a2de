"""Metrics sinks: every round record goes, flattened the same way, to each configured sink.

``metrics.jsonl`` (always, ``MetricsFileSink``) keeps the nested record; TensorBoard and MLflow
get ``flatten_record(record)``: one scalar per ``/``-joined path of a numeric leaf, e.g.
``train_loss``, ``eval/global/accuracy``, ``eval/fairness/accuracy_worst10``,
``eval/per_client/3/accuracy``, ``clients/3/train_loss``, ``clients/3/bytes_up``,
``bytes_up``, ``wall_time/clients``, ``wall_time/aggregate``, ``wall_time/eval``, plus
``clients_selected`` / ``clients_completed`` counts. Flattening is generic, so metrics that later
methods add to the record (a privacy budget, detection rates) reach every sink unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedfm.config import ConfigError

_COUNTED_LISTS = {"selected": "clients_selected", "completed": "clients_completed"}


def flatten_record(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a round record as ``{"a/b/c": value}`` (round, strings, flags and
    non-finite values left out; the id lists become counts)."""
    flat: dict[str, float] = {}
    for key, value in record.items():
        path = f"{prefix}{key}"
        if not prefix and key == "round":
            continue
        if not prefix and key in _COUNTED_LISTS and isinstance(value, list):
            flat[_COUNTED_LISTS[key]] = float(len(value))
        elif isinstance(value, Mapping):
            flat.update(flatten_record(value, prefix=f"{path}/"))
        elif (isinstance(value, int | float) and not isinstance(value, bool)
              and math.isfinite(value)):
            flat[path] = float(value)
    return flat


def check_sink_packages(tensorboard: bool, mlflow: bool, mlflow_uri: str | None = None) -> None:
    """Fail at config time, before any model loads, when a sink's package is missing."""
    import importlib.util

    wanted = [(tensorboard, "tensorboard", "tensorboard"), (mlflow, "mlflow", "mlflow")]
    if mlflow and (mlflow_uri is None or mlflow_uri.startswith("sqlite")):
        # the default store is sqlite, which MLflow reaches through sqlalchemy + alembic
        wanted += [(True, "sqlalchemy", "mlflow"), (True, "alembic", "mlflow")]
    for needed, package, extra in wanted:
        if needed and importlib.util.find_spec(package) is None:
            raise ConfigError(f"invalid config: tracking.{extra}: true needs the {package} "
                              f"package (pip install 'fedfm[{extra}]')")


class _RecordSink:
    """Observer base: only ``on_round_end`` matters to a metrics sink."""

    def on_round_start(self, round: int, selected: list[int]) -> None:
        return None

    def on_client_done(self, round: int, outcome: Any) -> None:
        return None

    def on_round_end(self, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self, status: str = "FINISHED") -> None:
        return None


class TensorBoardSink(_RecordSink):
    """Scalars per round in ``log_dir`` (``RUN_DIR/tensorboard`` by default); step = round."""

    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # torch raises this when tensorboard is missing
            raise ConfigError("tracking.tensorboard: true needs the tensorboard package "
                              "(pip install 'fedfm[tensorboard]')") from exc
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def on_round_end(self, record: dict[str, Any]) -> None:
        step = int(record.get("round", 0))
        for key, value in flatten_record(record).items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self, status: str = "FINISHED") -> None:
        self.writer.close()


class MLflowSink(_RecordSink):
    """One MLflow run per fedfm run (a resumed run continues it): the config as params, the
    flattened record as metrics with step = round. By default a local store in the run directory
    (``sqlite:///RUN_DIR/mlflow.db``: MLflow 3 keeps its plain-file store in maintenance mode and
    refuses it unless ``MLFLOW_ALLOW_FILE_STORE`` is set); any tracking URI can be configured."""

    RUN_ID_FILE = "mlflow_run_id"

    def __init__(self, run_dir: Path, *, tracking_uri: str | None, experiment: str,
                 run_name: str, params: Mapping[str, Any]) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise ConfigError("tracking.mlflow: true needs the mlflow package "
                              "(pip install 'fedfm[mlflow]')") from exc
        self.uri = tracking_uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=self.uri)
        experiment_id = self._experiment_id(experiment, run_dir)
        id_file = run_dir / self.RUN_ID_FILE
        if id_file.is_file():  # resumed: keep logging into the same MLflow run
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = self.client.create_run(experiment_id, run_name=run_name,
                                         tags={"fedfm.run_dir": str(run_dir.resolve())})
            self.run_id = run.info.run_id
            id_file.write_text(self.run_id)
            self._log_params(params)

    def _experiment_id(self, name: str, run_dir: Path) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        # artifacts (none are logged today) next to the store, never in the working directory
        artifacts = (run_dir / "mlartifacts").resolve().as_uri()
        return self.client.create_experiment(name, artifact_location=artifacts)

    def _log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = _flatten_params(params)
        batch = [Param(key, str(value)[:6000]) for key, value in flat.items()]
        for start in range(0, len(batch), 100):  # MLflow's per-call limit on params
            self.client.log_batch(self.run_id, params=batch[start:start + 100])

    def on_round_end(self, record: dict[str, Any]) -> None:
        import time

        from mlflow.entities import Metric

        step = int(record.get("round", 0))
        stamp = int(time.time() * 1000)
        metrics = [Metric(key, value, stamp, step)
                   for key, value in flatten_record(record).items()]
        for start in range(0, len(metrics), 1000):  # MLflow's per-call limit on metrics
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def _flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            flat.update(_flatten_params(value, prefix=f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
