"""SplitFed / SplitLoRA: split learning of a foundation model's adapter, federated.

Thapa, Arachchige, Camtepe & Sun, "SplitFed: When Federated Learning Meets Split Learning",
AAAI 2022; Lin et al., "SplitLoRA: A Split Parameter-Efficient Fine-Tuning Framework for Large
Language Models", arXiv 2024.

The model is cut after block ``algorithm.split.cut_layer - 1``: the client holds the embeddings
and the first ``cut_layer`` blocks with their adapter parameters, the server the other blocks,
the final norm and the head (``fedfm.efficiency.split.cut``). Every micro-batch the client runs
its part and sends the cut activation (cast to ``split.activation_dtype``) with the labels and
the attention mask; the server runs the rest, back-propagates its loss down to that activation
and returns the gradient (in the same dtype), which the client pushes through its part. The
local loop is ``train_locally``'s (``LocalTrainer``: batches, optimizer, schedule, gradient
accumulation, clipping, autocast), so with an fp32 wire a client's round equals centralized
training of the unsplit model on the same batches.

SplitFed V1: the server trains one copy of its part per client, in parallel, and both parts are
FedAvg'd at the end of the round, so the whole adapter State goes through the usual delta
server (any aggregator or server optimizer). Only the client-side part travels: per client and
round the server books up = client-side delta + activations + labels + masks, and down =
client-side State + gradients (``WIRE_BYTES_TOTAL``); each client reports its counts as metrics.
"""

from __future__ import annotations

from typing import Any

import torch

from fedfm.algorithms.fedavg import build_delta_server
from fedfm.algorithms.local_train import LocalTrainer, client_autocast, trainable_parameters
from fedfm.config import AlgorithmConfig, ConfigError, LocalTrainingConfig, RunConfig, SplitConfig
from fedfm.core import state as state_ops
from fedfm.core.algorithm import Algorithm, ClientContext, ClientResult, ServerRule, ServerWrapper
from fedfm.core.registries import ALGORITHMS
from fedfm.core.registry import MethodInfo
from fedfm.core.state import State
from fedfm.core.update import WIRE_BYTES_TOTAL, Broadcast, ClientUpdate
from fedfm.efficiency.split.cut import WIRE_DTYPES, Cut, Wire, cut_point, parameter_sides
from fedfm.models.fused_loss import CausalLMLoss, standard_loss

UPLOAD_METRICS = ("split_client_delta_bytes", "split_activation_bytes", "split_label_bytes",
                  "split_mask_bytes")
DOWNLOAD_METRICS = ("split_client_state_bytes", "split_gradient_bytes")


# --------------------------------------------------------------------------- client


class SplitFedClient:
    """The client's round, its part and (simulated here, in the same process) the server's.
    Deliberately not a ``DeltaClient``: the ``batched`` runtime trains those in lockstep
    without the cut, so it runs this one client after another."""

    def __init__(self, local: LocalTrainingConfig, split: SplitConfig) -> None:
        self.local = local
        self.split = split

    def run(self, ctx: ClientContext, broadcast: Broadcast) -> ClientResult:
        block_list, block, _ = cut_point(ctx.model, self.split.cut_layer)
        cut = Cut(block, Wire(WIRE_DTYPES[self.split.activation_dtype]))
        trainer = LocalTrainer(ctx, self.local, trainable_parameters(ctx.model))
        client_keys = train_split(ctx, trainer, cut, block_list, self.split.cut_layer)
        delta = state_ops.sub(ctx.get_state(), broadcast.global_state)
        metrics = {**trainer.result().metrics(), **cut.wire.count.metrics(),
                   **client_side_bytes(broadcast.global_state, delta, client_keys)}
        return ClientResult(ClientUpdate(client_id=ctx.client_id, payload=delta,
                                         num_examples=len(ctx.train_examples), metrics=metrics))


def train_split(ctx: ClientContext, trainer: LocalTrainer, cut: Cut, block_list: str,
                cut_layer: int) -> list[str]:
    """``train_locally``'s loop with the backward pass split at the cut; returns the names of
    the client-side trainable parameters (read off the first micro-batch's graphs)."""
    cfg = trainer.cfg
    torch.manual_seed(ctx.seed)  # dropout and any other stochastic layers, as train_locally
    autocast = client_autocast(ctx)
    loss_fn = ctx.loss_fn or standard_loss
    client_keys: list[str] | None = None
    ctx.model.train()
    while not trainer.done:
        trainer.start_step()
        for _ in range(cfg.grad_accum):
            rows = trainer.next_rows()
            batch = device_batch(ctx, rows)
            with cut.active(), autocast:
                loss = loss_fn(ctx.model, batch)
            cut.wire.send_batch(batch)
            if client_keys is None:
                assert cut.sent is not None
                client_keys = parameter_sides(trainer.named, cut.sent, loss, block_list,
                                              cut_layer)
            (loss / cfg.grad_accum).backward()  # the server's part, down to the cut's leaf
            cut.backward()  # the client's part, from the gradient the server returned
            trainer.record(float(loss.detach()), rows,
                           batch["input_ids"].numel() if trainer.has_tokens else 0)
        trainer.finish_step()
    return client_keys or []


def device_batch(ctx: ClientContext, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    batch = ctx.collate(rows)
    if ctx.device.type == "cpu":
        return batch
    return {k: v.to(ctx.device, non_blocking=True) for k, v in batch.items()}


def client_side_bytes(global_state: State, delta: State, keys: list[str]) -> dict[str, float]:
    """Serialized sizes of the client-side part of the global State (down) and of the delta
    (up); the server-side part never travels."""
    keys = [key for key in keys if key in global_state]
    if not keys:
        return {"split_client_state_bytes": 0.0, "split_client_delta_bytes": 0.0}
    return {"split_client_state_bytes":
            float(state_ops.num_bytes(state_ops.select(global_state, keys))),
            "split_client_delta_bytes": float(state_ops.num_bytes(state_ops.select(delta, keys)))}


# --------------------------------------------------------------------------- server


class SplitFedServer(ServerWrapper):
    """FedAvg of both parts (the inner delta server), booking what really crossed the wire."""

    def __init__(self, inner: ServerRule, split: SplitConfig) -> None:
        super().__init__(inner)
        self.split = split
        self._wire: dict[int, tuple[int, int]] = {}

    def bind_workload(self, workload: Any) -> None:
        """Check the cut against the loaded model; keep the frozen-prefix cache only where it
        cannot hide the cut block."""
        try:
            cut_point(workload.model, self.split.cut_layer)
        except ValueError as exc:
            raise ConfigError(f"invalid config: {exc}") from None
        drop_prefix_cache(workload, self.split.cut_layer)
        inner = getattr(self.inner, "bind_workload", None)
        if inner is not None:
            inner(workload)

    def check_update(self, update: ClientUpdate, global_state: State) -> None:
        missing = [k for k in (*UPLOAD_METRICS, *DOWNLOAD_METRICS) if k not in update.metrics]
        if missing:
            raise ValueError(f"splitfed: the update lacks the byte count {missing[0]!r}")
        inner = getattr(self.inner, "check_update", None)
        if inner is not None:
            inner(update, global_state)

    def aggregate(self, global_state: State, updates: list[ClientUpdate], round: int) -> State:
        self._wire = {u.client_id: wire_bytes(u.metrics) for u in updates}
        return self.inner.aggregate(global_state, updates, round)

    def round_metrics(self) -> dict[str, Any]:
        found = getattr(self.inner, "round_metrics", None)
        metrics = dict(found()) if found is not None else {}
        wire, self._wire = self._wire, {}
        if wire:
            metrics[WIRE_BYTES_TOTAL] = wire
        return metrics


def wire_bytes(metrics: dict[str, float]) -> tuple[int, int]:
    """(sent, received) by one split client: its client-side delta, activations, labels and
    masks up; its client-side State and the activations' gradients down."""
    sent = sum(int(metrics.get(k, 0.0)) for k in UPLOAD_METRICS)
    received = sum(int(metrics.get(k, 0.0)) for k in DOWNLOAD_METRICS)
    return sent, received


def drop_prefix_cache(workload: Any, cut_layer: int) -> None:
    """The frozen-prefix cache runs the blocks below its split only to fill itself and then
    replays their output; a cut at or below that split would never run the cut block's hook,
    so the cache goes there (the loss it wrapped is rebuilt)."""
    speed = workload.speed
    cache = speed.cache
    if cache is None or cut_layer > cache.split.index:
        return
    if workload.config.runtime.prefix_cache == "on":
        raise ConfigError(f"invalid config: runtime.prefix_cache 'on' replays blocks "
                          f"0-{cache.split.index - 1}, which hides the split learning cut "
                          f"after block {cut_layer - 1}; use prefix_cache 'auto' or 'off'")
    cache.detach()
    speed.cache, speed.prefix_cache = None, False
    speed.prefix_cache_note = "off: the split learning cut lies in the frozen prefix"
    workload.loss_fn = CausalLMLoss() if speed.fused_loss else standard_loss


# --------------------------------------------------------------------------- config checks


def check_split(config: RunConfig) -> None:
    """Refuse, before anything is loaded, what split learning cannot do; the cut against the
    block count is checked here when the model is a tiny preset, else once it is loaded."""
    if config.algorithm.name != "splitfed":
        return
    for enabled, option, why in _refusals(config):
        if enabled:
            raise ConfigError(f"invalid config: algorithm 'splitfed' cannot be combined with "
                              f"{option}: {why}")
    cut = config.algorithm.split.cut_layer
    blocks = known_block_count(config)
    if blocks is not None and cut >= blocks:
        raise ConfigError(f"invalid config: algorithm.split.cut_layer={cut} but model "
                          f"{config.model.name!r} has {blocks} transformer blocks; the server "
                          f"must keep at least one (use 1 to {blocks - 1})")


def _refusals(config: RunConfig) -> list[tuple[bool, str, str]]:
    privacy = config.privacy
    return [
        (privacy.dp_sgd is not None, "privacy.dp_sgd",
         "per-example clipping across the cut is not implemented (the server would have to "
         "return, and the client clip, one gradient per example)"),
        (privacy.client_dp is not None, "privacy.client_dp",
         "its guarantee covers the adapter update, not the activations and labels the client "
         "sends to the server every step"),
        (privacy.secure_aggregation is not None, "privacy.secure_aggregation",
         "the server trains each client's server-side part itself and sees its activations, "
         "so masking the uploads hides little, and both protocols would book the same bytes"),
        (config.algorithm.compression is not None, "algorithm.compression",
         "only the client-side part of an update travels, beside per-step activations that "
         "compression does not touch"),
        (config.runtime.compile, "runtime.compile",
         "the cut swaps a block's output for a detached leaf inside the compiled backbone"),
        (config.adapter.kind == "prefix_tuning", "adapter.kind 'prefix_tuning'",
         "one prompt encoder on the client feeds key/value prefixes to every block, so the "
         "server's blocks would read client-side parameters directly (prompt_tuning, whose "
         "soft prompt enters before block 0, works)"),
        (_task(config) == "seq2seq", "a seq2seq model",
         "the encoder's output feeds every decoder block through cross-attention, not "
         "through one cut"),
    ]


def _task(config: RunConfig) -> str:
    from fedfm.models import PRESETS

    preset = PRESETS.get(config.model.name)
    return config.model.task or (preset.task if preset is not None else "causal_lm")


def known_block_count(config: RunConfig) -> int | None:
    """Blocks of a tiny preset (after ``config_overrides``); None when only loading tells."""
    from fedfm.models import PRESETS, ModelLoadError
    from fedfm.models.loader import apply_config_overrides

    preset = PRESETS.get(config.model.name)
    if preset is None or preset.make_config is None:
        return None
    hf_config = preset.make_config()
    try:
        apply_config_overrides(hf_config, config.model.config_overrides, config.model.name)
    except ModelLoadError:
        return None  # the loader reports it
    count = getattr(hf_config, "num_hidden_layers", None)
    return count if isinstance(count, int) else None


def check_split_deployable(config: RunConfig) -> None:
    """The deployment exchanges one upload per round; split learning exchanges every step."""
    if config.algorithm.name == "splitfed":
        raise ConfigError("invalid config: algorithm 'splitfed' runs in simulation only so far: "
                          "it exchanges activations and gradients every local step, and the "
                          "deployment's clients send one update per round")


@ALGORITHMS.register("splitfed", MethodInfo(
    "efficiency.split_learning",
    "SplitFed: When Federated Learning Meets Split Learning (Thapa et al., AAAI 2022); "
    "SplitLoRA: A Split Parameter-Efficient Fine-Tuning Framework for Large Language Models "
    "(Lin et al., arXiv 2024)",
    "algorithm: {name: splitfed, split: {cut_layer: 1, activation_dtype: bfloat16}}",
    "client keeps the embeddings and first blocks: activations up and gradients down every "
    "step, both parts FedAvg'd"))
def build_splitfed(cfg: AlgorithmConfig, num_clients: int) -> Algorithm:
    return Algorithm(name="splitfed", client=SplitFedClient(cfg.local, cfg.split),
                     server=SplitFedServer(build_delta_server(cfg), cfg.split),
                     info={"cut_layer": cfg.split.cut_layer,
                           "activation_dtype": cfg.split.activation_dtype})
