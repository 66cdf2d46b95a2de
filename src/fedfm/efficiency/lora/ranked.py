"""Clients that train a slice of the global LoRA (their own rank) and upload only that slice,
and the server side that pads uploads back and rebuilds each client's factors. Shared by the
rank-heterogeneous methods (HetLoRA, FlexLoRA, FLoRA); the methods differ in how they combine
the clients' factors."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

from fedfm.algorithms.fedavg import with_prefix
from fedfm.algorithms.server_opt import ServerOptimizer
from fedfm.config import LoraAlgorithmConfig
from fedfm.core.algorithm import ClientContext, ClientProcedure, ClientResult
from fedfm.core.state import State
from fedfm.core.update import Broadcast, ClientUpdate
from fedfm.efficiency.lora.common import (
    RANK_KEY,
    client_ranks,
    full_factors,
    global_rank,
    padded,
    require_lora,
    truncate,
    zero_tail,
)


class RankedClient:
    """Train the client's rank-``r_i`` slice of the broadcast LoRA, upload that slice."""

    def __init__(self, inner: ClientProcedure, cfg: LoraAlgorithmConfig, num_clients: int,
                 method: str) -> None:
        self.inner = inner
        self.cfg = cfg
        self.num_clients = num_clients
        self.method = method

    def assigned_rank(self, client_id: int, max_rank: int) -> int:
        ranks = client_ranks(self.cfg, self.num_clients, max_rank)
        return ranks[client_id] if 0 <= client_id < len(ranks) else max_rank

    def rank_for(self, ctx: ClientContext, max_rank: int) -> int:
        return self.assigned_rank(ctx.client_id, max_rank)

    def run(self, ctx: ClientContext, broadcast: Broadcast) -> ClientResult:
        pairs = require_lora(broadcast.global_state, self.method)
        rank = self.rank_for(ctx, global_rank(broadcast.global_state, pairs))
        start = zero_tail(broadcast.global_state, pairs, rank)
        ctx.set_state(start)
        extras = {**broadcast.extras,
                  RANK_KEY: OrderedDict(rank=torch.tensor([rank], dtype=torch.int64))}
        result = self.inner.run(ctx, Broadcast(start, extras, broadcast.round))
        return self.finish(ctx, start, rank, result)

    def finish(self, ctx: ClientContext, start: State, rank: int,
               result: ClientResult) -> ClientResult:
        pairs = require_lora(start, self.method)
        result.update.payload = truncate(result.update.payload, pairs, rank)
        result.update.metadata["rank"] = rank
        return result


class RankedServer:
    """Server half for rank-sliced uploads: ``decode_update`` pads each to the global shapes
    (the round loop calls it before validation); ``combine`` (per method) turns the clients'
    own factors into the next global State, and the server optimizer steps towards it."""

    method = "ranked"

    def __init__(self, optimizer: ServerOptimizer, weighting: str) -> None:
        self.optimizer = optimizer
        self.weighting = weighting
        self._last: dict[str, float] = {}

    def broadcast_extras(self, global_state: State) -> dict[str, State]:
        return {}

    def decode_update(self, update: ClientUpdate, global_state: State) -> ClientUpdate:
        return padded(update, global_state, require_lora(global_state, self.method))

    def weights(self, updates: list[ClientUpdate]) -> list[float]:
        raw = [float(u.num_examples) if self.weighting == "examples" else 1.0 for u in updates]
        total = sum(raw)
        return [w / total for w in raw]

    def aggregate(self, global_state: State, updates: list[ClientUpdate], round: int) -> State:
        pairs = require_lora(global_state, self.method)
        factors = [full_factors(global_state, u, pairs) for u in updates]
        target = self.combine(global_state, factors, updates, pairs)
        pseudo_gradient = OrderedDict((k, target[k] - global_state[k]) for k in global_state)
        return self.optimizer.step(global_state, pseudo_gradient)

    def combine(self, global_state: State, factors: list[State], updates: list[ClientUpdate],
                pairs: list[tuple[str, str]]) -> State:
        raise NotImplementedError

    def round_metrics(self) -> dict[str, Any]:
        return {"lora": dict(self._last)} if self._last else {}

    def state_dict(self) -> dict[str, State]:
        return {f"optimizer.{k}": v for k, v in self.optimizer.state_dict().items()}

    def load_state_dict(self, states: Mapping[str, State]) -> None:
        self.optimizer.load_state_dict(with_prefix(states, "optimizer."))


def weighted_sum(states: list[State], weights: list[float], keys: list[str]) -> State:
    """``sum_i w_i s_i`` over ``keys`` in float64, cast back to each tensor's dtype."""
    out: State = OrderedDict()
    for key in keys:
        total = sum(w * s[key].to(torch.float64) for s, w in zip(states, weights, strict=True))
        out[key] = torch.as_tensor(total).to(states[0][key].dtype)
    return out


def stack_factors(factors: list[State], weights: list[float], ranks: list[int], key_a: str,
                  key_b: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` stacked so that ``B A = sum_i p_i B_i A_i`` (each client's ``r_i`` slice)."""
    b = torch.cat([w * f[key_b][:, :r].to(torch.float64)
                   for f, w, r in zip(factors, weights, ranks, strict=True)], dim=1)
    a = torch.cat([f[key_a][:r].to(torch.float64) for f, r in zip(factors, ranks, strict=True)],
                  dim=0)
    return b, a


def ranks_of(updates: list[ClientUpdate]) -> list[int]:
    return [int(u.metadata["rank"]) for u in updates]
