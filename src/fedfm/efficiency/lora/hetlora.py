"""HetLoRA: heterogeneous LoRA ranks with zero-padding aggregation and rank self-pruning.

Cho, Manoel, Joshi, Sahu & Gupta, "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models", EMNLP 2024 (arXiv:2401.06432). Client ``i`` of rank ``r_i`` starts from the
leading ``r_i`` components of the global LoRA (truncation). Locally it adds
``lambda ||B_t A_t||_F`` to its loss, where ``t`` are its trailing ``r_i - floor(gamma r_i)``
components, and when that tail's norm has shrunk since its previous round it prunes them:
``r_i <- floor(gamma r_i)`` (self-pruning; the rank never grows back above the assigned one).
The server zero-pads every client's factors to the global rank and averages them weighted by the
Frobenius norm of each client's ``B_i A_i`` (sparsity-weighted aggregation; ``norm_weighting:
false`` uses the example weights instead).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch

from fedfm.algorithms.fedavg import DeltaClient
from fedfm.algorithms.local_train import GradHook, NamedParams, ensure_grads
from fedfm.algorithms.server_opt import build_server_optimizer
from fedfm.config import AlgorithmConfig, LocalTrainingConfig
from fedfm.core import state as state_ops
from fedfm.core.algorithm import Algorithm, ClientContext, ClientResult
from fedfm.core.registries import ALGORITHMS
from fedfm.core.registry import MethodInfo
from fedfm.core.state import State
from fedfm.core.update import Broadcast, ClientUpdate
from fedfm.efficiency.lora.common import RANK_KEY, lora_pairs, stacked_product_norm
from fedfm.efficiency.lora.ranked import RankedClient, RankedServer, ranks_of, weighted_sum

STATE_KEY = "hetlora"  # client state: {"rank": [r_i], "tail_norm": [||B_t A_t||]}


def kept_rank(rank: int, gamma: float) -> int:
    return max(1, math.floor(gamma * rank))


def tail_norm(state: State, pairs: list[tuple[str, str]], start: int, stop: int) -> float:
    """``sqrt(sum_layers ||B[:, start:stop] A[start:stop]||_F^2)``."""
    if stop <= start:
        return 0.0
    squares = [stacked_product_norm([(state[kb][:, start:stop], state[ka][start:stop])]) ** 2
               for ka, kb in pairs]
    return math.sqrt(sum(squares))


class TailRegularisedClient(DeltaClient):
    """Local training with the gradient of ``lambda ||B_t A_t||_F`` added to the factors'
    gradients (the tail ``t`` from the rank in the broadcast)."""

    def __init__(self, local: LocalTrainingConfig, gamma: float, strength: float) -> None:
        super().__init__(local)
        self.gamma = gamma
        self.strength = strength

    def grad_hook(self, ctx: ClientContext, broadcast: Broadcast) -> GradHook | None:
        if self.strength == 0 or RANK_KEY not in broadcast.extras:
            return None
        rank = int(broadcast.extras[RANK_KEY]["rank"])
        start, strength = kept_rank(rank, self.gamma), self.strength

        def add_tail_gradient(named: NamedParams) -> None:
            ensure_grads(named)
            params = dict(named)
            with torch.no_grad():
                for key_a, key_b in lora_pairs(list(params)):
                    a, b = params[key_a], params[key_b]
                    a_tail, b_tail = a[start:rank], b[:, start:rank]
                    product = b_tail @ a_tail
                    norm = torch.linalg.matrix_norm(product)
                    if float(norm) == 0.0:
                        continue  # the subgradient 0 (B starts at zero)
                    unit = product / norm
                    b.grad[:, start:rank] += strength * unit @ a_tail.T
                    a.grad[start:rank] += strength * b_tail.T @ unit

        return add_tail_gradient


class HetLoRAClient(RankedClient):
    """Trains at its current (self-pruned) rank; prunes the tail when its norm shrank."""

    def rank_for(self, ctx: ClientContext, max_rank: int) -> int:
        assigned = self.assigned_rank(ctx.client_id, max_rank)
        own = (ctx.client_state or {}).get(STATE_KEY)
        return min(assigned, int(own["rank"])) if own is not None else assigned

    def finish(self, ctx: ClientContext, start: State, rank: int,
               result: ClientResult) -> ClientResult:
        pairs = lora_pairs(list(start))
        local = state_ops.add(start, result.update.payload)
        keep = kept_rank(rank, self.cfg.prune_gamma)
        norm = tail_norm(local, pairs, keep, rank)
        own = (ctx.client_state or {}).get(STATE_KEY)
        new_rank = rank
        if self.cfg.self_prune and own is not None and norm < float(own["tail_norm"]):
            new_rank = keep
        result.update.metrics["lora_rank"] = float(new_rank)
        result.update.metrics["tail_norm"] = norm
        result.client_state = {**(ctx.client_state or {}), STATE_KEY: OrderedDict(
            rank=torch.tensor([new_rank], dtype=torch.int64),
            tail_norm=torch.tensor([norm], dtype=torch.float64))}
        return super().finish(ctx, start, new_rank, result)


class HetLoRAServer(RankedServer):
    method = "hetlora"

    def __init__(self, *args: object, norm_weighting: bool) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.norm_weighting = norm_weighting

    def combine(self, global_state: State, factors: list[State], updates: list[ClientUpdate],
                pairs: list[tuple[str, str]]) -> State:
        ranks = ranks_of(updates)
        weights = self.weights(updates)
        if self.norm_weighting:
            norms = [tail_norm(f, pairs, 0, r) for f, r in zip(factors, ranks, strict=True)]
            if sum(norms) > 0:
                weights = [n / sum(norms) for n in norms]
        self._last = {"mean_client_rank": sum(ranks) / len(ranks),
                      "max_client_weight": max(weights)}
        return weighted_sum(factors, weights, list(global_state))


@ALGORITHMS.register("hetlora", MethodInfo(
    "efficiency.communication.lora_aggregation",
    "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models (Cho et al., "
    "EMNLP 2024)",
    "algorithm: {name: hetlora, lora: {tiers: [{rank: 2, fraction: 0.5}, {rank: 8, "
    "fraction: 0.5}]}}",
    "per-client ranks: zero-padding, norm-weighted aggregation, rank self-pruning"))
def build_hetlora(cfg: AlgorithmConfig, num_clients: int) -> Algorithm:
    lora = cfg.lora
    inner = TailRegularisedClient(cfg.local, lora.prune_gamma,
                                  lora.prune_lambda if lora.self_prune else 0.0)
    return Algorithm(name="hetlora", client=HetLoRAClient(inner, lora, num_clients, "hetlora"),
                     server=HetLoRAServer(build_server_optimizer(cfg.server_optimizer),
                                          cfg.weighting, norm_weighting=lora.norm_weighting),
                     info={"lora_ranks": lora.model_dump(mode="json")})
