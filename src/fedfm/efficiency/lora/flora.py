"""FLoRA: stack the clients' LoRA factors so the aggregate is exactly the mean of their
products, merge it into the base model, and start the next round from a fresh LoRA.

Wang, Shen, Zhang, Kim, Ma, Zeng & Xie, "FLoRA: Federated Fine-Tuning Large Language Models with
Heterogeneous Low-Rank Adaptations", NeurIPS 2024. With ``B = [p_1 B_1, ..., p_K B_K]`` and
``A = [A_1; ...; A_K]`` (ranks ``r_i`` may differ), ``B A = sum_i p_i B_i A_i`` with no cross terms.
Each layer's base weight takes ``s B A`` (``s = alpha / r``); the global LoRA is then
re-initialised (``A`` drawn afresh from the run seed and the round, ``B = 0``) and non-LoRA tensors
(a classifier head) are averaged as in FedAvg.

In a simulation the process's one base model is merged once per round by the server half
(bound to the workload); the stacked factors are broadcast (``flora.stack``), so ``bytes_down``
counts what real clients would need to merge themselves, and the cumulative merged change of each
layer is server state, checkpointed and re-applied to a fresh base on resume.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch

from fedfm.algorithms.fedavg import DeltaClient
from fedfm.algorithms.server_opt import build_server_optimizer
from fedfm.config import AlgorithmConfig
from fedfm.core.algorithm import Algorithm
from fedfm.core.loop import derive_seed
from fedfm.core.registries import ALGORITHMS
from fedfm.core.registry import MethodInfo
from fedfm.core.state import State
from fedfm.core.update import ClientUpdate
from fedfm.efficiency.lora.common import LORA_A, full_factors, require_lora
from fedfm.efficiency.lora.ranked import (
    RankedClient,
    RankedServer,
    ranks_of,
    stack_factors,
    weighted_sum,
)

STACK_KEY = "flora.stack"
MERGED_PREFIX = "flora.merged."
_REINIT_STREAM = 13

Merge = Callable[[str, torch.Tensor], None]  # (A key, dense change of B A) -> base updated


def fresh_factors(like: State, pairs: list[tuple[str, str]], seed: int) -> State:
    """LoRA's own initialisation drawn from ``seed``: ``A`` Kaiming-uniform (a = sqrt 5, as
    ``peft`` and ``nn.Linear`` do), ``B`` zero."""
    generator = torch.Generator().manual_seed(seed)
    out: State = OrderedDict()
    for key_a, key_b in pairs:
        a = like[key_a]
        bound = 1.0 / math.sqrt(a.shape[1])  # kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), .)
        out[key_a] = ((torch.rand(a.shape, generator=generator, dtype=torch.float64) * 2 - 1)
                      * bound).to(a.dtype)
        out[key_b] = torch.zeros_like(like[key_b])
    return out


class FLoRAServer(RankedServer):
    method = "flora"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.merge: Merge | None = None
        self.scaling: dict[str, float] = {}
        self.seed = 0
        self.merged: dict[str, torch.Tensor] = {}
        self.stack: State = OrderedDict()

    def bind_workload(self, workload: Any) -> None:
        """Merge into the workload's base model (the one model of this process)."""
        self.seed = int(workload.config.seed)
        self.merge, self.scaling = base_merger(workload.model)
        for key_a, change in self.merged.items():  # restored before the bind
            self.merge(key_a, change)

    def broadcast_extras(self, global_state: State) -> dict[str, State]:
        return {STACK_KEY: self.stack} if self.stack else {}

    def aggregate(self, global_state: State, updates: list[ClientUpdate], round: int) -> State:
        if self.merge is None:
            raise RuntimeError("flora: the server half is not bound to a base model")
        pairs = require_lora(global_state, self.method)
        factors = [full_factors(global_state, u, pairs) for u in updates]
        weights, ranks = self.weights(updates), ranks_of(updates)
        lora_keys = {k for pair in pairs for k in pair}
        others = [k for k in global_state if k not in lora_keys]
        target = weighted_sum(factors, weights, others)
        self.stack = OrderedDict()
        for key_a, key_b in pairs:
            b, a = stack_factors(factors, weights, ranks, key_a, key_b)
            change = (self.scaling[key_a] * (b @ a)).to(torch.float32)
            self.merge(key_a, change)
            self.merged[key_a] = self.merged.get(key_a, torch.zeros_like(change)) + change
            self.stack[key_a], self.stack[key_b] = a.float(), b.float()
        target.update(fresh_factors(global_state, pairs, derive_seed(self.seed, round,
                                                                     _REINIT_STREAM)))
        self._last = {"stacked_rank": float(sum(ranks)),
                      "mean_client_rank": sum(ranks) / len(ranks)}
        pseudo_gradient = OrderedDict((k, target[k] - global_state[k]) for k in global_state)
        return self.optimizer.step(global_state, pseudo_gradient)

    def state_dict(self) -> dict[str, State]:
        states = super().state_dict()
        states["flora.merged"] = OrderedDict(self.merged)
        states[STACK_KEY] = OrderedDict(self.stack)
        return states

    def load_state_dict(self, states: Mapping[str, State]) -> None:
        super().load_state_dict(states)
        self.stack = OrderedDict(states.get(STACK_KEY, {}))
        restored = dict(states.get("flora.merged", {}))
        if self.merge is not None:  # bound already: move the base from what it holds
            for key_a, change in restored.items():
                self.merge(key_a, change - self.merged.get(key_a, torch.zeros_like(change)))
        self.merged = restored


def base_merger(model: torch.nn.Module) -> tuple[Merge, dict[str, float]]:
    """A function adding a dense change to the base weight under a LoRA layer, and each
    layer's LoRA scaling, keyed by the layer's A parameter name."""
    scaling: dict[str, float] = {}
    modules: dict[str, torch.nn.Module] = {}
    for name, _ in model.named_parameters():
        if LORA_A not in name:
            continue
        module = model.get_submodule(name.split(LORA_A)[0])
        adapter = name.split(LORA_A)[1].split(".")[0]
        scaling[name] = float(module.scaling[adapter])  # type: ignore[index]
        modules[name] = module

    def merge(key_a: str, change: torch.Tensor) -> None:
        module = modules[key_a]
        weight = module.get_base_layer().weight  # type: ignore[operator]
        delta = change.T if getattr(module, "fan_in_fan_out", False) else change
        with torch.no_grad():
            weight.add_(delta.to(device=weight.device, dtype=weight.dtype))

    return merge, scaling


@ALGORITHMS.register("flora", MethodInfo(
    "efficiency.communication.lora_aggregation",
    "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank "
    "Adaptations (Wang et al., NeurIPS 2024)",
    "algorithm: {name: flora, lora: {tiers: [{rank: 4, fraction: 0.7}, {rank: 8, "
    "fraction: 0.3}]}}",
    "stacked factors: exact mean of the clients' B A, merged into the base each round"))
def build_flora(cfg: AlgorithmConfig, num_clients: int) -> Algorithm:
    return Algorithm(name="flora",
                     client=RankedClient(DeltaClient(cfg.local), cfg.lora, num_clients, "flora"),
                     server=FLoRAServer(build_server_optimizer(cfg.server_optimizer),
                                        cfg.weighting),
                     info={"lora_ranks": cfg.lora.model_dump(mode="json")})
