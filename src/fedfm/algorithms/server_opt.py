"""Server optimizers applied to the round's pseudo-gradient (the averaged client delta).

* ``sgd``: ``x <- x + lr * delta``; with lr = 1 this is FedAvg (McMahan et al., "Communication-
  Efficient Learning of Deep Networks from Decentralized Data", AISTATS 2017).
* ``avgm``: server momentum, ``v <- beta v + delta; x <- x + lr v`` (Hsu et al., "Measuring the
  Effects of Non-Identical Data Distribution for Federated Visual Classification", arXiv 2019).
* ``adagrad`` / ``adam`` / ``yogi``: FedAdagrad, FedAdam, FedYogi exactly as Algorithm 2 of
  Reddi et al., "Adaptive Federated Optimization", ICLR 2021: ``m <- b1 m + (1-b1) delta``;
  ``v`` updated per method; ``x <- x + lr m / (sqrt(v) + tau)``; no bias correction;
  ``v`` starts at ``initial_accumulator`` (default ``tau**2``, the paper's ``v_{-1} >= tau^2``).

Moments are kept in float32 (or the parameter's dtype if wider) and checkpointed by name.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Protocol

import torch

from fedfm.config import ServerOptimizerConfig
from fedfm.core import state as state_ops
from fedfm.core.registries import SERVER_OPTIMIZERS
from fedfm.core.registry import MethodInfo
from fedfm.core.state import State


class ServerOptimizer(Protocol):
    def step(self, global_state: State, pseudo_gradient: State) -> State: ...
    def state_dict(self) -> dict[str, State]: ...
    def load_state_dict(self, states: Mapping[str, State]) -> None: ...


def _moment_like(state: State, fill: float = 0.0) -> State:
    return OrderedDict(
        (k, torch.full(v.shape, fill, dtype=torch.promote_types(v.dtype, torch.float32)))
        for k, v in state.items()
    )


@SERVER_OPTIMIZERS.register("sgd", MethodInfo(
    "efficiency.systems.optimization", "Adaptive Federated Optimization (Reddi et al., ICLR 2021)",
    "algorithm: {server_optimizer: {name: sgd, lr: 1.0}}",
    "global += lr * mean update (lr 1: FedAvg)"))
class ServerSGD:
    def __init__(self, cfg: ServerOptimizerConfig) -> None:
        self.lr = cfg.lr

    def step(self, global_state: State, pseudo_gradient: State) -> State:
        return state_ops.add(global_state, pseudo_gradient, alpha=self.lr)

    def state_dict(self) -> dict[str, State]:
        return {}

    def load_state_dict(self, states: Mapping[str, State]) -> None:
        return None


@SERVER_OPTIMIZERS.register("avgm", MethodInfo(
    "efficiency.systems.optimization",
    "Measuring the Effects of Non-Identical Data Distribution for Federated Visual "
    "Classification (Hsu et al., arXiv:1909.06335, 2019)",
    "algorithm: {server_optimizer: {name: avgm, lr: 1.0, momentum: 0.9}}",
    "FedAvgM: server momentum"))
class ServerMomentum:
    def __init__(self, cfg: ServerOptimizerConfig) -> None:
        self.lr, self.momentum = cfg.lr, cfg.momentum
        self.velocity: State | None = None

    def step(self, global_state: State, pseudo_gradient: State) -> State:
        if self.velocity is None:
            self.velocity = _moment_like(pseudo_gradient)
        self.velocity = OrderedDict(
            (k, self.momentum * self.velocity[k] + pseudo_gradient[k].to(self.velocity[k].dtype))
            for k in pseudo_gradient
        )
        return OrderedDict(
            (k, (global_state[k] + self.lr * self.velocity[k]).to(global_state[k].dtype))
            for k in global_state
        )

    def state_dict(self) -> dict[str, State]:
        return {"velocity": self.velocity} if self.velocity is not None else {}

    def load_state_dict(self, states: Mapping[str, State]) -> None:
        velocity = states.get("velocity")
        self.velocity = state_ops.clone(velocity) if velocity is not None else None


class _AdaptiveServerOptimizer:
    """Shared FedAdagrad/FedAdam/FedYogi step; subclasses define the ``v`` update."""

    def __init__(self, cfg: ServerOptimizerConfig) -> None:
        self.lr, self.beta1, self.beta2, self.tau = cfg.lr, cfg.beta1, cfg.beta2, cfg.tau
        self.v_init = cfg.tau**2 if cfg.initial_accumulator is None else cfg.initial_accumulator
        self.m: State | None = None
        self.v: State | None = None

    def update_v(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step(self, global_state: State, pseudo_gradient: State) -> State:
        if self.m is None or self.v is None:
            self.m = _moment_like(pseudo_gradient)
            self.v = _moment_like(pseudo_gradient, fill=self.v_init)
        new_state: State = OrderedDict()
        new_m: State = OrderedDict()
        new_v: State = OrderedDict()
        for key, param in global_state.items():
            delta = pseudo_gradient[key].to(self.m[key].dtype)
            new_m[key] = self.beta1 * self.m[key] + (1 - self.beta1) * delta
            new_v[key] = self.update_v(self.v[key], delta * delta)
            step = self.lr * new_m[key] / (new_v[key].sqrt() + self.tau)
            new_state[key] = (param + step).to(param.dtype)
        self.m, self.v = new_m, new_v  # fresh dicts: states handed out earlier stay valid
        return new_state

    def state_dict(self) -> dict[str, State]:
        if self.m is None or self.v is None:
            return {}
        return {"m": self.m, "v": self.v}

    def load_state_dict(self, states: Mapping[str, State]) -> None:
        self.m = state_ops.clone(states["m"]) if "m" in states else None
        self.v = state_ops.clone(states["v"]) if "v" in states else None


@SERVER_OPTIMIZERS.register("adagrad", MethodInfo(
    "efficiency.systems.optimization", "Adaptive Federated Optimization (Reddi et al., ICLR 2021)",
    "algorithm: {server_optimizer: {name: adagrad, lr: 0.01, tau: 1.0e-3}}", "FedAdagrad"))
class FedAdagrad(_AdaptiveServerOptimizer):
    def update_v(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return v + delta_sq


@SERVER_OPTIMIZERS.register("adam", MethodInfo(
    "efficiency.systems.optimization", "Adaptive Federated Optimization (Reddi et al., ICLR 2021)",
    "algorithm: {server_optimizer: {name: adam, lr: 0.01, beta1: 0.9, beta2: 0.99}}",
    "FedAdam"))
class FedAdam(_AdaptiveServerOptimizer):
    def update_v(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return self.beta2 * v + (1 - self.beta2) * delta_sq


@SERVER_OPTIMIZERS.register("yogi", MethodInfo(
    "efficiency.systems.optimization", "Adaptive Federated Optimization (Reddi et al., ICLR 2021)",
    "algorithm: {server_optimizer: {name: yogi, lr: 0.01}}", "FedYogi"))
class FedYogi(_AdaptiveServerOptimizer):
    def update_v(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return v - (1 - self.beta2) * delta_sq * torch.sign(v - delta_sq)


def build_server_optimizer(cfg: ServerOptimizerConfig) -> ServerOptimizer:
    return SERVER_OPTIMIZERS.get(cfg.name)(cfg)
