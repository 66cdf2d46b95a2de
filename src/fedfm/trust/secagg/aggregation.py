"""Secure aggregation inside a federated round: the server learns only sums.

``SecureSum`` flattens each update (and any extra scalars, e.g. an example weight or DP-FedAvg's
adaptive-clipping bit), encodes it in the fixed-point ring, runs SecAgg+ over the round's clients
(``fedfm.trust.secagg.simulate``; in-process here, over the network in a deployment) and decodes
the sum. ``SecureMean`` is the FedAvg aggregator on top: clients contribute ``w_i * delta_i`` and
``w_i``, the server divides the two sums. Only sums pass through, which is why secure aggregation
composes with means (FedAvg, FedOpt, DP-FedAvg) and not with medians or Krum.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from fedfm.config import SecureAggregationConfig
from fedfm.core import state as state_ops
from fedfm.core.registries import AGGREGATORS
from fedfm.core.registry import MethodInfo
from fedfm.core.state import State
from fedfm.core.update import WIRE_BYTES, ClientUpdate
from fedfm.trust.secagg.protocol import FixedPoint
from fedfm.trust.secagg.simulate import secure_sum


def _flatten(state: State, keys: list[str]) -> np.ndarray:
    return state_ops.flatten(state, keys).numpy()


def _unflatten(flat: np.ndarray, like: State, keys: list[str]) -> State:
    return state_ops.unflatten(torch.from_numpy(flat.copy()), like, keys)


class SecureSum:
    """Sums of States (plus extra scalars) through SecAgg+; the last round's cost on hand."""

    def __init__(self, cfg: SecureAggregationConfig, seed: int) -> None:
        self.cfg = cfg
        self.seed = seed
        self.encoding = FixedPoint(bound=cfg.bound, frac_bits=cfg.frac_bits)
        self.last: dict[str, float] = {}
        # the last round's protocol traffic per client: (sent, received) bytes
        self.wire: dict[int, tuple[int, int]] = {}

    def graph_parameters(self, num_clients: int) -> tuple[int, int]:
        """(degree, threshold) for a round with ``num_clients`` participants."""
        degree = min(self.cfg.degree or num_clients - 1, num_clients - 1)
        threshold = self.cfg.threshold or max(1, int(np.ceil(0.6 * (degree + 1))))
        return degree, min(threshold, degree + 1)

    def encode(self, state: State, extras: list[float]) -> tuple[np.ndarray, int]:
        """A client's input in the ring: its State (keys sorted) then its extra scalars; and
        how many values had to be clipped into range. The same on a client agent."""
        vector = np.concatenate([_flatten(state, sorted(state)),
                                 np.asarray(extras, dtype=np.float64)])
        return self.encoding.encode(vector)

    def sum(self, states: dict[int, State], extras: dict[int, list[float]], like: State,
            round_index: int) -> tuple[State, np.ndarray, list[int]]:
        """(sum of the survivors' States, sum of their extras, survivors)."""
        keys = sorted(like)
        if not self.encoding.capacity_ok(max(len(states), 1)):
            raise ValueError(f"secure aggregation: {len(states)} clients with values up to "
                             f"{self.cfg.bound} overflow the 64-bit ring at {self.cfg.frac_bits} "
                             f"fractional bits; lower privacy.secure_aggregation.bound or "
                             f"frac_bits")
        encoded, clipped = {}, 0
        for client_id, state in states.items():
            encoded[client_id], count = self.encode(state, extras.get(client_id, []))
            clipped += count
        width = len(next(iter(extras.values()), []))
        if not encoded:
            return _unflatten(np.zeros(sum(like[k].numel() for k in keys)), like, keys), \
                np.zeros(width), []
        degree, threshold = self.graph_parameters(len(encoded))
        rng = np.random.default_rng([self.seed, round_index, 7])
        gone = {u for u in encoded if rng.random() < self.cfg.simulate_dropout_prob}
        result = secure_sum(encoded, threshold=threshold, degree=degree,
                            seed=int(rng.integers(2**31)), drop_after_shares=gone)
        self.wire = dict(result.cost.per_client)
        decoded = self.encoding.decode(result.total)
        size = decoded.size - width
        self.last = {"clients": float(len(encoded)), "survived": float(len(result.survived)),
                     "dropped_in_protocol": float(len(result.dropped)),
                     "degree": float(degree), "threshold": float(threshold),
                     "clipped_values": float(clipped),
                     "bytes_up_per_client": result.cost.bytes_up_per_client,
                     "bytes_down_per_client": result.cost.bytes_down_per_client,
                     "client_seconds": result.cost.client_seconds,
                     "server_seconds": result.cost.server_seconds}
        return _unflatten(decoded[:size], like, keys), decoded[size:], result.survived


@AGGREGATORS.register("secure_mean", MethodInfo(
    "trust.privacy.secure_aggregation",
    "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead (Bell et al., CCS 2020)",
    "privacy: {secure_aggregation: {degree: 20}}",
    "SecAgg+: the server learns only the (weighted) sum of the clients' updates"))
class SecureMean:
    """FedAvg's weighted mean computed from two secure sums: ``sum w_i d_i`` and ``sum w_i``."""

    sum_compatible = True

    def __init__(self, summer: SecureSum, weighting: str = "examples") -> None:
        self.summer = summer
        self.weighting = weighting

    def aggregate(self, updates: list[ClientUpdate]) -> State:
        return self.aggregate_round(updates, 0)

    def contribution(self, update: ClientUpdate) -> tuple[State, list[float]]:
        """What a client feeds into the secure sums: ``w * delta`` and ``[w]``."""
        weight = float(update.num_examples) if self.weighting == "examples" else 1.0
        return OrderedDict((k, v * weight) for k, v in update.payload.items()), [weight]

    def aggregate_round(self, updates: list[ClientUpdate], round_index: int) -> State:
        like = updates[0].payload
        inputs = {u.client_id: self.contribution(u) for u in updates}
        total, extra, survived = self.summer.sum(
            {cid: state for cid, (state, _) in inputs.items()},
            {cid: extras for cid, (_, extras) in inputs.items()}, like, round_index)
        if not survived or extra[0] <= 0:
            raise ValueError("secure aggregation: no client survived the protocol")
        return OrderedDict((k, v / float(extra[0])) for k, v in total.items())

    def round_metrics(self) -> dict[str, Any]:
        return {"secure_aggregation": dict(self.summer.last), WIRE_BYTES: dict(self.summer.wire)}
