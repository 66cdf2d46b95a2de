"""What the LoRA-aware algorithms share: the factor pairs of a State, client ranks, cutting a
State to a rank and padding it back, and products of stacked factors that are never
materialised densely.

A LoRA layer holds ``A`` (``[r, in]``) and ``B`` (``[out, r]``); it changes its base weight by
``s B A`` with ``s = alpha / r`` fixed by the global adapter. A client of rank ``r_i <= r`` owns the
first ``r_i`` rows of ``A`` and columns of ``B``; with the rest zero, training keeps it zero (each
factor's gradient there is multiplied by the other's zero part), so one model of rank ``r``
serves every client, and the client uploads only its ``r_i`` slice.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping

import torch

from fedfm.config import LoraAlgorithmConfig
from fedfm.core.state import State
from fedfm.core.update import ClientUpdate
from fedfm.models.adapters import LORA_A, lora_pairs

__all__ = ["LORA_A", "RANK_KEY", "client_ranks", "full_factors", "global_rank", "lora_pairs",
           "lowrank_svd", "padded", "require_lora", "stacked_product_norm", "truncate",
           "zero_tail"]

RANK_KEY = "lora_rank"  # Broadcast.extras entry: the rank this client trains this round


def require_lora(state: Mapping[str, torch.Tensor], method: str) -> list[tuple[str, str]]:
    pairs = lora_pairs(list(state))
    if not pairs:
        raise ValueError(f"{method} needs LoRA factors in the communicated State (adapter.kind "
                         f"lora); found none")
    return pairs


def global_rank(state: Mapping[str, torch.Tensor], pairs: list[tuple[str, str]]) -> int:
    return int(state[pairs[0][0]].shape[0])


def client_ranks(cfg: LoraAlgorithmConfig, num_clients: int, max_rank: int) -> list[int]:
    """Each client's rank: the list, the tiers by blocks of client ids, or ``max_rank``."""
    if cfg.ranks is not None:
        return [min(rank, max_rank) for rank in cfg.ranks]
    if cfg.tiers is None:
        return [max_rank] * num_clients
    ranks: list[int] = []
    boundary = 0.0
    for tier in cfg.tiers:
        boundary += tier.fraction
        upto = num_clients if tier is cfg.tiers[-1] else round(boundary * num_clients)
        ranks.extend([min(tier.rank, max_rank)] * max(0, upto - len(ranks)))
    return ranks[:num_clients]


def zero_tail(state: Mapping[str, torch.Tensor], pairs: list[tuple[str, str]],
              rank: int) -> State:
    """A copy with every LoRA layer's rows of ``A`` and columns of ``B`` beyond ``rank`` zeroed."""
    out: State = OrderedDict((k, v.clone()) for k, v in state.items())
    for key_a, key_b in pairs:
        out[key_a][rank:] = 0
        out[key_b][:, rank:] = 0
    return out


def truncate(state: Mapping[str, torch.Tensor], pairs: list[tuple[str, str]],
             rank: int) -> State:
    """Only the first ``rank`` rows of each ``A`` and columns of each ``B`` (what a client of
    that rank uploads); other tensors as they are."""
    out: State = OrderedDict((k, v) for k, v in state.items())
    for key_a, key_b in pairs:
        out[key_a] = state[key_a][:rank].contiguous()
        out[key_b] = state[key_b][:, :rank].contiguous()
    return out


def padded(update: ClientUpdate, like: Mapping[str, torch.Tensor],
           pairs: list[tuple[str, str]], max_rank: int | None = None) -> ClientUpdate:
    """A rank-``r_i`` upload zero-padded to the global shapes, its rank in
    ``metadata["rank"]``; a ValueError naming the tensor for anything else."""
    payload = update.payload
    missing = [k for k in like if k not in payload]
    extra = [k for k in payload if k not in like]
    if missing or extra:
        raise ValueError(f"LoRA upload: tensors differ from the global State (missing "
                         f"{missing[:3]}, unexpected {extra[:3]})")
    rank = int(payload[pairs[0][0]].shape[0]) if pairs else 0
    limit = global_rank(like, pairs) if max_rank is None else max_rank
    if not 1 <= rank <= limit:
        raise ValueError(f"LoRA upload: rank {rank} outside 1..{limit}")
    out: State = OrderedDict()
    lora_keys = {k for pair in pairs for k in pair}
    for key, reference in like.items():
        got = payload[key]
        if not isinstance(got, torch.Tensor) or got.dtype != reference.dtype:
            raise ValueError(f"LoRA upload {key}: expected a {reference.dtype} tensor")
        expected = _ranked_shape(key, reference, rank, lora_keys)
        if tuple(got.shape) != expected:
            raise ValueError(f"LoRA upload {key}: shape {tuple(got.shape)}, expected {expected} "
                             f"for rank {rank}")
        full = torch.zeros_like(reference)
        if key in lora_keys and LORA_A in key:
            full[:rank] = got
        elif key in lora_keys:
            full[:, :rank] = got
        else:
            full = got
        out[key] = full
    metadata = {**update.metadata, "rank": rank}
    return ClientUpdate(update.client_id, out, update.num_examples, dict(update.metrics),
                        dict(update.aux), metadata)


def _ranked_shape(key: str, reference: torch.Tensor, rank: int, lora_keys: set[str]
                  ) -> tuple[int, ...]:
    shape = tuple(reference.shape)
    if key not in lora_keys:
        return shape
    return (rank, *shape[1:]) if LORA_A in key else (shape[0], rank, *shape[2:])


def stacked_product_norm(blocks: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """``||sum_k U_k V_k||_F`` from the factors alone: with ``U = [U_1 ...]`` and
    ``V = [V_1; ...]`` it is ``sqrt(sum((U^T U) * (V V^T)))``, a ``(sum r_k)``-square product."""
    left = torch.cat([u.to(torch.float64) for u, _ in blocks], dim=1)
    right = torch.cat([v.to(torch.float64) for _, v in blocks], dim=0)
    squared = float(((left.T @ left) * (right @ right.T)).sum())
    return math.sqrt(max(squared, 0.0))


def lowrank_svd(left: torch.Tensor, right: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD ``U S V^T`` of ``left @ right`` (``[m, k] @ [k, n]``) without forming it:
    QR of both factors, then the SVD of the small ``k x k`` core."""
    q_left, r_left = torch.linalg.qr(left.to(torch.float64))
    q_right, r_right = torch.linalg.qr(right.to(torch.float64).T)
    u_core, singular, vh_core = torch.linalg.svd(r_left @ r_right.T, full_matrices=False)
    return q_left @ u_core, singular, (q_right @ vh_core.T).T


def full_factors(global_state: Mapping[str, torch.Tensor], update: ClientUpdate,
                 pairs: list[tuple[str, str]]) -> State:
    """The client's own LoRA after training: the global State cut to its rank plus its
    (padded) delta."""
    rank = int(update.metadata.get("rank", global_rank(global_state, pairs)))
    start = zero_tail(global_state, pairs, rank)
    return OrderedDict((k, start[k] + update.payload[k].to(start[k].dtype)) for k in start)
