"""SCAFFOLD: stochastic controlled averaging with per-client control variates.

Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning",
ICML 2020 (Algorithm 1, control update option II). Each local step uses the corrected gradient
``g + c - c_i``. After K steps at learning rate ``lr`` the client sets
``c_i+ = c_i - c + (x - y_i) / (K lr)`` (with a schedule, ``K lr`` is the sum of the learning
rates actually applied), keeps ``c_i+`` in its per-client store across rounds, and sends
``dy = y_i - x`` and ``dc = c_i+ - c_i``. The server steps ``x`` with its optimizer on the
averaged ``dy`` (plain ``x + lr_g * mean dy`` with the ``sgd`` server optimizer, as in the
paper) and sets ``c <- c + |S|/N * mean dc`` (uniform mean over the clients that reported).
The paper analyses SGD; with AdamW the correction is applied to the gradient the same way.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedfm.algorithms.fedavg import DeltaClient, build_delta_server
from fedfm.algorithms.local_train import (
    GradHook,
    LocalTrainingResult,
    NamedParams,
    ensure_grads,
)
from fedfm.config import AlgorithmConfig
from fedfm.core import state as state_ops
from fedfm.core.algorithm import Algorithm, ClientContext, ClientResult
from fedfm.core.registries import ALGORITHMS
from fedfm.core.registry import MethodInfo
from fedfm.core.state import State
from fedfm.core.update import Broadcast, ClientUpdate

CONTROL = "control"
CONTROL_DELTA = "control_delta"


def _controls(ctx: ClientContext, broadcast: Broadcast) -> tuple[State, State]:
    """(server control c, this client's control c_i; zeros before its first round)."""
    client_control = (ctx.client_state or {}).get(CONTROL) or state_ops.zeros_like(
        broadcast.global_state)
    return broadcast.extras[CONTROL], client_control


class ScaffoldClient(DeltaClient):
    def grad_hook(self, ctx: ClientContext, broadcast: Broadcast) -> GradHook | None:
        server_control, client_control = _controls(ctx, broadcast)
        return _corrector({k: (server_control[k] - client_control[k]).to(ctx.device)
                           for k in broadcast.global_state})

    def finish(self, ctx: ClientContext, broadcast: Broadcast,
               result: LocalTrainingResult) -> ClientResult:
        global_state = broadcast.global_state
        server_control, client_control = _controls(ctx, broadcast)
        local_state = ctx.get_state()
        delta = state_ops.sub(local_state, global_state)
        # c_i+ = c_i - c + (x - y_i) / (sum of applied learning rates)
        new_control = state_ops.add(state_ops.sub(client_control, server_control), delta,
                                    alpha=-1.0 / result.lr_sum)
        update = ClientUpdate(client_id=ctx.client_id, payload=delta,
                              num_examples=len(ctx.train_examples), metrics=result.metrics(),
                              aux={CONTROL_DELTA: state_ops.sub(new_control, client_control)})
        return ClientResult(update=update, client_state={CONTROL: new_control})


def _corrector(correction: dict[str, torch.Tensor]) -> GradHook:
    def apply(named: NamedParams) -> None:
        ensure_grads(named)
        with torch.no_grad():
            for name, param in named:
                param.grad.add_(correction[name])

    return apply


class ScaffoldServer:
    def __init__(self, cfg: AlgorithmConfig, num_clients: int) -> None:
        self.model_server = build_delta_server(cfg)
        self.num_clients = num_clients
        self.control: State | None = None

    def broadcast_extras(self, global_state: State) -> dict[str, State]:
        if self.control is None:
            self.control = state_ops.zeros_like(global_state)
        return {CONTROL: self.control}

    def check_update(self, update: ClientUpdate, global_state: State) -> None:
        if CONTROL_DELTA not in update.aux:
            raise ValueError(f"client {update.client_id}: SCAFFOLD update lacks {CONTROL_DELTA}")
        state_ops.check_compatible(global_state, update.aux[CONTROL_DELTA],
                                   what=f"client {update.client_id} {CONTROL_DELTA}")

    def aggregate(self, global_state: State, updates: list[ClientUpdate], round: int) -> State:
        if self.control is None:
            self.control = state_ops.zeros_like(global_state)
        mean_control_delta = state_ops.weighted_mean(
            [u.aux[CONTROL_DELTA] for u in updates], [1.0] * len(updates))
        self.control = state_ops.add(self.control, mean_control_delta,
                                     alpha=len(updates) / self.num_clients)
        return self.model_server.aggregate(global_state, updates, round)

    def state_dict(self) -> dict[str, State]:
        states = dict(self.model_server.state_dict())
        if self.control is not None:
            states[CONTROL] = self.control
        return states

    def load_state_dict(self, states: Mapping[str, State]) -> None:
        control = states.get(CONTROL)
        self.control = state_ops.clone(control) if control is not None else None
        self.model_server.load_state_dict(states)


@ALGORITHMS.register("scaffold", MethodInfo(
    "adaptability.heterogeneity",
    "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning "
    "(Karimireddy et al., ICML 2020)",
    "algorithm: {name: scaffold, local: {optimizer: sgd, lr: 0.01}}",
    "control variates correct client drift"))
def build_scaffold(cfg: AlgorithmConfig, num_clients: int) -> Algorithm:
    return Algorithm(name="scaffold", client=ScaffoldClient(cfg.local),
                     server=ScaffoldServer(cfg, num_clients))
