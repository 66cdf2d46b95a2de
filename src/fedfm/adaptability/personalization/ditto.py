"""Ditto: a federated global model plus a proximally regularised personal model per client.

Li, Hu, Beirami & Smith, "Ditto: Fair and Robust Federated Learning Through Personalization",
ICML 2021. The global model ``w`` is trained exactly as in FedAvg (any server optimizer).
Besides, each selected client ``k`` updates its personal model ``v_k`` -- kept in the client
store, starting from the global model at its first participation -- with
``algorithm.personal.personal_steps`` local steps (None: ``algorithm.local``'s) on

    F_k(v_k) + lam/2 ||v_k - w^t||^2,

where ``w^t`` is the global model the client received this round (Algorithm 1 of the paper).
The proximal gradient ``lam (v_k - w^t)`` is added to the accumulated gradient before clipping
and the optimizer step, as FedProx does. ``lam = 0`` is independent local training; a large
``lam`` keeps ``v_k`` at the global model. Only the global model's delta is uploaded;
``personal_state`` is ``v_k`` (the global model for a client that never trained).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from fedfm.algorithms.fedavg import DeltaClient, build_delta_server
from fedfm.algorithms.local_train import GradHook, NamedParams, ensure_grads, train_locally
from fedfm.config import AlgorithmConfig, LocalTrainingConfig
from fedfm.core.algorithm import Algorithm, ClientContext, ClientResult, ClientState
from fedfm.core.loop import derive_seed
from fedfm.core.registries import ALGORITHMS
from fedfm.core.registry import MethodInfo
from fedfm.core.state import State
from fedfm.core.update import Broadcast

STATE_KEY = "ditto_personal"
PERSONAL_STREAM = 2  # the personal model's batches come from their own seed


def personal_seed(ctx: ClientContext) -> int:
    """The seed of client ``ctx``'s personal training this round."""
    return derive_seed(ctx.seed, PERSONAL_STREAM)


def proximal_hook(anchor: Mapping[str, torch.Tensor], lam: float,
                  device: torch.device) -> GradHook | None:
    """Adds ``lam (v - anchor)`` to each parameter's gradient (None when ``lam`` is 0)."""
    if lam == 0.0:
        return None
    on_device = {k: v.to(device) for k, v in anchor.items()}

    def add_proximal_gradient(named: NamedParams) -> None:
        ensure_grads(named)
        with torch.no_grad():
            for name, param in named:
                param.grad.add_(param.detach() - on_device[name], alpha=lam)

    return add_proximal_gradient


class DittoClient:
    def __init__(self, inner: DeltaClient, personal: LocalTrainingConfig, lam: float) -> None:
        self.inner = inner
        self.personal = personal
        self.lam = lam

    def personal_state(self, global_state: State, client_state: ClientState | None,
                       extras: Mapping[str, State] | None = None) -> State:
        """This client's personal model ``v_k`` (the global model before it first trains)."""
        own = (client_state or {}).get(STATE_KEY)
        return global_state if own is None else own

    def run(self, ctx: ClientContext, broadcast: Broadcast) -> ClientResult:
        ctx.set_state(broadcast.global_state)
        result = self.inner.run(ctx, broadcast)  # the global model's local update (FedAvg)
        start = self.personal_state(broadcast.global_state, ctx.client_state)
        ctx.set_state(start)
        hook = proximal_hook(broadcast.global_state, self.lam, ctx.device)
        trained = train_locally(dataclasses.replace(ctx, seed=personal_seed(ctx)),
                                self.personal, grad_hook=hook)
        result.update.metrics["personal_loss"] = trained.mean_loss
        result.client_state = {**(ctx.client_state or {}), STATE_KEY: ctx.get_state()}
        return result


def personal_training(cfg: AlgorithmConfig) -> LocalTrainingConfig:
    """``algorithm.local`` with ``personal.personal_steps`` steps when set."""
    steps = cfg.personal.personal_steps
    if steps is None:
        return cfg.local
    return cfg.local.model_copy(update={"steps": steps, "epochs": None})


@ALGORITHMS.register("ditto", MethodInfo(
    "adaptability.personalization",
    "Ditto: Fair and Robust Federated Learning Through Personalization (Li et al., ICML 2021)",
    "algorithm: {name: ditto, personal: {lam: 0.1, personal_steps: 10}}",
    "FedAvg global model plus a personal model per client, pulled towards it by lam/2 ||v-w||^2"))
def build_ditto(cfg: AlgorithmConfig, num_clients: int) -> Algorithm:
    client = DittoClient(DeltaClient(cfg.local), personal_training(cfg), cfg.personal.lam)
    return Algorithm(name="ditto", client=client, server=build_delta_server(cfg),
                     info={"server_optimizer": cfg.server_optimizer.name,
                           "lam": cfg.personal.lam})
