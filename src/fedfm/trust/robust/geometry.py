"""The space robust aggregators measure updates in, kept as a Gram matrix.

A round's payloads are flattened into rows of one float64 matrix (the raw ``factors``): that is
what rules combine. Where they *measure* (distances, norms, cosines, coordinates) is either the
same space or, with LoRA, ``product`` space: each client is the change its factors make to every
adapted layer, ``P = (B + dB)(A + dA) - B A``, next to the update's non-LoRA tensors (a
classifier head, say). Two clients whose factor updates differ can change the model identically
(the factorisation is not unique; in round 1, where ``B = 0``, a change of ``A`` moves nothing),
and only the products say how far apart the models really are.

Products are never materialised (an LLM layer's would be ``d x d`` per client). ``P`` is the
rank-``2r`` product ``[B', B] [A'; -A]``, so ``<P_i, P_j> = sum((U_i^T U_j) * (V_i V_j^T))`` with
``2r x 2r`` blocks; every rule works from this Gram matrix, and DnC's random coordinates are read
entry by entry as ``U_i[row] . V_i[:, col]``. Rules that output a combination of updates choose
its coefficients in the measuring space and apply them to the raw factors, so the payload keeps
its shape.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedfm.core.state import State, flatten, unflatten
from fedfm.core.update import ClientUpdate
from fedfm.models.adapters import lora_pairs


@dataclass
class ProductSpace:
    """Per LoRA layer the stacked factors ``U [m, out, 2r]`` and ``V [m, 2r, in]`` of ``m``
    payloads' products, and their non-LoRA tensors ``rest [m, k]``."""

    factors: list[tuple[torch.Tensor, torch.Tensor]]
    rest: torch.Tensor

    @classmethod
    def of(cls, payloads: list[State], global_state: State, pairs: list[tuple[str, str]],
           others: list[str]) -> ProductSpace:
        factors = []
        for key_a, key_b in pairs:
            a = global_state[key_a].to(torch.float64)
            b = global_state[key_b].to(torch.float64)
            u = torch.stack([torch.cat([b + p[key_b].to(torch.float64), b], dim=1)
                             for p in payloads])
            v = torch.stack([torch.cat([a + p[key_a].to(torch.float64), -a], dim=0)
                             for p in payloads])
            factors.append((u, v))
        rest = (torch.stack([flatten(p, others) for p in payloads]) if others
                else torch.zeros(len(payloads), 0, dtype=torch.float64))
        return cls(factors, rest)

    def inner(self, other: ProductSpace) -> torch.Tensor:
        """``[m, m']`` inner products between this space's points and ``other``'s."""
        found = self.rest @ other.rest.T
        for (u, v), (u2, v2) in zip(self.factors, other.factors, strict=True):
            left = torch.einsum("ior,jos->ijrs", u, u2)
            right = torch.einsum("irc,jsc->ijrs", v, v2)
            found = found + (left * right).sum(dim=(2, 3))
        return found

    @property
    def width(self) -> int:
        return sum(u.shape[1] * v.shape[2] for u, v in self.factors) + self.rest.shape[1]

    def coordinates(self, index: torch.Tensor) -> torch.Tensor:
        """``[m, len(index)]``: the points' entries at flat positions ``index`` (layer blocks
        first, in order, each row-major; then the non-LoRA tensors)."""
        out = torch.zeros(self.rest.shape[0], len(index), dtype=torch.float64)
        offset = 0
        for u, v in self.factors:
            size = u.shape[1] * v.shape[2]
            inside = (index >= offset) & (index < offset + size)
            local = index[inside] - offset
            rows, cols = local // v.shape[2], local % v.shape[2]
            out[:, inside] = (u[:, rows, :] * v[:, :, cols].transpose(1, 2)).sum(-1)
            offset += size
        tail = index >= offset
        out[:, tail] = self.rest[:, index[tail] - offset]
        return out


@dataclass
class RoundUpdates:
    """One round's updates: ``raw`` rows are the payloads (what is combined); ``gram`` holds
    their inner products in the measuring space; ``measure(payloads)`` gives further points'
    inner products with the round's and among themselves (a root update, a prior center);
    ``coordinates(index)`` reads entries of the measuring space."""

    client_ids: list[int]
    raw: torch.Tensor  # [n, d]
    gram: torch.Tensor  # [n, n]
    weights: torch.Tensor  # [n], example or uniform weights summing to 1
    keys: list[str]
    like: State
    width: int
    coordinates: Callable[[torch.Tensor], torch.Tensor]
    measure: Callable[[list[State]], tuple[torch.Tensor, torch.Tensor]]

    @property
    def n(self) -> int:
        return len(self.client_ids)

    @property
    def sq_norms(self) -> torch.Tensor:
        return self.gram.diagonal().clamp(min=0)

    def distances(self) -> torch.Tensor:
        """``[n, n]`` squared distances in the measuring space (exact zeros on the diagonal)."""
        return gram_distances(self.gram)

    def combine(self, coefficients: torch.Tensor) -> State:
        """``sum_i c_i raw_i`` as a State."""
        return unflatten(coefficients.to(torch.float64) @ self.raw, self.like, self.keys)

    def state(self, vector: torch.Tensor) -> State:
        return unflatten(vector, self.like, self.keys)


def gram_distances(gram: torch.Tensor) -> torch.Tensor:
    diagonal = gram.diagonal()
    distances = (diagonal[:, None] + diagonal[None, :] - 2 * gram).clamp(min=0)
    return distances.fill_diagonal_(0)


def round_updates(updates: list[ClientUpdate], global_state: State | None, *,
                  space: str, weighting: str) -> RoundUpdates:
    """Stack ``updates``; ``space`` is ``product`` (LoRA factors measured as products, when
    the payload has any and the global State is known) or ``factors``."""
    like = updates[0].payload
    keys = sorted(like)
    raw = torch.stack([flatten(u.payload, keys) for u in updates])
    if weighting == "uniform":
        weights = torch.ones(len(updates), dtype=torch.float64)
    else:
        weights = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
    weights = weights / weights.sum()
    ids = [u.client_id for u in updates]
    pairs = lora_pairs(keys) if space == "product" and global_state is not None else []
    if not pairs:
        def measure_raw(payloads: list[State]) -> tuple[torch.Tensor, torch.Tensor]:
            extra = torch.stack([flatten(p, keys) for p in payloads])
            return raw @ extra.T, extra @ extra.T

        return RoundUpdates(ids, raw, raw @ raw.T, weights, keys, like, raw.shape[1],
                            lambda index: raw[:, index], measure_raw)
    in_pairs = {k for pair in pairs for k in pair}
    others = [k for k in keys if k not in in_pairs]
    space_of = ProductSpace.of([u.payload for u in updates], global_state, pairs, others)

    def measure_products(payloads: list[State]) -> tuple[torch.Tensor, torch.Tensor]:
        extra = ProductSpace.of(payloads, global_state, pairs, others)
        return space_of.inner(extra), extra.inner(extra)

    return RoundUpdates(ids, raw, space_of.inner(space_of), weights, keys, like,
                        space_of.width, space_of.coordinates, measure_products)
