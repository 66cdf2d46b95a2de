"""How the skew methods layer onto any algorithm (``algorithm.skew``).

A skew method is one of three small parts, so that several compose with each other and with
the core algorithms (FedAvg, FedProx, SCAFFOLD, the FedOpt server optimizers) and adapters:

* a **loss part** changes the local training loss: a ``LogitAdjustment`` (FedLC, FedRS)
  replaces the cross-entropy on the logits, a ``Regularizer`` (MOON) adds a term. All loss
  parts of a run share one forward pass in one ``SkewLossClient`` around the algorithm's
  client half, which hands the loss to local training through ``ClientContext.loss_fn``;
* a **client part** changes which parameters train (FedBABU's frozen head);
* a **server part** changes how updates are combined (FedNova's normalized averaging).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import torch

from fedfm.config import ConfigError, RunConfig
from fedfm.core.algorithm import Algorithm, ClientContext, ClientResult, ClientState
from fedfm.core.registries import SKEW
from fedfm.core.update import Broadcast
from fedfm.models.fused_loss import standard_loss

LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]


class ClientWrapper:
    """A client half around another: what a subclass does not define is the inner one's
    (``prepare_model``, ``personal_state``, ...)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (copying, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def run(self, ctx: ClientContext, broadcast: Broadcast) -> ClientResult:
        return self.inner.run(ctx, broadcast)


class LogitAdjustment(Protocol):
    """Replaces the cross-entropy of a classification client (FedLC, FedRS)."""

    name: str

    def loss(self, logits: torch.Tensor, labels: torch.Tensor,
             class_counts: torch.Tensor) -> torch.Tensor:
        """Mean loss of a batch; ``class_counts[c]``: the client's training rows of class c."""
        ...


@dataclasses.dataclass
class RegularizerStep:
    """What a regularizer sees of one local step."""

    ctx: ClientContext
    broadcast: Broadcast
    batch: dict[str, torch.Tensor]
    hidden: torch.Tensor  # (batch, features): the model's pooled representation, with grad


class Regularizer(Protocol):
    """Adds a term to every local step's loss (MOON) and may keep per-client state."""

    name: str

    def term(self, step: RegularizerStep) -> torch.Tensor: ...

    def client_state(self, ctx: ClientContext) -> ClientState:
        """What to persist for this client after its round (the model just trained)."""
        ...


def pooled_representation(hidden_states: tuple[torch.Tensor, ...],
                          batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The last hidden layer averaged over each row's real tokens (all positions when the
    batch has no attention mask, e.g. image patches): one vector per row."""
    last = hidden_states[-1]
    if last.dim() == 2:
        return last
    mask = batch.get("attention_mask")
    if mask is None or mask.shape != last.shape[:2]:
        return last.mean(dim=1)
    weights = mask.to(last.dtype).unsqueeze(-1)
    return (last * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def class_counts(examples: list[dict[str, Any]], num_classes: int) -> torch.Tensor:
    """Rows per class among a client's training examples (integer ``labels``)."""
    counts = torch.zeros(num_classes)
    for example in examples:
        label = int(example["labels"])
        if 0 <= label < num_classes:
            counts[label] += 1
    return counts


class SkewLossClient(ClientWrapper):
    """Trains the inner client half with the loss parts: one forward per step, the logit
    adjustment's loss (else the model's own) plus every regularizer's term."""

    def __init__(self, inner: Any, adjustment: LogitAdjustment | None,
                 regularizers: list[Regularizer]) -> None:
        super().__init__(inner)
        self.adjustment = adjustment
        self.regularizers = regularizers

    def run(self, ctx: ClientContext, broadcast: Broadcast) -> ClientResult:
        own = dataclasses.replace(ctx, loss_fn=self.loss_fn(ctx, broadcast))
        result = self.inner.run(own, broadcast)
        if self.regularizers:
            kept = {**(ctx.client_state or {}), **(result.client_state or {})}
            for regularizer in self.regularizers:
                kept.update(regularizer.client_state(ctx))
            result.client_state = kept
        return result

    def loss_fn(self, ctx: ClientContext, broadcast: Broadcast) -> LossFn:
        if self.adjustment is None and not self.regularizers:
            return ctx.loss_fn or standard_loss
        counts: dict[int, torch.Tensor] = {}  # by number of classes, computed once a round

        def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            outputs = model(**batch, output_hidden_states=bool(self.regularizers))
            if self.adjustment is None:
                total = outputs.loss
            else:
                logits = outputs.logits
                num_classes = logits.shape[-1]
                if num_classes not in counts:
                    counts[num_classes] = class_counts(ctx.train_examples,
                                                       num_classes).to(logits.device)
                total = self.adjustment.loss(logits, batch["labels"], counts[num_classes])
            if self.regularizers:
                step = RegularizerStep(ctx, broadcast, batch,
                                       pooled_representation(outputs.hidden_states, batch))
                for regularizer in self.regularizers:
                    total = total + regularizer.term(step)
            return total

        return loss


class SkewMethod(Protocol):
    """A built skew method: one or more of the three parts (the others are None)."""

    name: str

    def adjustment(self) -> LogitAdjustment | None: ...

    def regularizer(self) -> Regularizer | None: ...

    def apply(self, algorithm: Algorithm) -> Algorithm:
        """The algorithm with this method's client or server part (itself for loss parts)."""
        ...


class LossOnly:
    """Base of the methods that are a loss part alone."""

    name = ""

    def adjustment(self) -> LogitAdjustment | None:
        return None

    def regularizer(self) -> Regularizer | None:
        return None

    def apply(self, algorithm: Algorithm) -> Algorithm:
        return algorithm


def build_skew_methods(config: RunConfig) -> list[SkewMethod]:
    return [SKEW.get(item.name)(item, config) for item in config.algorithm.skew]


def apply_skew(algorithm: Algorithm, config: RunConfig) -> Algorithm:
    """``algorithm`` with ``algorithm.skew``'s methods: client and server parts in the listed
    order, then one loss client with every loss part outside them."""
    methods = build_skew_methods(config)
    if not methods:
        return algorithm
    for method in methods:
        algorithm = method.apply(algorithm)
    adjustments = [a for a in (m.adjustment() for m in methods) if a is not None]
    regularizers = [r for r in (m.regularizer() for m in methods) if r is not None]
    if adjustments or regularizers:
        client = SkewLossClient(algorithm.client, adjustments[0] if adjustments else None,
                                regularizers)
        algorithm = dataclasses.replace(algorithm, client=client)
    names = [m.name for m in methods]
    return dataclasses.replace(algorithm, info={**algorithm.info, "skew": names})


# the core algorithms, the personalization and clustering methods whose clients train through
# ``ClientContext.loss_fn``; the rest train another way (zeroth order, CMA-ES, DPO, split)
LOSS_COMPATIBLE = ("fedavg", "fedit", "fedprox", "scaffold", "fedper", "fedrep", "ditto",
                   "dual_lora", "fedsa_lora", "ifca", "cfl", "domain_lora", "hetlora",
                   "flexlora", "ffa_lora", "flora")
# algorithms whose client half is a plain ``DeltaClient`` (train, then send local - global)
DELTA_ALGORITHMS = ("fedavg", "fedprox", "scaffold")
LOGIT_METHODS = ("fedlc", "fedrs")
LOSS_METHODS = (*LOGIT_METHODS, "moon")


def check_skew(config: RunConfig) -> None:
    """Refuse, before anything loads, a skew list the run cannot honour, saying why."""
    items = config.algorithm.skew
    if not items:
        return
    names = [item.name for item in items]
    for index, name in enumerate(names):
        if name not in SKEW:
            raise ConfigError(f"invalid config: algorithm.skew[{index}].name: unknown skew "
                              f"method {name!r} (available: {', '.join(SKEW.names())})")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"invalid config: algorithm.skew lists {repeated} more than once")
    logit = [n for n in names if n in LOGIT_METHODS]
    if len(logit) > 1:
        raise ConfigError(f"invalid config: algorithm.skew: {logit[0]} and {logit[1]} both "
                          f"reshape the softmax of the training loss; pick one")
    _check_base(config, names)
    for item in items:
        SKEW.get(item.name).check(item, config)


def _check_base(config: RunConfig, names: list[str]) -> None:
    algorithm = config.algorithm.name
    loss = [n for n in names if n in LOSS_METHODS]
    if loss and algorithm not in LOSS_COMPATIBLE:
        raise ConfigError(f"invalid config: algorithm.skew {loss} change the local training "
                          f"loss, and algorithm {algorithm!r} does not train through it (use "
                          f"one of {', '.join(LOSS_COMPATIBLE)})")
    if loss and config.privacy.dp_sgd is not None:
        raise ConfigError(f"invalid config: algorithm.skew {loss} change the training loss, "
                          f"and privacy.dp_sgd computes per-example gradients of the model's "
                          f"own loss")
