"""Personal heads: FedPer and FedRep.

* FedPer -- Arivazhagan, Aggarwal, Singh & Choudhary, "Federated Learning with Personalization
  Layers", arXiv:1912.00818, 2019. The model is a shared body (here: the adapter, e.g. LoRA)
  and a personal head. Each round a client trains body and head together from the global body
  and its own head; it uploads the body delta only (averaged by FedAvg) and keeps the head.
* FedRep -- Collins, Hassani, Mokhtari & Shakkottai, "Exploiting Shared Representations for
  Personalized Federated Learning", ICML 2021. Same split, but each round first trains the
  head alone for ``algorithm.personal.head_steps`` steps (body frozen), then the body alone
  for ``algorithm.local`` steps (head frozen at its new value); the body delta is uploaded.

The head is every tensor of the communicated State whose name contains one of
``algorithm.personal.head``; by default the task head (a ``classifier`` / ``score`` /
``classification_head`` module, trained with ``adapter.train_head``). It stays in the client
store under ``personal_head``; the global head never moves, and each client's personalized
evaluation uses its own head (``personal_state``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from fedfm.adaptability.personalization.common import (
    LocalKeys,
    LocalPartClient,
    LocalPartServer,
    split_keys,
)
from fedfm.algorithms.fedavg import DeltaClient, build_delta_server
from fedfm.algorithms.local_train import LocalTrainingResult, train_locally, trainable_parameters
from fedfm.config import AlgorithmConfig, ConfigError, LocalTrainingConfig, RunConfig
from fedfm.core.algorithm import Algorithm, ClientContext
from fedfm.core.loop import derive_seed
from fedfm.core.registries import ALGORITHMS
from fedfm.core.registry import MethodInfo
from fedfm.core.update import Broadcast
from fedfm.models.adapters import HEAD_MODULE_NAMES

STATE_KEY = "personal_head"
_HEAD_STREAM = 1  # FedRep's head phase draws its batches from its own seed


def head_matcher(markers: list[str] | None) -> Callable[[str], bool]:
    """Whether a tensor name belongs to the head: it contains one of ``markers``; with none,
    one of its dotted components is a task head module (``classifier``, ``score``, ...)."""
    if markers is None:
        return lambda key: any(part in HEAD_MODULE_NAMES for part in key.split("."))
    chosen = tuple(markers)
    return lambda key: any(marker in key for marker in chosen)


def head_keys(markers: list[str] | None, method: str) -> LocalKeys:
    is_head = head_matcher(markers)
    what = (f"a head tensor (names containing {markers})" if markers is not None
            else "a task head tensor (set algorithm.personal.head, e.g. [lm_head])")

    def local_keys(keys: Iterable[str]) -> list[str]:
        return split_keys(keys, is_head, method, what)

    return local_keys


@contextmanager
def trained_only(model: torch.nn.Module, names: set[str]) -> Iterator[None]:
    """Inside, only the trainable parameters named in ``names`` train; the others are frozen
    and trainable again on exit (so the communicated State keeps its keys)."""
    frozen = [param for name, param in trainable_parameters(model) if name not in names]
    for param in frozen:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param in frozen:
            param.requires_grad_(True)


class HeadClient(LocalPartClient):
    """FedPer's client: body and head trained jointly; the head stays home."""

    def prepare_model(self, bundle: Any, config: RunConfig) -> Any:
        """Refuse, before any round, a model whose trainable tensors have no head or are
        all head."""
        from fedfm.models import trainable_names

        try:
            self.local_keys(trainable_names(bundle.model))
        except ValueError as exc:
            raise ConfigError(f"invalid config: {exc}") from exc
        return bundle


@dataclasses.dataclass
class TwoPhaseResult(LocalTrainingResult):
    """The body phase's result plus the head phase's mean loss and steps."""

    head_loss: float = 0.0
    head_steps: int = 0

    def metrics(self) -> dict[str, float]:
        return {**super().metrics(), "head_loss": self.head_loss,
                "head_steps": float(self.head_steps)}


class FedRepClient(HeadClient):
    """FedRep's client: the head alone first, then the body alone."""

    def __init__(self, inner: DeltaClient, local_keys: LocalKeys, head_steps: int) -> None:
        super().__init__(inner, local_keys, STATE_KEY)
        self.head_local: LocalTrainingConfig = inner.local.model_copy(
            update={"steps": head_steps, "epochs": None})

    def train_round(self, ctx: ClientContext, broadcast: Broadcast) -> LocalTrainingResult:
        heads = set(self.local_keys(broadcast.global_state))
        head_ctx = dataclasses.replace(ctx, seed=derive_seed(ctx.seed, _HEAD_STREAM))
        with trained_only(ctx.model, heads):
            head = train_locally(head_ctx, self.head_local)
        with trained_only(ctx.model, set(broadcast.global_state) - heads):
            body = self.inner.train(ctx, broadcast)
        return TwoPhaseResult(**dataclasses.asdict(body), head_loss=head.mean_loss,
                              head_steps=head.steps)


def _server(cfg: AlgorithmConfig, name: str) -> LocalPartServer:
    return LocalPartServer(build_delta_server(cfg), head_keys(cfg.personal.head, name), name)


@ALGORITHMS.register("fedper", MethodInfo(
    "adaptability.personalization",
    "Federated Learning with Personalization Layers (Arivazhagan et al., arXiv:1912.00818, "
    "2019)",
    "algorithm: {name: fedper, personal: {head: null}}",
    "shared body averaged, personal head kept on each client; both trained jointly"))
def build_fedper(cfg: AlgorithmConfig, num_clients: int) -> Algorithm:
    client = HeadClient(DeltaClient(cfg.local), head_keys(cfg.personal.head, "fedper"),
                        STATE_KEY)
    return Algorithm(name="fedper", client=client, server=_server(cfg, "fedper"),
                     info={"server_optimizer": cfg.server_optimizer.name})


@ALGORITHMS.register("fedrep", MethodInfo(
    "adaptability.personalization",
    "Exploiting Shared Representations for Personalized Federated Learning (Collins et al., "
    "ICML 2021)",
    "algorithm: {name: fedrep, personal: {head_steps: 5}}",
    "head trained alone, then the shared body alone; body averaged, head kept local"))
def build_fedrep(cfg: AlgorithmConfig, num_clients: int) -> Algorithm:
    client = FedRepClient(DeltaClient(cfg.local), head_keys(cfg.personal.head, "fedrep"),
                          cfg.personal.head_steps)
    return Algorithm(name="fedrep", client=client, server=_server(cfg, "fedrep"),
                     info={"server_optimizer": cfg.server_optimizer.name,
                           "head_steps": cfg.personal.head_steps})
