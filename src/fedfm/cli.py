"""The ``fedfm`` command line (typer)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from fedfm.config import ConfigError, load_config

app = typer.Typer(help="fedfm: federated fine-tuning of foundation models.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Inspect the data of a run config.", no_args_is_help=True)
app.add_typer(data_app, name="data")
attack_app = typer.Typer(help="Attacks on a finished run, as evaluation tools.",
                         no_args_is_help=True)
app.add_typer(attack_app, name="attack")



class _DefaultStartGroup(TyperGroup):
    """``fedfm server CONFIG ...`` means ``fedfm server start CONFIG ...``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["start", *args]
        return super().parse_args(ctx, args)


server_app = typer.Typer(cls=_DefaultStartGroup, no_args_is_help=True,
                         help="The coordinator of a real deployment: `fedfm server CONFIG "
                              "--state-dir DIR` runs it; the subcommands manage clients and "
                              "certificates.")
app.add_typer(server_app, name="server")

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
    """Print the per-client data table (sizes, label histograms) for a config, and what to
    change when the split is strongly skewed."""
    from fedfm.adaptability.heterogeneity.advice import skew_advice
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
    console = Console()
    console.print(render_stats_table(stats))
    advice = skew_advice(stats, run_config)
    if advice is not None:
        console.print(f"[yellow]{escape(advice.headline)}[/]")
        console.print(escape(advice.snippet), end="")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (runs/<name>-<time>).")],
    format_: Annotated[str, typer.Option(
        "--format", help="peft: adapter directory for peft.PeftModel.from_pretrained; merged "
                         "(alias full): a transformers model directory.")] = "peft",
    round_: Annotated[int | None, typer.Option(
        "--round", help="Export the global model after this round (default: the last kept).")
    ] = None,
    out: Annotated[Path | None, typer.Option(
        help="Output directory (default: RUN_DIR/export/<format>-round_NNNN).")] = None,
) -> None:
    """Export the global model with a provenance model card; prints the output directory."""
    from fedfm.export import ExportError, export_run

    try:
        result = export_run(run_dir, format_, round=round_, out=out)
    except (ExportError, *_user_errors()) as exc:
        _fail(exc)
        return
    err.print(f"[green]exported[/] round {result.round} as {result.format}")
    sys.stdout.write(f"{result.directory}\n")


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="One or more run directories.")],
    out: Annotated[Path, typer.Option(help="Where the PNG plots (and report.html) go.")] = Path(
        "report"),
    html: Annotated[bool, typer.Option("--html", help="Also write one self-contained HTML "
                                                      "page with the plots and configs.")
                    ] = False,
) -> None:
    """Compare runs: a table on the console, PNG plots (metrics by round, per-client spread,
    bytes, time per phase) and optionally one offline HTML page."""
    from fedfm.tracking.report import ReportError, build_report, table_for_console

    try:
        built = build_report(list(run_dirs), out, with_html=html)
    except (ReportError, *_user_errors()) as exc:
        _fail(exc)
        return
    Console().print(table_for_console(built.table))
    for title, path in built.figures.items():
        err.print(f"{escape(title)}: {path}")
    if built.html is not None:
        sys.stdout.write(f"{built.html}\n")


@attack_app.command("privacy")
def attack_privacy(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
    max_examples: Annotated[int, typer.Option(help="Members and non-members per attack.")] = 400,
    clients: Annotated[int, typer.Option(help="Client models to attack (largest first).")] = 3,
    round_: Annotated[int | None, typer.Option("--round", help="Attack this round's model.")
                      ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON report.")] = False,
) -> None:
    """Membership inference (loss threshold; reference-calibrated) on the global model and on
    client models: ROC AUC and TPR at 1% FPR. Writes RUN_DIR/attacks/privacy.json."""
    import json

    from rich.table import Table

    from fedfm.tracking.run_record import RunRecordError
    from fedfm.trust.attacks.evaluate import privacy_attacks

    try:
        report = privacy_attacks(run_dir, max_examples=max_examples, clients=clients,
                                 round_index=round_)
    except (RunRecordError, *_user_errors()) as exc:
        _fail(exc)
        return
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return
    table = Table(title=f"membership inference, round {report['round']}")
    for column in ("model", "attack", "AUC", "TPR @ 1% FPR", "members"):
        table.add_column(column, justify="left" if column in ("model", "attack") else "right")
    targets = [("global", report["global"])] + [
        (f"client {c}", found) for c, found in report["clients"].items()]
    for name, found in targets:
        for attack, numbers in found.items():
            table.add_row(name, attack, f"{numbers['auc']:.3f}",
                          f"{numbers['tpr_at_1pct_fpr']:.3f}", f"{numbers['members']:.0f}")
    Console().print(table)


@app.command()
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the hub.")] = 3.0,
) -> None:
    """Versions, devices, optional extras, and whether the Hugging Face hub is reachable."""
    import json

    from rich.table import Table

    from fedfm.doctor import report as doctor_report

    found = doctor_report(timeout)
    if as_json:
        sys.stdout.write(json.dumps(found, indent=2) + "\n")
        return
    table = Table(title="fedfm doctor", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    packages = found["packages"]
    table.add_row("python", f"{packages['python']} ({escape(packages['platform'])})")
    for name, version in packages["core"].items():
        table.add_row(name, version or "[red]missing[/]")
    for name, info in packages["optional"].items():
        state = info["version"] or ("installed" if info["installed"] else "[dim]not installed[/]")
        extra = f", pip install 'fedfm[{info['extra']}]'" if info["extra"] else ""
        table.add_row(name, f"{state} [dim](for {escape(info['for'])}{escape(extra)})[/]")
    cpu, cuda = found["devices"]["cpu"], found["devices"]["cuda"]
    table.add_row("cpu", f"{cpu['cores']} cores, torch threads {cpu['threads']}, "
                         f"{cpu['capability']}, AMX bf16: {cpu['amx_bf16']}")
    table.add_row("cuda", ", ".join(cuda.get("devices", [])) if cuda["available"]
                  else "not available")
    hub = found["reachable"]["huggingface_hub"]
    table.add_row("huggingface hub", "reachable" if hub["reachable"] else
                  f"[yellow]not reachable[/] ({escape(str(hub.get('why', '')))}): use presets, "
                  f"local model dirs and local data")
    Console().print(table)


@app.command()
def methods(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """The survey's taxonomy with every implemented method: registry name, paper and the config
    snippet that enables it (built from the registries)."""
    import json

    from fedfm.catalogue import catalogue

    data = catalogue()
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    Console().print(render_catalogue(data))


def render_catalogue(data: dict) -> Any:
    """A rich Tree: branch > ... > leaf > methods (name, registry, paper, config)."""
    from rich.tree import Tree

    root = Tree(f"[bold]fedfm methods[/] (taxonomy of {escape(data['survey'])})")
    nodes: dict[tuple[str, ...], Any] = {}
    for leaf in data["leaves"]:
        parent, path = root, ()
        for title in leaf["path"]:
            path = (*path, title)
            if path not in nodes:
                nodes[path] = parent.add(f"[bold]{escape(title)}[/]")
            parent = nodes[path]
        if not leaf["methods"]:
            parent.add("[dim]not implemented yet[/]")
        for method in leaf["methods"]:
            paper = f"\n  {escape(method['paper'])}" if method["paper"] else ""
            parent.add(f"[green]{escape(method['name'])}[/] [dim]({method['registry']})[/] "
                       f"{escape(method['summary'])}{paper}\n  [cyan]{escape(method['config'])}[/]")
    root.add(f"[bold]Model presets[/] (model.name; or a hub id, or a local directory): "
             f"{', '.join(data['model_presets'])}")
    return root


StateDir = Annotated[Path, typer.Option(
    "--state-dir", help="The coordinator's state directory (database, checkpoints, updates).")]


@server_app.command("start")
def server_start(
    config: Annotated[Path, typer.Argument(help="Run config (YAML).")],
    state_dir: StateDir = Path("fedfm-server"),
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free one; see endpoint.json).")
                    ] = 8443,
    tls_cert: Annotated[Path | None, typer.Option(help="Server certificate (PEM).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Server private key (PEM).")] = None,
    tls_client_ca: Annotated[Path | None, typer.Option(
        help="Require client certificates signed by this CA (mutual TLS).")] = None,
    linger: Annotated[float, typer.Option(
        help="Seconds to keep serving after the last round.")] = 10.0,
    set_: SetOption = None,
) -> None:
    """Run the coordinator: the round loop plus the HTTPS API and dashboard. Run the same
    command again after a crash: it resumes the round in flight."""
    import logging

    from fedfm.deploy.coordinator import Coordinator, load_server_config
    from fedfm.deploy.serve import ServeOptions, serve
    from fedfm.deploy.store import StoreError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        run_config = load_server_config(config, list(set_ or []))
        coordinator = Coordinator(run_config, state_dir)
        code = serve(coordinator, ServeOptions(host=host, port=port, tls_cert=tls_cert,
                                               tls_key=tls_key, tls_client_ca=tls_client_ca,
                                               linger=linger))
    except (StoreError, ValueError, *_user_errors()) as exc:
        _fail(exc)
        return
    raise typer.Exit(code=code)


@server_app.command("add-client")
def server_add_client(
    name: Annotated[str, typer.Argument(help="A name for the client (letters, digits, _.-).")],
    state_dir: StateDir = Path("fedfm-server"),
    client_id: Annotated[int | None, typer.Option(
        "--id", help="Its client id (default: the next free one).")] = None,
    viewer: Annotated[bool, typer.Option(
        help="A read-only token for the dashboard and metrics.")] = False,
) -> None:
    """Register a client and print its token (shown once; only its hash is stored)."""
    from fedfm.deploy.store import StateStore, StoreError

    try:
        record, token = StateStore(state_dir / "coordinator.db").add_client(
            name, role="viewer" if viewer else "client", client_id=client_id)
    except StoreError as exc:
        _fail(exc)
        return
    who = "viewer" if viewer else f"client id {record.client_id}"
    err.print(f"[green]added[/] {escape(name)} ({who}); its token (shown once):")
    sys.stdout.write(f"{token}\n")


@server_app.command("revoke-client")
def server_revoke_client(name: Annotated[str, typer.Argument(help="The client's name.")],
                         state_dir: StateDir = Path("fedfm-server")) -> None:
    """Revoke a client's token: its next request is refused (also on a running server)."""
    from fedfm.deploy.store import StateStore, StoreError

    try:
        StateStore(state_dir / "coordinator.db").revoke_client(name)
    except StoreError as exc:
        _fail(exc)
        return
    err.print(f"[yellow]revoked[/] {escape(name)}")


@server_app.command("list-clients")
def server_list_clients(state_dir: StateDir = Path("fedfm-server")) -> None:
    """The client registry: names, ids, roles, revoked, last seen."""
    import time

    from rich.table import Table

    from fedfm.deploy.store import StateStore

    table = Table(title="clients")
    for column in ("name", "id", "role", "revoked", "last seen"):
        table.add_column(column)
    for record in StateStore(state_dir / "coordinator.db").clients():
        seen = "never" if record.last_seen is None else f"{time.time() - record.last_seen:.0f}s ago"
        table.add_row(escape(record.name), str(record.client_id if record.client_id is not None
                                              else "-"), record.role,
                      "yes" if record.revoked else "no", seen)
    Console().print(table)


@server_app.command("gen-certs")
def server_gen_certs(
    out: Annotated[Path, typer.Option(help="Where the PEM files go.")] = Path("certs"),
    host: Annotated[list[str] | None, typer.Option(
        "--host", help="Name or IP the server is reached at (repeatable).")] = None,
    client: Annotated[list[str] | None, typer.Option(
        "--client", help="Also a client certificate for mutual TLS (repeatable).")] = None,
    days: Annotated[int, typer.Option(help="Validity in days.")] = 365,
    overwrite: Annotated[bool, typer.Option(help="Replace existing files.")] = False,
) -> None:
    """A self-signed CA, a server certificate and optional client certificates, for trying
    TLS and mutual TLS out (use your organisation's PKI in production)."""
    from fedfm.deploy.certs import generate_certificates

    try:
        made = generate_certificates(out, hosts=tuple(host or ("localhost", "127.0.0.1", "::1")),
                                     clients=tuple(client or ()), days=days, overwrite=overwrite)
    except (FileExistsError, ValueError) as exc:
        _fail(exc)
        return
    err.print(f"CA {made.ca_cert}; server {made.server_cert} / {made.server_key}")
    for name, (cert, key) in made.client_certs.items():
        err.print(f"client {escape(name)}: {cert} / {key}")
    sys.stdout.write(f"{made.directory}\n")


@app.command()
def client(
    server: Annotated[str | None, typer.Option(help="Coordinator URL (default: CLIENT.yaml's)."
                                               )] = None,
    token: Annotated[str | None, typer.Option(
        envvar="FEDFM_TOKEN", help="This client's token (or the FEDFM_TOKEN variable).")] = None,
    config: Annotated[Path, typer.Option(help="CLIENT.yaml: this site's data, TLS files.")
                      ] = Path("client.yaml"),
) -> None:
    """Run a client agent: train on this site's data for the coordinator until the run ends."""
    import logging

    from fedfm.deploy.agent import AgentError, ClientAgent, load_agent_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        agent_config = load_agent_config(config)
        url = server or agent_config.server
        if not url:
            raise ConfigError("give --server URL (or server: in CLIENT.yaml)")
        if not token:
            raise ConfigError("give --token TOKEN (or set FEDFM_TOKEN)")
        done = ClientAgent(url, token, agent_config).run()
    except (AgentError, *_user_errors()) as exc:
        _fail(exc)
        return
    err.print(f"[green]run finished[/]: {done} tasks done")
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is persisted; skip the interpreter's teardown, where a native thread pool
    # (torch's) sometimes aborts ("terminate called without an active exception", exit -6)
    # and would hand a supervisor a false failure.
    os._exit(0)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
