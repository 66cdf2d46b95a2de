"""Public Python API: ``fedfm.run(config) -> RunResult``, and the ``build_*`` functions that turn
a config into components (the one place where that happens)."""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

import fedfm
from fedfm.config import ConfigError, RunConfig, load_config
from fedfm.core import state as state_ops
from fedfm.core.algorithm import Algorithm
from fedfm.core.checkpoint import (
    CheckpointError,
    CheckpointManager,
    latest_checkpoint,
    load_checkpoint,
    restore_client_states,
    restore_rng,
)
from fedfm.core.client_store import (
    ClientStore,
    DiskClientStore,
    MemoryClientStore,
    TieredClientStore,
)
from fedfm.core.loop import LoopSettings, LoopSnapshot, RoundLoop, Runtime
from fedfm.core.registries import (
    AGGREGATORS,
    ALGORITHMS,
    POISONING,
    PRIVACY,
    RUNTIMES,
    SERVER_OPTIMIZERS,
)
from fedfm.core.state import State
from fedfm.tracking import ConsoleProgress, MetricsFileSink, RunDirectory, summary_table


@dataclass
class RunResult:
    """What a run leaves: its directory, the final global State, ``summary.json`` and the
    per-round records of ``metrics.jsonl`` (plain dicts, no pandas needed)."""

    run_dir: Path
    final_state: State
    summary: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def history(self) -> list[dict[str, Any]]:
        """One flat dict per logged round: ``round`` plus every scalar of its record under the
        same names the TensorBoard / MLflow sinks use (``eval/global/accuracy``, ...)."""
        from fedfm.tracking.sinks import flatten_record

        return [{"round": int(r.get("round", 0)), **flatten_record(r)} for r in self.metrics]

    def to_pandas(self) -> Any:
        """``history`` as a ``pandas.DataFrame`` indexed by round (pandas is optional)."""
        try:
            import pandas as pd
        except ImportError as exc:
            raise ImportError("RunResult.to_pandas() needs pandas (pip install pandas); "
                              "RunResult.history holds the same rows as plain dicts") from exc
        return pd.DataFrame(self.history).set_index("round")


def _register_components() -> None:
    """Importing these packages fills the registries."""
    import fedfm.adaptability  # noqa: F401
    import fedfm.algorithms  # noqa: F401
    import fedfm.efficiency  # noqa: F401
    import fedfm.runtime  # noqa: F401
    import fedfm.trust  # noqa: F401


def check_components(config: RunConfig) -> None:
    """Reject unknown component names before any model or data is loaded."""
    _register_components()
    preference = config.data.format == "preference"
    if preference != (config.algorithm.name == "fed_dpo"):
        raise ConfigError(
            "invalid config: data.format 'preference' (prompt / chosen / rejected pairs) "
            "trains with algorithm.name 'fed_dpo' and fed_dpo needs preference data; got "
            f"data.format {config.data.format!r} with algorithm.name "
            f"{config.algorithm.name!r}")
    _check_task(config)
    from fedfm.tracking.sinks import check_sink_packages

    check_sink_packages(config.tracking.tensorboard, config.tracking.mlflow,
                        config.tracking.mlflow_tracking_uri)
    for registry, value, path in (
        (ALGORITHMS, config.algorithm.name, "algorithm.name"),
        (AGGREGATORS, config.algorithm.aggregator, "algorithm.aggregator"),
        (SERVER_OPTIMIZERS, config.algorithm.server_optimizer.name,
         "algorithm.server_optimizer.name"),
        (RUNTIMES, config.runtime.kind, "runtime.kind"),
    ):
        if value not in registry:
            raise ConfigError(f"invalid config: {path}: unknown {registry.kind} {value!r} "
                              f"(available: {', '.join(registry.names())})")
    _check_secure_aggregation(config)
    _check_attack(config)
    _check_compression(config)
    _check_lora_algorithm(config)
    _check_fedkseed(config)
    _check_fedbpt(config)
    from fedfm.adaptability.domains import check_domains
    from fedfm.adaptability.heterogeneity import check_skew
    from fedfm.adaptability.personalization import check_personalization
    from fedfm.adaptability.preference import check_dpo
    from fedfm.efficiency.distillation import check_distillation
    from fedfm.efficiency.split import check_split
    from fedfm.trust.ip.offsite import check_offsite

    check_dpo(config)
    check_distillation(config)
    check_split(config)
    check_offsite(config)
    check_personalization(config)
    check_domains(config)
    check_skew(config)
    if config.runtime.kind == "ray":
        from fedfm.runtime.ray_actors import check_ray

        check_ray(config)


def _check_fedbpt(config: RunConfig) -> None:
    """FedBPT searches a random subspace of a soft prompt with CMA-ES."""
    if config.algorithm.name != "fedbpt":
        return
    if config.adapter.kind != "prompt_tuning":
        raise ConfigError(f"invalid config: algorithm 'fedbpt' tunes a soft prompt by forward "
                          f"queries; adapter.kind is {config.adapter.kind!r} (use "
                          f"prompt_tuning)")
    _refuse_combinations(config, "algorithm 'fedbpt' aggregates CMA-ES means and step sizes", {
        "privacy.client_dp": "DP-FedAvg replaces the server rule that averages the step sizes",
        "privacy.secure_aggregation": "the step sizes travel beside the masked sum"})


def _refuse_combinations(config: RunConfig, subject: str, reasons: dict[str, str]) -> None:
    """A ConfigError for the first enabled option of ``reasons`` (option path -> why
    ``subject`` cannot be combined with it)."""
    enabled = {"algorithm.compression": config.algorithm.compression is not None,
               "privacy.client_dp": config.privacy.client_dp is not None,
               "privacy.secure_aggregation": config.privacy.secure_aggregation is not None,
               "robustness.attack": config.robustness.attack is not None}
    for option, why in reasons.items():
        if enabled[option]:
            raise ConfigError(f"invalid config: {subject}, which cannot be combined with "
                              f"{option}: {why}")


def _check_fedkseed(config: RunConfig) -> None:
    """FedKSeed uploads (seed index, scalar) pairs that the server replays into a delta."""
    if config.algorithm.name != "fedkseed":
        return
    _refuse_combinations(config, "algorithm 'fedkseed' uploads (seed index, scalar) pairs", {
        "algorithm.compression": "its upload is already a few kilobytes",
        "privacy.client_dp": "clipping applies to dense updates, and the server only sees the "
                             "replayed one",
        "privacy.secure_aggregation": "masked sums need dense updates; the pairs must be "
                                      "replayed in the clear"})


def _check_lora_algorithm(config: RunConfig) -> None:
    """The LoRA-aware algorithms need LoRA, and the ones whose uploads are rank slices (or A
    alone) need a server that pads them back before anything else reads them."""
    from fedfm.efficiency.lora import LORA_ALGORITHMS, SLICED_UPLOADS

    name = config.algorithm.name
    if name not in LORA_ALGORITHMS:
        return
    if config.adapter.kind != "lora":
        raise ConfigError(f"invalid config: algorithm {name!r} aggregates LoRA factors; "
                          f"adapter.kind is {config.adapter.kind!r} (use lora)")
    if name in ("flora", "flexlora", "hetlora") and config.algorithm.aggregator != "mean":
        raise ConfigError(f"invalid config: algorithm {name!r} combines the clients' factors "
                          f"by its own rule; algorithm.aggregator "
                          f"{config.algorithm.aggregator!r} would be ignored (use 'mean')")
    optimizer = config.algorithm.server_optimizer
    if name == "flora" and (optimizer.name != "sgd" or optimizer.lr != 1.0):
        raise ConfigError("invalid config: algorithm 'flora' merges each round's aggregate "
                          "into the base and starts from a fresh LoRA; a server optimizer "
                          "would step the fresh factors (use server_optimizer sgd with lr 1)")
    if name not in SLICED_UPLOADS:
        return
    what = ("uploads each client's rank slice" if name != "fedsa_lora"
            else "uploads A without the local B")
    _refuse_combinations(config, f"algorithm {name!r} {what}", {
        "algorithm.compression": "the compressed layout follows the global State's shapes",
        "privacy.client_dp": "clipping and noise apply to dense updates of the global State's "
                             "shape",
        "privacy.secure_aggregation": "masked sums need every client's update in the global "
                                      "State's shape",
        "robustness.attack": "the simulated attackers forge updates in the global State's "
                             "shape"})


def _check_compression(config: RunConfig) -> None:
    """Compression changes each update after the client is done with it: that breaks what
    DP-FedAvg's clipping and secure aggregation's field sums rely on."""
    if config.algorithm.compression is None:
        return
    from fedfm.efficiency.compression import build_chain

    try:
        build_chain(config.algorithm.compression.chain)
    except ValueError as exc:
        raise ConfigError(f"invalid config: algorithm.compression: {exc}") from None
    _refuse_combinations(config, "algorithm.compression changes each update on the client", {
        "privacy.client_dp": "compressing a clipped update changes its norm, so the clip norm "
                             "would no longer bound each client's sensitivity",
        "privacy.secure_aggregation": "the masked sum is taken over dense field elements, so "
                                      "compressed codes cannot be summed under masks"})


def _check_attack(config: RunConfig) -> None:
    attack = config.robustness.attack
    if attack is None:
        return
    if attack.kind not in POISONING:
        raise ConfigError(f"invalid config: robustness.attack.kind: unknown poisoning attack "
                          f"{attack.kind!r} (available: {', '.join(POISONING.names())})")
    if attack.kind == "label_flip" and config.data.format != "classification":
        raise ConfigError(f"invalid config: robustness.attack.kind 'label_flip' needs "
                          f"classification data (data.format is {config.data.format!r}); use "
                          f"'backdoor' for language models")


def _check_secure_aggregation(config: RunConfig) -> None:
    """Secure aggregation releases only sums, and DP-FedAvg aggregates a clipped noisy sum: the
    aggregator must be the mean."""
    name = config.algorithm.aggregator
    if config.privacy.client_dp is not None and name != "mean":
        raise ConfigError(f"invalid config: privacy.client_dp aggregates a clipped, noised sum "
                          f"of the updates (DP-FedAvg); algorithm.aggregator {name!r} would be "
                          f"ignored (use 'mean')")
    if config.privacy.secure_aggregation is None:
        return
    if name == "secure_mean":
        return
    if not getattr(AGGREGATORS.get(name), "sum_compatible", False):
        raise ConfigError(f"invalid config: privacy.secure_aggregation cannot be combined with "
                          f"algorithm.aggregator {name!r}: secure aggregation reveals only the "
                          f"sum of the clients' updates, and {name!r} needs the individual "
                          f"updates (use aggregator 'mean')")


def resolve_task(config: RunConfig) -> str:
    """The model task: ``model.task``, else the preset's, else ``causal_lm``."""
    from fedfm.models import PRESETS

    preset = PRESETS.get(config.model.name)
    return config.model.task or (preset.task if preset is not None else "causal_lm")


def _check_task(config: RunConfig) -> None:
    from fedfm.data import check_task
    from fedfm.runtime.workload import resolve_device

    task = resolve_task(config)
    check_task(config.data.format, task)
    if config.algorithm.local.packing and task != "causal_lm":
        raise ConfigError(f"invalid config: algorithm.local.packing: true needs a causal_lm "
                          f"model (this one is {task}); packing concatenates decoder inputs")
    resolve_device(config.runtime)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_algorithm(config: RunConfig) -> Algorithm:
    _register_components()
    factory = ALGORITHMS.get(config.algorithm.name)
    algorithm = factory(config.algorithm, config.federation.num_clients)
    if config.algorithm.skew:  # around the algorithm's halves, inside every transform
        from fedfm.adaptability.heterogeneity import apply_skew

        algorithm = apply_skew(algorithm, config)
    if config.privacy.dp_sgd is not None:  # inside: it replaces the local training
        algorithm = PRIVACY.get("dp_sgd")(algorithm, config)
    if config.algorithm.compression is not None:  # after training: post-processing of DP-SGD
        from fedfm.efficiency.compression import compress_algorithm

        algorithm = compress_algorithm(algorithm, config.algorithm.compression)
    if config.privacy.client_dp is not None:
        algorithm = PRIVACY.get("client_dp")(algorithm, config)
    if config.privacy.secure_aggregation is not None:
        algorithm = PRIVACY.get("secure_aggregation")(algorithm, config)
    if config.robustness.attack is not None:  # outermost: attackers forge what arrives
        algorithm = _with_attackers(algorithm, config)
    return algorithm


def _with_attackers(algorithm: Algorithm, config: RunConfig) -> Algorithm:
    from fedfm.trust.robust.attacks import ByzantineServer, build_attack, malicious_clients

    attack = config.robustness.attack
    assert attack is not None
    malicious = malicious_clients(config.federation.num_clients, attack.fraction, config.seed)
    server = ByzantineServer(algorithm.server, build_attack(attack), malicious, config.seed)
    info = {**algorithm.info, "attack": attack.kind, "malicious_clients": malicious}
    return replace(algorithm, server=server, info=info)


def build_client_store(config: RunConfig, run_dir: Path | None) -> ClientStore:
    kind = config.runtime.client_store
    if kind == "memory":
        return MemoryClientStore()
    if run_dir is None:
        raise ConfigError(f"runtime.client_store={kind!r} needs a run directory")
    if kind == "disk":
        return DiskClientStore(run_dir / "client_states")
    budget = int(config.runtime.client_store_memory_mb * 2**20)
    return TieredClientStore(run_dir / "client_states", budget)


def build_workload(config: RunConfig, algorithm: Algorithm) -> Any:
    """Load the model, apply the adapter, build the federated data (one per process)."""
    from fedfm.data import build_federated_data, load_label_info
    from fedfm.models import load_model
    from fedfm.runtime.fast import prepare_fast_path
    from fedfm.runtime.workload import Workload, resolve_device

    if config.runtime.num_threads is not None:
        torch.set_num_threads(config.runtime.num_threads)
    device = resolve_device(config.runtime)
    label_names, num_labels = (None, None)
    if config.data.format in ("classification", "image"):
        label_names, num_labels = load_label_info(config.data)
    bundle = adapt_model(load_model(config.model, seed=config.seed, num_labels=num_labels),
                         config, algorithm)
    bundle.model.to(device)
    data = build_federated_data(config.data, num_clients=config.federation.num_clients,
                                tokenizer=bundle.tokenizer, task=bundle.task,
                                max_length=config.model.max_length, seed=config.seed)
    if config.eval.canaries is not None:
        plant_canaries(config, data, bundle)
    empty = [c.client_id for c in data.clients if not c.train]
    if empty:
        raise ConfigError(f"clients {empty[:10]} have no training examples; lower "
                          f"federation.num_clients or raise data.partition.min_size")
    backdoor_eval = poison_data(config, data, bundle)
    probe = probe_batch(config, data, bundle, device)
    speed, loss_fn, autocast_dtype = prepare_fast_path(bundle, config.runtime, device, probe)
    workload = Workload(bundle=bundle, data=data, client=algorithm.client, config=config,
                        device=device, autocast_dtype=autocast_dtype, loss_fn=loss_fn,
                        speed=speed, backdoor_eval=backdoor_eval)
    _bind_root_data(algorithm, workload)
    bind = getattr(algorithm.server, "bind_workload", None)  # e.g. FLoRA merges into the base
    if bind is not None:
        bind(workload)
    return workload


def adapt_model(bundle: Any, config: RunConfig, algorithm: Algorithm) -> Any:
    """The run's adapter on the loaded model, then what the algorithm's client half adds to
    it (``prepare_model(bundle, config) -> bundle``: a second, local adapter; domain
    adapters), then the parameters the algorithm freezes."""
    from fedfm.models import apply_adapter

    bundle = apply_adapter(bundle, config.adapter, seed=config.seed)
    prepare = getattr(algorithm.client, "prepare_model", None)
    if prepare is not None:
        bundle = prepare(bundle, config)
    freeze_parameters(bundle.model, algorithm.info.get("frozen_parameters"))
    return bundle


def freeze_parameters(model: torch.nn.Module, marker: str | None) -> None:
    """An algorithm that keeps some adapter parameters at their initialisation (FFA-LoRA's A):
    they stop training, and so leave the communicated State."""
    if marker is None:
        return
    for name, param in model.named_parameters():
        if marker in name:
            param.requires_grad_(False)


def poison_data(config: RunConfig, data: Any, bundle: Any) -> list[dict[str, Any]] | None:
    """Data poisoning of the malicious clients (``robustness.attack``); the triggered
    validation rows when the attack is a backdoor (for the attack success rate)."""
    from fedfm.trust.robust.attacks import build_attack, malicious_clients
    from fedfm.trust.robust.poisoning import Poisoner, backdoor_eval_set, poison_clients

    cfg = config.robustness.attack
    if cfg is None:
        return None
    attack = build_attack(cfg)
    if not attack.poisons_data:
        return None
    poisoner = Poisoner(cfg, bundle.tokenizer, bundle.task, config.model.max_length,
                        data.num_labels)
    malicious = malicious_clients(config.federation.num_clients, cfg.fraction, config.seed)
    poison_clients(data, cfg, poisoner, malicious, config.seed)
    return backdoor_eval_set(data.global_validation, poisoner) if attack.backdoor else None


def _bind_root_data(algorithm: Algorithm, workload: Any) -> None:
    """FLTrust's server update: local training, like a client, on ``root_rows`` rows taken out
    of the global validation set (they are no longer evaluated on)."""
    from fedfm.trust.robust.aggregators import FLTrust
    from fedfm.trust.robust.attacks import server_aggregator

    aggregator = server_aggregator(algorithm.server)
    if not isinstance(aggregator, FLTrust):
        return
    config = workload.config
    rows = config.algorithm.robust.root_rows
    validation = workload.data.global_validation
    if len(validation) < rows + 1:
        raise ConfigError(f"invalid config: algorithm.aggregator 'fltrust' takes "
                          f"algorithm.robust.root_rows={rows} rows of the global validation "
                          f"set as the server's root data, but it has {len(validation)}")
    root = validation[:rows]
    workload.data.global_validation = validation[rows:]
    aggregator.bind_root(partial(_root_update, workload, root))


def _root_update(workload: Any, root: list[dict[str, Any]], global_state: State) -> State:
    from fedfm.algorithms.fedavg import DeltaClient
    from fedfm.core.update import Broadcast

    config = workload.config
    workload.set_state(global_state)
    context = workload.client_context(root, client_id=-1, round=0, seed=config.seed + 104729)
    result = DeltaClient(config.algorithm.local).run(context, Broadcast(global_state))
    return result.update.payload


def probe_batch(config: RunConfig, data: Any, bundle: Any,
                device: torch.device) -> dict[str, torch.Tensor] | None:
    """One training batch of the first client, as local training will see it (packed when
    packing is on); the fast path measures and checks on it."""
    from fedfm.data import collate
    from fedfm.data.packing import pack_examples

    examples = data.clients[0].train
    local = config.algorithm.local
    if local.packing and bundle.task == "causal_lm":
        examples = pack_examples(examples, config.model.max_length)
    pad = bundle.tokenizer.pad_token_id
    pad_id = int(pad if pad is not None else 0)
    if config.data.format == "preference":  # chosen and rejected rows: one causal-LM batch
        from fedfm.adaptability.preference import collate_pairs

        batch = collate_pairs(examples[: local.batch_size], pad_token_id=pad_id)
    else:
        batch = collate(examples[: local.batch_size], pad_token_id=pad_id, task=bundle.task)
    return {k: v.to(device) for k, v in batch.items()}


def build_runtime(config: RunConfig, workload: Any, store: ClientStore) -> Runtime:
    _register_components()
    return RUNTIMES.get(config.runtime.kind)(workload, store)


def _resolve_config(config: RunConfig | str | Path | None, overrides: list[str] | None,
                    resume: Path | None) -> RunConfig:
    if resume is not None:
        saved = resume / "config.yaml"
        if not saved.exists():
            raise CheckpointError(f"{resume} is not a fedfm run directory (no config.yaml)")
        return load_config(saved, overrides)
    if config is None:
        raise ConfigError("a config (path or RunConfig) is required unless resuming")
    if isinstance(config, RunConfig):
        if overrides:
            raise ConfigError("overrides apply to a YAML path; edit the RunConfig instead")
        return config
    return load_config(config, overrides)


def run(config: RunConfig | str | Path | None = None, *, overrides: list[str] | None = None,
        resume: str | Path | None = None, console: bool | None = None) -> RunResult:
    """Run (or resume) a federated fine-tuning job and return where it left its results."""
    resume_dir = Path(resume) if resume is not None else None
    run_config = _resolve_config(config, overrides, resume_dir)
    check_components(run_config)
    seed_everything(run_config.seed)
    algorithm = build_algorithm(run_config)
    workload = build_workload(run_config, algorithm)

    run_dir = (RunDirectory(resume_dir) if resume_dir is not None else
               RunDirectory.create(run_config.tracking.output_dir,
                                   run_config.tracking.run_name or run_config.name))
    run_dir.write_config(run_config)
    store = build_client_store(run_config, run_dir.path)
    snapshot = LoopSnapshot(round=0, global_state=workload.get_state(), server_state={},
                            totals={})
    if resume_dir is not None:
        snapshot = _restore(run_dir, algorithm, store, snapshot)

    runtime = build_runtime(run_config, workload, store)
    checkpointer = CheckpointManager(run_dir.checkpoints,
                                     every=run_config.tracking.checkpoint_every,
                                     keep=run_config.tracking.keep_checkpoints,
                                     client_store=store)
    show = run_config.tracking.console if console is None else console
    final = _drive(run_config, algorithm, runtime, checkpointer, run_dir, snapshot, show,
                   workload, store)
    runtime.close()
    return _finish(run_config, run_dir, final, workload, show)


def _restore(run_dir: RunDirectory, algorithm: Algorithm, store: ClientStore,
             initial: LoopSnapshot) -> LoopSnapshot:
    checkpoint_path = latest_checkpoint(run_dir.checkpoints)
    if checkpoint_path is None:  # crashed before the first checkpoint: start over cleanly
        run_dir.truncate_metrics(-1)
        store.clear()
        return initial
    checkpoint = load_checkpoint(checkpoint_path)
    state_ops.check_compatible(initial.global_state, checkpoint.snapshot.global_state,
                               what=f"checkpoint {checkpoint_path}")
    # safetensors returns keys sorted: put them back in the model's order, as a run keeps them
    checkpoint.snapshot.global_state = OrderedDict(
        (key, checkpoint.snapshot.global_state[key]) for key in initial.global_state)
    algorithm.server.load_state_dict(checkpoint.snapshot.server_state)
    restore_client_states(store, checkpoint_path)
    restore_rng(checkpoint.rng_tensors, checkpoint.rng_meta)
    run_dir.truncate_metrics(checkpoint.snapshot.round)
    return checkpoint.snapshot


def _drive(config: RunConfig, algorithm: Algorithm, runtime: Runtime,
           checkpointer: CheckpointManager, run_dir: RunDirectory, snapshot: LoopSnapshot,
           show: bool, workload: Any, store: ClientStore) -> LoopSnapshot:
    from fedfm.eval import fairness_summary, primary_metric

    metric, higher_is_better = primary_metric(workload.bundle.task, config.data.format)
    settings = LoopSettings(
        seed=config.seed, num_clients=config.federation.num_clients,
        sample_size=config.federation.sample_size(), rounds=config.federation.rounds,
        dropout_prob=config.federation.dropout_prob, eval_every=config.eval.every,
        eval_enabled=config.eval.enabled,
        eval_at_start=config.eval.at_start, per_client_eval=config.eval.per_client,
        sampling=(config.privacy.client_dp.sampling if config.privacy.client_dp is not None
                  else "fixed"))

    sinks = build_sinks(config, run_dir)

    def make_loop(observers: list[Any]) -> RoundLoop:
        return RoundLoop(settings=settings, server=algorithm.server, runtime=runtime,
                         observers=[MetricsFileSink(run_dir), *sinks, *observers],
                         checkpointer=checkpointer, client_store=store,
                         fairness=lambda per_client: fairness_summary(
                             dict(per_client), metric=metric,
                             higher_is_better=higher_is_better))

    status = "FAILED"
    try:
        if not show:
            final = make_loop([]).run(snapshot)
        else:
            with ConsoleProgress(settings.rounds, start_round=snapshot.round) as progress:
                final = make_loop([progress]).run(snapshot)
        status = "FINISHED"
        return final
    finally:
        for sink in sinks:
            sink.close(status)


def build_sinks(config: RunConfig, run_dir: RunDirectory) -> list[Any]:
    """TensorBoard and MLflow sinks when the config asks for them (JSONL is always on)."""
    from fedfm.tracking.sinks import MLflowSink, TensorBoardSink

    sinks: list[Any] = []
    tracking = config.tracking
    if tracking.tensorboard:
        sinks.append(TensorBoardSink(run_dir.path / "tensorboard"))
    if tracking.mlflow:
        sinks.append(MLflowSink(run_dir.path, tracking_uri=tracking.mlflow_tracking_uri,
                                experiment=tracking.mlflow_experiment,
                                run_name=run_dir.path.name,
                                params=config.model_dump(mode="json")))
    return sinks


def _finish(config: RunConfig, run_dir: RunDirectory, final: LoopSnapshot, workload: Any,
            show: bool) -> RunResult:
    from fedfm.core.checkpoint import GLOBAL_FILE

    run_dir.final_dir.mkdir(exist_ok=True)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in final.global_state.items()},
              str(run_dir.final_dir / GLOBAL_FILE))
    metrics = run_dir.read_metrics()
    summary = build_summary(config, run_dir, final, workload, metrics)
    run_dir.write_summary(summary)
    if show:
        Console(stderr=True).print(summary_table(summary))
    return RunResult(run_dir=run_dir.path, final_state=final.global_state, summary=summary,
                     metrics=metrics)


def build_summary(config: RunConfig, run_dir: RunDirectory, final: LoopSnapshot, workload: Any,
                  metrics: list[dict[str, Any]]) -> dict[str, Any]:
    from fedfm.models import count_parameters

    last_eval = next((r["eval"] for r in reversed(metrics) if "eval" in r), {})
    final_metrics = {f"val_{k}": v for k, v in last_eval.get("global", {}).items()}
    final_metrics.update({f"clients_{k}": v for k, v in last_eval.get("fairness", {}).items()})
    final_metrics.update({f"personal_{k}": v
                          for k, v in last_eval.get("personalized_fairness", {}).items()})
    trainable, total = count_parameters(workload.model)
    return {
        "name": config.name,
        "fedfm_version": fedfm.__version__,
        "config_hash": config.config_hash(),
        "model": config.model.name,
        "task": workload.bundle.task,
        "adapter": config.adapter.kind,
        "algorithm": config.algorithm.name,
        "server_optimizer": config.algorithm.server_optimizer.name,
        "rounds": final.round,
        "num_clients": config.federation.num_clients,
        "clients_per_round": config.federation.sample_size(),
        "communicated_params": state_ops.num_parameters(final.global_state),
        "trainable_params": trainable,
        "total_params": total,
        "client_train_sizes": [len(c.train) for c in workload.data.clients],
        "num_labels": workload.data.num_labels,
        "label_names": workload.data.label_names,
        "data": workload.data.stats.to_dict() if workload.data.stats is not None else None,
        "wall_time": final.totals.get("wall_time", 0.0),
        "bytes_up": int(final.totals.get("bytes_up", 0)),
        "bytes_down": int(final.totals.get("bytes_down", 0)),
        "final_metrics": final_metrics,
        "privacy": _privacy_summary(config, metrics),
        "speed": workload.speed.as_dict(),
        "final_state": str(run_dir.final_dir / "global.safetensors"),
        "run_dir": str(run_dir.path),
    }


def _privacy_summary(config: RunConfig, metrics: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The budget spent by the whole run: client-level (the last round's accountant report)
    and sample-level (each client's latest DP-SGD epsilon, and the largest)."""
    privacy = config.privacy
    if privacy.client_dp is None and privacy.dp_sgd is None:
        return None
    found: dict[str, Any] = {}
    if privacy.client_dp is not None:
        spent = next((r["privacy"] for r in reversed(metrics) if "privacy" in r), {})
        found["client_dp"] = {
            "epsilon": spent.get("epsilon"), "delta": spent.get("delta"),
            "noise_multiplier": spent.get("noise_multiplier"),
            "rounds_accounted": sum(1 for r in metrics if "privacy" in r),
            "final_clip_norm": spent.get("next_clip_norm"),
            "config": privacy.client_dp.model_dump(mode="json")}
    if privacy.dp_sgd is not None:
        from fedfm.trust.privacy.dp_sgd import dp_sgd_budgets

        per_client = dp_sgd_budgets(metrics)
        found["dp_sgd"] = {"max_client_epsilon": max(per_client.values(), default=0.0),
                           "client_epsilon": per_client,
                           "config": privacy.dp_sgd.model_dump(mode="json")}
    return found


def plant_canaries(config: RunConfig, data: Any, bundle: Any) -> None:
    """Add ``eval.canaries``' secrets to their client's training data (exposure measurement)."""
    from fedfm.trust.attacks.canaries import canary_examples, make_canaries

    cfg = config.eval.canaries
    assert cfg is not None
    try:
        canaries = make_canaries(cfg, bundle.tokenizer, config.seed)
    except ValueError as exc:
        raise ConfigError(f"invalid config: {exc}") from exc
    data.clients[cfg.client].train.extend(
        canary_examples(canaries, cfg.repeats, bundle.tokenizer.eos_token_id))
