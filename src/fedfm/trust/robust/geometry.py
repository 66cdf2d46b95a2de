"""The space robust aggregators measure updates in.

A round's payloads are flattened into rows of one float64 matrix (the raw ``factors``). With LoRA,
``product`` geometry measures each client by the change its factors make to every adapted
layer, ``(B + dB)(A + dA) - B A``, flattened next to the update's non-LoRA tensors (a classifier
head, say): two clients whose factor updates differ can change the model identically (the
factorisation is not unique, and in round 1, where ``B = 0``, a change of ``A`` moves nothing),
and only the products say how far apart the models really are. Rules that output a combination
of updates choose its coefficients in this space and apply them to the raw factors, so the
payload keeps its shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedfm.core.state import State, flatten, unflatten
from fedfm.core.update import ClientUpdate

LORA_A, LORA_B = ".lora_A.", ".lora_B."


def lora_pairs(keys: list[str]) -> list[tuple[str, str]]:
    """(A key, B key) of every LoRA layer whose both factors are in ``keys``."""
    present = set(keys)
    pairs = []
    for key in keys:
        if LORA_A in key:
            partner = key.replace(LORA_A, LORA_B)
            if partner in present:
                pairs.append((key, partner))
    return pairs


def product_vector(payload: State, global_state: State, pairs: list[tuple[str, str]],
                   others: list[str]) -> torch.Tensor:
    """``(B + dB)(A + dA) - B A`` of each LoRA layer, then the non-LoRA tensors, flattened."""
    parts = []
    for key_a, key_b in pairs:
        a = global_state[key_a].to(torch.float64)
        b = global_state[key_b].to(torch.float64)
        new_a = a + payload[key_a].to(torch.float64)
        new_b = b + payload[key_b].to(torch.float64)
        parts.append((new_b @ new_a - b @ a).reshape(-1))
    parts.extend(payload[k].detach().reshape(-1).to(torch.float64) for k in others)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


@dataclass
class RoundUpdates:
    """One round's updates as matrices: ``raw`` rows are the payloads (what is combined),
    ``points`` rows are where distances and norms are measured (raw, or LoRA products)."""

    client_ids: list[int]
    raw: torch.Tensor  # [n, d]
    points: torch.Tensor  # [n, d'] (the same tensor as raw in factor space)
    weights: torch.Tensor  # [n], example or uniform weights summing to 1
    keys: list[str]
    like: State

    @property
    def n(self) -> int:
        return len(self.client_ids)

    def combine(self, coefficients: torch.Tensor) -> State:
        """``sum_i c_i raw_i`` as a State."""
        return unflatten(coefficients.to(torch.float64) @ self.raw, self.like, self.keys)

    def state(self, vector: torch.Tensor) -> State:
        return unflatten(vector, self.like, self.keys)


def round_updates(updates: list[ClientUpdate], global_state: State | None, *,
                  space: str, weighting: str) -> RoundUpdates:
    """Stack ``updates``; ``space`` is ``product`` or ``factors``."""
    like = updates[0].payload
    keys = sorted(like)
    raw = torch.stack([flatten(u.payload, keys) for u in updates])
    pairs = lora_pairs(keys) if space == "product" and global_state is not None else []
    if pairs:
        in_pairs = {k for pair in pairs for k in pair}
        others = [k for k in keys if k not in in_pairs]
        points = torch.stack([product_vector(u.payload, global_state, pairs, others)
                              for u in updates])
    else:
        points = raw
    if weighting == "uniform":
        weights = torch.ones(len(updates), dtype=torch.float64)
    else:
        weights = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
    return RoundUpdates([u.client_id for u in updates], raw, points, weights / weights.sum(),
                        keys, like)


def pairwise_sq_distances(points: torch.Tensor) -> torch.Tensor:
    """``[n, n]`` squared Euclidean distances, summed difference by difference (no Gram-matrix
    cancellation, no square root), exact zeros on the diagonal."""
    return torch.stack([(points - row).pow(2).sum(dim=1) for row in points])
