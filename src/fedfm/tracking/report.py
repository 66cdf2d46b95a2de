"""``fedfm report``: compare runs in a table, plot them, and write one offline HTML page.

Plots (matplotlib, PNG): each metric against rounds with the runs overlaid; the per-client spread
of the primary metric as a box per evaluated round; cumulative bytes communicated; wall time per
phase (client training, aggregation, evaluation) per round. The HTML page embeds the plots (base64)
and each run's config, so it opens offline and can be mailed as one file.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedfm.tracking.run_record import RunRecord, RunRecordError, read_run

PRIMARY_METRICS = ("accuracy", "preference_accuracy", "rouge_l", "perplexity", "loss")
PHASES = (("clients", "client training"), ("aggregate", "aggregation"), ("eval", "evaluation"))


class ReportError(ValueError):
    """A run directory cannot be reported on; the message names it."""


@dataclass
class Report:
    table: list[dict[str, Any]]
    figures: dict[str, Path]  # title -> PNG
    html: Path | None


def load_runs(paths: list[Path]) -> list[RunRecord]:
    if not paths:
        raise ReportError("give at least one run directory")
    runs = []
    for path in paths:
        try:
            record = read_run(path)
        except RunRecordError as exc:
            raise ReportError(str(exc)) from exc
        if not record.metrics:
            raise ReportError(f"{path}/metrics.jsonl has no rounds yet")
        runs.append(record)
    return runs


def label(record: RunRecord) -> str:
    return record.path.name


def eval_series(record: RunRecord) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(round, value)] for train loss and every global evaluation metric."""
    series: dict[str, list[tuple[int, float]]] = {}
    for row in record.metrics:
        round_index = int(row.get("round", 0))
        if "train_loss" in row:
            series.setdefault("train_loss", []).append((round_index, row["train_loss"]))
        for key, value in row.get("eval", {}).get("global", {}).items():
            if isinstance(value, int | float) and key != "examples":
                series.setdefault(f"val_{key}", []).append((round_index, value))
    return series


def primary_metric(record: RunRecord) -> str | None:
    names = {k for row in record.metrics
             for client in row.get("eval", {}).get("per_client", {}).values() for k in client}
    return next((m for m in PRIMARY_METRICS if m in names), None)


def comparison_table(runs: list[RunRecord]) -> list[dict[str, Any]]:
    rows = []
    for record in runs:
        config, summary = record.config, record.summary
        final = summary.get("final_metrics") or {
            f"val_{k}": v for k, v in record.metrics_at(record.completed_rounds).items()
            if k != "round" and not k.startswith("clients_")}
        rows.append({
            "run": label(record), "model": config.model.name, "adapter": config.adapter.kind,
            "algorithm": config.algorithm.name, "rounds": record.completed_rounds,
            "clients": f"{config.federation.sample_size()}/{config.federation.num_clients}",
            **{k: v for k, v in final.items()
               if isinstance(v, int | float) and k != "val_examples"},
            "wall_s": sum(r.get("wall_time", {}).get("round", 0.0) for r in record.metrics),
            "MB_up": sum(r.get("bytes_up", 0) for r in record.metrics) / 2**20,
            "MB_down": sum(r.get("bytes_down", 0) for r in record.metrics) / 2**20,
        })
    return rows


# --------------------------------------------------------------------------- plots


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(runs: list[RunRecord], out: Path) -> dict[str, Path]:
    plt = _pyplot()
    names = sorted({name for record in runs for name in eval_series(record)})
    written = {}
    for name in names:
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for record in runs:
            points = eval_series(record).get(name)
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=label(record))
        ax.set_xlabel("round")
        ax.set_ylabel(name)
        ax.set_title(f"{name} by round")
        _integer_rounds(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        written[f"{name} by round"] = _save(fig, out / f"metric_{name}.png", plt)
    return written


def plot_client_spread(runs: list[RunRecord], out: Path) -> dict[str, Path]:
    plt = _pyplot()
    written = {}
    for record in runs:
        metric = primary_metric(record)
        if metric is None:
            continue
        rounds, values = [], []
        for row in record.metrics:
            per_client = row.get("eval", {}).get("per_client", {})
            scores = [c[metric] for c in per_client.values() if metric in c]
            if scores:
                rounds.append(int(row.get("round", 0)))
                values.append(scores)
        fig, ax = plt.subplots(figsize=(max(6.4, 0.5 * len(rounds) + 2), 4.0))
        ax.boxplot(values, tick_labels=[str(r) for r in rounds])
        ax.set_xlabel("round")
        ax.set_ylabel(f"client {metric} (own validation split)")
        ax.set_title(f"per-client {metric}: {label(record)}")
        ax.grid(alpha=0.3, axis="y")
        title = f"per-client {metric}: {label(record)}"
        written[title] = _save(fig, out / f"clients_{label(record)}.png", plt)
    return written


def plot_bytes(runs: list[RunRecord], out: Path) -> dict[str, Path]:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.0))
    for ax, key, title in ((axes[0], "bytes_up", "uploaded (clients to server)"),
                           (axes[1], "bytes_down", "downloaded (server to clients)")):
        for record in runs:
            rows = [r for r in record.metrics if int(r.get("round", 0)) > 0]
            total, cumulative = 0.0, []
            for row in rows:
                total += row.get(key, 0) / 2**20
                cumulative.append(total)
            ax.plot([int(r["round"]) for r in rows], cumulative, marker=".",
                    label=label(record))
        ax.set_xlabel("round")
        ax.set_ylabel("cumulative MiB")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        _integer_rounds(ax)
        ax.legend(fontsize="small")
    return {"bytes communicated": _save(fig, out / "bytes.png", plt)}


def plot_phases(runs: list[RunRecord], out: Path) -> dict[str, Path]:
    plt = _pyplot()
    fig, axes = plt.subplots(len(runs), 1, figsize=(8.0, 2.6 * len(runs) + 0.6),
                             squeeze=False)
    for ax, record in zip(axes[:, 0], runs, strict=True):
        rows = [r for r in record.metrics if "wall_time" in r]
        rounds = [int(r["round"]) for r in rows]
        bottom = [0.0] * len(rows)
        for key, name in PHASES:
            heights = [float(r["wall_time"].get(key, 0.0)) for r in rows]
            ax.bar(rounds, heights, bottom=bottom, label=name)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        ax.set_xlabel("round")
        ax.set_ylabel("seconds")
        ax.set_title(f"wall time per phase: {label(record)}")
        _integer_rounds(ax)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return {"wall time per phase": _save(fig, out / "phases.png", plt)}


def _integer_rounds(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- html


def write_html(runs: list[RunRecord], table: list[dict[str, Any]], figures: dict[str, Path],
               path: Path) -> Path:
    columns = list(dict.fromkeys(key for row in table for key in row))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(format_cell(row.get(c)))}</td>"
                                    for c in columns) + "</tr>" for row in table)
    images = "".join(
        f"<figure><img alt='{html.escape(title)}' src='data:image/png;base64,"
        f"{base64.b64encode(png.read_bytes()).decode()}'><figcaption>{html.escape(title)}"
        f"</figcaption></figure>" for title, png in figures.items())
    configs = "".join(
        f"<details><summary>{html.escape(label(r))}: config.yaml</summary><pre>"
        f"{html.escape((r.path / 'config.yaml').read_text(encoding='utf-8'))}</pre></details>"
        for r in runs)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>fedfm report</title>"
            f"<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}"
            f"td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}"
            f"figure{{display:inline-block;margin:1em}}img{{max-width:640px}}</style></head>"
            f"<body><h1>fedfm report</h1><table><tr>{head}</tr>{body}</table>"
            f"<h2>Plots</h2>{images}<h2>Configs</h2>{configs}</body></html>")
    path.write_text(page, encoding="utf-8")
    return path


def format_cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def build_report(paths: list[Path], out: Path, *, with_html: bool = False) -> Report:
    runs = load_runs(paths)
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Path] = {}
    for plot in (plot_metrics, plot_client_spread, plot_bytes, plot_phases):
        figures.update(plot(runs, out))
    table = comparison_table(runs)
    page = write_html(runs, table, figures, out / "report.html") if with_html else None
    return Report(table, figures, page)


def table_for_console(table: list[dict[str, Any]]) -> Any:
    """Runs as columns, quantities as rows: readable for a handful of runs at any width."""
    from rich.table import Table

    shown = Table(title="fedfm runs")
    shown.add_column("", style="bold")
    for row in table:
        shown.add_column(str(row["run"]), justify="right", overflow="fold")
    keys = [k for k in dict.fromkeys(key for row in table for key in row) if k != "run"]
    for key in keys:
        shown.add_row(key, *(format_cell(row.get(key)) for row in table))
    return shown
