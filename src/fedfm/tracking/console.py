"""Console output with rich: a progress bar over rounds, one over the clients of the current
round, one line per finished round (train loss, global metrics, worst-10% clients, clients
completed, bytes up / down, time per phase), and a one-screen summary at the end."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f}{unit}" if unit == "B" else f"{count:.1f}{unit}"
        count /= 1024
    return f"{count:.1f}GiB"


def headline_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The few numbers worth a line: train loss and the global eval metrics."""
    shown: dict[str, float] = {}
    if "train_loss" in record:
        shown["train_loss"] = record["train_loss"]
    global_eval = record.get("eval", {}).get("global", {})
    for key in ("loss", "perplexity", "accuracy", "macro_f1", "rouge_l", "dpo_loss",
                "preference_accuracy"):
        if key in global_eval:
            shown[f"val_{key}"] = global_eval[key]
    for section, prefix in (("fairness", "clients"), ("personalized_fairness", "personal")):
        for key, value in record.get("eval", {}).get(section, {}).items():
            if key.endswith(("_mean", "_worst10")) and (prefix == "personal"
                                                         or key.endswith("_worst10")):
                shown[f"{prefix}_{key}"] = value
    return shown


class ConsoleProgress:
    """Round observer driving rich progress bars."""

    def __init__(self, total_rounds: int, start_round: int = 0,
                 console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=self.console, transient=False)
        self.rounds_task = self.progress.add_task("rounds", total=total_rounds,
                                                  completed=start_round)
        self.clients_task = self.progress.add_task("clients", total=1, visible=False)

    def __enter__(self) -> ConsoleProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def on_round_start(self, round: int, selected: list[int]) -> None:
        self.progress.reset(self.clients_task, total=len(selected), visible=True,
                            description=f"round {round} clients")

    def on_client_done(self, round: int, outcome: Any) -> None:
        self.progress.advance(self.clients_task)

    def on_round_end(self, record: dict[str, Any]) -> None:
        round_index = record.get("round", 0)
        shown = "  ".join(f"{k}={_fmt(v)}" for k, v in headline_metrics(record).items())
        line = f"round {round_index}: {shown}"
        if "bytes_up" in record:
            line += (f"  clients={len(record.get('completed', []))}/"
                     f"{len(record.get('selected', []))}  up={_bytes(record['bytes_up'])}"
                     f"  down={_bytes(record.get('bytes_down', 0))}")
        phases = record.get("wall_time", {})
        if phases:
            line += "  time " + " ".join(f"{name}={phases.get(key, 0.0):.2f}s" for key, name in (
                ("clients", "train"), ("aggregate", "agg"), ("eval", "eval")))
        self.progress.console.print(line, markup=False)
        if round_index > 0:
            self.progress.advance(self.rounds_task)


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title=escape(f"fedfm run: {summary.get('name', '')}"), show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    for key in ("algorithm", "model", "adapter", "rounds", "num_clients", "clients_per_round"):
        if key in summary:
            table.add_row(key, escape(_fmt(summary[key])))
    table.add_row("trainable / communicated params", _fmt(summary.get("communicated_params")))
    table.add_row("wall time (s)", f"{summary.get('wall_time', 0.0):.1f}")
    table.add_row("bytes up / down", f"{summary.get('bytes_up', 0):,} / "
                                      f"{summary.get('bytes_down', 0):,}")
    for key, value in summary.get("final_metrics", {}).items():
        table.add_row(key, _fmt(value))
    table.add_row("run directory", escape(str(summary.get("run_dir", ""))))
    return table
