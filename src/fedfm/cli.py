"""The ``fedfm`` command line (typer)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from fedfm.config import ConfigError, load_config

app = typer.Typer(help="fedfm: federated fine-tuning of foundation models.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Inspect the data of a run config.", no_args_is_help=True)
app.add_typer(data_app, name="data")

err = Console(stderr=True)

SetOption = Annotated[list[str] | None, typer.Option(
    "--set", help="Override a config value: --set algorithm.local.lr=1e-3 (repeatable).")]


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's to fix: shown as one message, never as a traceback."""
    from fedfm.core.checkpoint import CheckpointError
    from fedfm.core.registry import UnknownComponentError
    from fedfm.core.state import StateMismatchError
    from fedfm.data import DataError, PartitionError
    from fedfm.models import AdapterError, ModelLoadError

    if os.environ.get("FEDFM_DEBUG"):  # show full tracebacks instead
        return ()
    return (ConfigError, CheckpointError, UnknownComponentError, StateMismatchError,
            DataError, PartitionError, ModelLoadError, AdapterError, FileNotFoundError)


def _fail(exc: BaseException) -> None:
    err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
    raise typer.Exit(code=2)


@app.command()
def run(
    config: Annotated[Path | None, typer.Argument(help="Run config (YAML).")] = None,
    set_: SetOption = None,
    resume: Annotated[Path | None, typer.Option(
        help="Continue the run in this run directory from its latest checkpoint.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars or summary table.")] = False,
) -> None:
    """Run a federated fine-tuning job; prints the run directory as the last line."""
    from fedfm.api import run as run_job

    if config is None and resume is None:
        _fail(ConfigError("give a CONFIG file, or --resume RUN_DIR"))
    try:
        result = run_job(config, overrides=list(set_ or []), resume=resume,
                         console=False if quiet else None)
    except _user_errors() as exc:
        _fail(exc)
        return
    sys.stdout.write(f"{result.run_dir}\n")


@app.command()
def validate(config: Annotated[Path, typer.Argument(help="Run config (YAML).")],
             set_: SetOption = None) -> None:
    """Check a config (schema and component names) without loading anything."""
    from fedfm.api import check_components

    try:
        run_config = load_config(config, list(set_ or []))
        check_components(run_config)
    except _user_errors() as exc:
        _fail(exc)
        return
    Console().print(f"[green]ok[/]: {config} (config hash {run_config.config_hash()[:12]})")


@data_app.command("stats")
def data_stats(config: Annotated[Path, typer.Argument(help="Run config (YAML).")],
               set_: SetOption = None) -> None:
    """Print the per-client data table (sizes, label histograms) for a config."""
    from fedfm.api import resolve_task
    from fedfm.data import check_task, describe_federated_data, render_stats_table

    try:
        run_config = load_config(config, list(set_ or []))
        task = resolve_task(run_config)
        check_task(run_config.data.format, task)
        stats = describe_federated_data(run_config.data,
                                        num_clients=run_config.federation.num_clients,
                                        task=task, seed=run_config.seed)
    except _user_errors() as exc:
        _fail(exc)
        return
    Console().print(render_stats_table(stats))


@app.command()
def methods() -> None:
    """List every registered component by kind."""
    from rich.table import Table

    from fedfm.api import _register_components
    from fedfm.core.registries import AGGREGATORS, ALGORITHMS, RUNTIMES, SERVER_OPTIMIZERS
    from fedfm.data.partition import PARTITIONERS
    from fedfm.models import PEFT_KINDS, SELECTIVE_KINDS, preset_names

    _register_components()
    table = Table(title="fedfm components")
    table.add_column("kind", style="bold")
    table.add_column("names")
    for registry in (ALGORITHMS, SERVER_OPTIMIZERS, AGGREGATORS, RUNTIMES, PARTITIONERS):
        table.add_row(registry.kind, ", ".join(registry.names()))
    table.add_row("model preset", ", ".join(preset_names()))
    table.add_row("adapter", ", ".join([*PEFT_KINDS, *SELECTIVE_KINDS]))
    Console().print(table)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
