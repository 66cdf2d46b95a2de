"""The ``batched`` runtime: K sampled clients train together, one forward/backward per step.

Each module that owns trainable parameters (LoRA's ``lora_A`` / ``lora_B``, a trained classifier
head) is swapped, for the pass, for a wrapper that holds the K clients' own copies of those
parameters and applies them with ``torch.func.vmap`` over the client dimension -- a batched
matmul per adapter -- while every frozen base layer runs once over all K clients' micro-batches
stacked along the batch dimension. This is the multi-adapter batching of S-LoRA (Sheng et al.,
"S-LoRA: Serving Thousands of Concurrent LoRA Adapters", MLSys 2024) and Punica (Chen et al.,
"Punica: Multi-Tenant LoRA Serving", MLSys 2024), applied to training.

Everything else is per client and shared with the ``local`` runtime: each client has its own
``LocalTrainer`` (its seeded batches, its optimizer and optimizer state, its learning-rate
schedule, its algorithm's gradient hook -- FedProx's proximal term, SCAFFOLD's correction -- and
its gradient clipping), driven in lockstep; a client that has finished its steps drops out of
later passes. The loss of each client is the mean over its own examples / labelled tokens, and
the backward pass runs on their sum, so each client's gradient is exactly its own.

Supported: LoRA adapters, algorithms whose client half is a ``DeltaClient`` (FedAvg, FedOpt,
FedProx, SCAFFOLD), classification and causal LM (with a linear output layer). Anything else
falls back to the ``local`` runtime with a logged reason. Dropout draws differ from the local
runtime's (one random stream for the pass, not one per client); with dropout off the per-client
updates equal the local runtime's to floating-point rounding.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from fedfm.algorithms.fedavg import DeltaClient
from fedfm.algorithms.local_train import LocalTrainer
from fedfm.core.client_store import ClientStore
from fedfm.core.loop import ClientOutcome, EvalReport
from fedfm.core.registries import RUNTIMES
from fedfm.core.registry import MethodInfo
from fedfm.core.state import State
from fedfm.core.update import Broadcast
from fedfm.models.adapters import trainable_names
from fedfm.models.fused_loss import CausalLMLoss
from fedfm.runtime.fast import autocast_context
from fedfm.runtime.local import LocalRuntime
from fedfm.runtime.workload import Workload

log = logging.getLogger(__name__)

Leaves = dict[str, torch.Tensor]  # one client's trainable tensors, by parameter name


def unsupported_reason(workload: Workload) -> str | None:
    """Why ``workload`` cannot run batched (None: it can)."""
    config = workload.config
    if config.adapter.kind != "lora":
        return f"adapter.kind {config.adapter.kind!r} (batched needs lora)"
    if not isinstance(workload.client, DeltaClient):  # e.g. wrapped by compression
        return (f"algorithm {config.algorithm.name!r}: its client half "
                f"({type(workload.client).__name__}) has no batched form")
    task = workload.bundle.task
    if task not in ("classification", "causal_lm"):
        return f"task {task!r} (batched supports classification and causal_lm)"
    if task == "causal_lm" and CausalLMLoss.parts(workload.model) is None:
        return "the causal LM has no plain backbone + linear output layer"
    model = workload.model
    for path in _owners(model, trainable_names(model)):
        owner = model.get_submodule(path)
        if not isinstance(owner, torch.nn.Linear):
            return (f"{path} ({type(owner).__name__}) trains, and only linear layers fed "
                    f"examples row by row can hold one copy per client")
    return None


# --------------------------------------------------------------------------- stacked modules


class _PerClient(torch.nn.Module):
    """Applies ``inner`` with each active client's own parameters to that client's rows."""

    def __init__(self, inner: torch.nn.Module, names: dict[str, str]) -> None:
        super().__init__()
        self.inner = inner
        self.names = names  # parameter name inside ``inner`` -> full parameter name
        self.leaves: list[Leaves] = []

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        clients = len(self.leaves)
        if x.shape[0] % clients:
            raise ValueError(f"batched runtime: a trainable module got {x.shape[0]} rows for "
                             f"{clients} clients; its input is not laid out by example")
        params = {local: torch.stack([leaves[full] for leaves in self.leaves])
                  for local, full in self.names.items()}
        grouped = x.reshape(clients, x.shape[0] // clients, *x.shape[1:])

        def apply(client_params: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(self.inner, client_params, (rows, *args), kwargs)

        out = torch.func.vmap(apply, randomness="different")(params, grouped)
        return out.reshape(-1, *out.shape[2:])

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # callers read attributes of the module they think they hold (peft: ``.weight``)
            return getattr(super().__getattr__("inner"), name)


def _owners(model: torch.nn.Module, names: list[str]) -> dict[str, dict[str, str]]:
    """Outermost modules that hold trainable parameters -> {name inside it: full name}."""
    paths = sorted({name.rpartition(".")[0] for name in names}, key=len)
    owners: dict[str, dict[str, str]] = {}
    for path in paths:
        if not any(path.startswith(f"{outer}.") for outer in owners):
            owners[path] = {}
    for name in names:
        owner = next(o for o in owners if name.startswith(f"{o}."))
        owners[owner][name[len(owner) + 1:]] = name
    return owners


@contextmanager
def stacked_adapters(model: torch.nn.Module, names: list[str]) -> Iterator[list[_PerClient]]:
    """Swap every owner of trainable parameters for a ``_PerClient`` wrapper while inside."""
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Module, _PerClient]] = []
    try:
        for path, inner_names in _owners(model, names).items():
            parent_path, _, attribute = path.rpartition(".")
            parent = model.get_submodule(parent_path)
            inner = parent.get_submodule(attribute)
            wrapper = _PerClient(inner, inner_names)
            setattr(parent, attribute, wrapper)
            swapped.append((parent, attribute, inner, wrapper))
        yield [wrapper for *_, wrapper in swapped]
    finally:
        for parent, attribute, inner, _ in reversed(swapped):
            setattr(parent, attribute, inner)


# --------------------------------------------------------------------------- losses


def joint_batch(groups: list[list[dict[str, Any]]], collate: Any) -> tuple[dict, list[int], int]:
    """One batch of every client's rows, client after client, each client padded to the same
    row count by repeating its last row (those rows never reach a loss). Returns the batch,
    each client's real row count, and the rows per client."""
    per_client = max(len(rows) for rows in groups)
    flat: list[dict[str, Any]] = []
    for rows in groups:
        flat.extend(rows + [rows[-1]] * (per_client - len(rows)))
    return collate(flat), [len(rows) for rows in groups], per_client


def client_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor], task: str,
                  real_rows: list[int], per_client: int) -> list[torch.Tensor]:
    """Each client's mean loss over its own real rows (the model's loss, client by client)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"]
    starts = [index * per_client for index in range(len(real_rows))]
    if task == "classification":
        logits = model(**inputs).logits
        return [F.cross_entropy(logits[s:s + n].reshape(-1, logits.shape[-1]),
                                labels[s:s + n].reshape(-1)) for s, n in zip(starts, real_rows,
                                                                           strict=True)]
    fused = CausalLMLoss()
    hidden, head = fused.hidden_states(model, inputs)
    return [fused.loss_from_hidden(hidden[s:s + n], labels[s:s + n], head)
            for s, n in zip(starts, real_rows, strict=True)]


# --------------------------------------------------------------------------- the runtime


@RUNTIMES.register("batched", MethodInfo(
    "efficiency.systems.runtime",
    "S-LoRA: Serving Thousands of Concurrent LoRA Adapters (Sheng et al., MLSys 2024) -- "
    "the batched multi-adapter computation, here for training",
    "runtime: {kind: batched, clients_per_pass: 8}",
    "K clients' LoRA adapters stacked; the frozen base runs once over all their batches"))
class BatchedRuntime:
    def __init__(self, workload: Workload, client_store: ClientStore) -> None:
        self.workload = workload
        self.local = LocalRuntime(workload, client_store)
        self.clients_per_pass = workload.config.runtime.clients_per_pass
        self.fallback = unsupported_reason(workload)
        if self.fallback is not None:
            log.warning("runtime.kind 'batched' runs clients one by one (as 'local'): %s",
                        self.fallback)
        elif workload.speed.cache is not None:
            workload.speed.prefix_cache_note += (
                "; batched training computes its own per-client losses, so the cache serves "
                "evaluation only")
        self.passes = 0

    def run_clients(self, client_ids: list[int], broadcast: Broadcast,
                    round: int) -> Iterator[ClientOutcome]:
        if self.fallback is not None:
            yield from self.local.run_clients(client_ids, broadcast, round)
            return
        for start in range(0, len(client_ids), self.clients_per_pass):
            yield from self.run_pass(client_ids[start:start + self.clients_per_pass],
                                     broadcast, round)

    def run_pass(self, client_ids: list[int], broadcast: Broadcast,
                 round: int) -> list[ClientOutcome]:
        """Train ``client_ids`` together from ``broadcast``; one outcome per client."""
        started = time.perf_counter()
        workload = self.workload
        model = workload.model
        names = trainable_names(model)
        params = dict(model.named_parameters())
        client: DeltaClient = workload.client  # type: ignore[assignment]
        contexts, leaves, trainers = [], [], []
        for client_id in client_ids:
            own = {n: broadcast.global_state[n].to(workload.device, params[n].dtype)
                   .clone().requires_grad_(True) for n in names}
            ctx = dataclasses.replace(self.local.client_context(client_id, round),
                                      get_state=_state_getter(own))
            trainers.append(LocalTrainer(ctx, client.local, list(own.items()),
                                         grad_hook=client.grad_hook(ctx, broadcast)))
            contexts.append(ctx)
            leaves.append(own)
        self._train(trainers, leaves, names)
        self.passes += 1
        wall = (time.perf_counter() - started) / len(client_ids)
        outcomes = []
        for ctx, trainer in zip(contexts, trainers, strict=True):
            result = client.finish(ctx, broadcast, trainer.result())
            outcomes.append(ClientOutcome(client_id=ctx.client_id, update=result.update,
                                          wall_time=wall, bytes_up=result.update.num_bytes(),
                                          client_state=result.client_state))
        return outcomes

    def _train(self, trainers: list[LocalTrainer], leaves: list[Leaves],
               names: list[str]) -> None:
        workload = self.workload
        model = workload.model
        accum = trainers[0].cfg.grad_accum
        autocast = autocast_context(workload.device, workload.autocast_dtype)
        collate = workload.collate_fn()
        torch.manual_seed(trainers[0].ctx.seed)  # one dropout stream for the pass
        model.train()
        with stacked_adapters(model, names) as wrappers:
            while True:
                active = [i for i, trainer in enumerate(trainers) if not trainer.done]
                if not active:
                    break
                for wrapper in wrappers:
                    wrapper.leaves = [leaves[i] for i in active]
                for i in active:
                    trainers[i].start_step()
                for _ in range(accum):
                    groups = [trainers[i].next_rows() for i in active]
                    batch, real_rows, per_client = joint_batch(groups, collate)
                    batch = {k: v.to(workload.device) for k, v in batch.items()}
                    with autocast:
                        losses = client_losses(model, batch, workload.bundle.task, real_rows,
                                               per_client)
                    (torch.stack(losses).sum() / accum).backward()
                    width = batch["input_ids"].shape[1]
                    for i, rows, loss in zip(active, groups, losses, strict=True):
                        trainers[i].record(float(loss.detach()), rows, per_client * width)
                for i in active:
                    trainers[i].finish_step()
            for wrapper in wrappers:
                wrapper.leaves = []

    def evaluate(self, global_state: State, *, round: int, per_client: bool,
                 extras: Mapping[str, State] | None = None) -> EvalReport:
        return self.local.evaluate(global_state, round=round, per_client=per_client,
                                   extras=extras)

    def close(self) -> None:
        return None


def _state_getter(own: Leaves) -> Any:
    def get_state() -> State:
        return OrderedDict((n, t.detach().to("cpu", copy=True).contiguous())
                           for n, t in own.items())
    return get_state

