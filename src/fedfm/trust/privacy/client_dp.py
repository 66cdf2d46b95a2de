"""Client-level differential privacy for any delta-based algorithm (FedAvg, FedProx, FedOpt).

DP-FedAvg: McMahan, Ramage, Talwar & Zhang, "Learning Differentially Private Recurrent Language
Models", ICLR 2018. Each client's update is clipped to L2 norm ``C``; the server sums the clipped
updates, adds Gaussian noise of std ``z C`` and divides by the expected number of clients (the
fixed-denominator estimator, whose sensitivity does not depend on who took part), then applies the
server optimizer. With ``noise: distributed`` each of the ``m`` clients adds its own share
``N(0, (z C)^2 / m)`` instead, so the sum is private even to a server that only sees it through
secure aggregation; a round in which clients drop out has less noise, and the accountant is told
the noise it really had.

Adaptive clipping: Andrew, Thakkar, McMahan & Ramaswamy, "Differentially Private Learning with
Adaptive Clipping", NeurIPS 2021. Each client also reports whether its update norm was at most
``C``; the server adds ``N(0, sigma_b^2)`` to the count and moves ``C <- C exp(-eta (b - gamma))``
towards the ``gamma`` quantile of the norms. The update's noise multiplier is raised to
``z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` so that the two releases together cost exactly
what one Gaussian mechanism with multiplier ``z`` does (their Theorem 1), which is what is
accounted.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

from fedfm.config import ClientDPConfig
from fedfm.core import state as state_ops
from fedfm.core.algorithm import ClientContext, ClientProcedure, ClientResult
from fedfm.core.state import State
from fedfm.core.update import WIRE_BYTES, Broadcast, ClientUpdate
from fedfm.trust.privacy.accountant import ClientLevelAccountant, SamplingModel

EXTRAS_KEY = "client_dp"  # Broadcast.extras entry: clip norm and per-client noise std
UNCLIPPED_KEY = "client_dp"  # ClientUpdate.aux entry: the adaptive-clipping bit


def clip_to_norm(state: State, clip_norm: float) -> tuple[State, float]:
    """``state * min(1, C / ||state||)`` (global L2 norm over all tensors) and the norm."""
    norm = state_ops.global_norm(state)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return OrderedDict((k, v * scale) for k, v in state.items()), norm


def gaussian_like(state: State, std: float, generator: torch.Generator) -> State:
    """N(0, std^2) per entry, drawn in sorted-key order: the same noise whatever order the
    State's keys come in (a State read back from a checkpoint is sorted by name)."""
    drawn = {k: torch.randn(state[k].shape, generator=generator, dtype=torch.float64)
             for k in sorted(state)}
    return OrderedDict((k, (drawn[k] * std).to(v.dtype)) for k, v in state.items())


def noise_generator(seed: int, secure: bool) -> torch.Generator:
    """Seeded from the run (reproducible simulations) or from the OS CSPRNG (deployments)."""
    generator = torch.Generator()
    generator.manual_seed(int.from_bytes(os.urandom(8), "little") if secure else seed)
    return generator


def update_noise_multiplier(z: float, count_noise: float | None) -> float:
    """Andrew et al.'s ``z_delta``: the update's share of a total multiplier ``z``."""
    if count_noise is None or z == 0:
        return z
    inverse = z ** -2 - (2.0 * count_noise) ** -2
    if inverse <= 0:
        raise ValueError(f"privacy.client_dp: noise_multiplier {z:.4g} is too large for the "
                         f"adaptive-clipping count noise {count_noise:.4g} (needs z < "
                         f"2 * count_noise_multiplier)")
    return inverse ** -0.5


class DPClient:
    """Wraps a client half: clip its update (and add a noise share when distributed)."""

    def __init__(self, inner: ClientProcedure, cfg: ClientDPConfig) -> None:
        self.inner = inner
        self.cfg = cfg

    def run(self, ctx: ClientContext, broadcast: Broadcast) -> ClientResult:
        result = self.inner.run(ctx, broadcast)
        settings = broadcast.extras.get(EXTRAS_KEY)
        if settings is None:
            raise ValueError("client_dp: the broadcast carries no clip norm")
        clip_norm = float(settings["clip_norm"])
        payload, norm = clip_to_norm(result.update.payload, clip_norm)
        noise_std = float(settings["noise_std"])
        if noise_std > 0:  # distributed noise: this client's share
            generator = noise_generator(ctx.seed, self.cfg.secure_noise)
            payload = state_ops.add(payload, gaussian_like(payload, noise_std, generator))
        update = result.update
        update.payload = payload
        update.aux[UNCLIPPED_KEY] = OrderedDict(
            unclipped=torch.tensor([1.0 if norm <= clip_norm else 0.0]))
        update.metrics["update_norm_before_clip"] = norm
        return ClientResult(update=update, client_state=result.client_state)


class DPServer:
    """Server half of DP-FedAvg around a server optimizer: clipped sum, noise, fixed
    denominator, optimizer step; adaptive clip norm; one accountant event per round."""

    aggregates_empty_rounds = True  # the noisy release happens even when nobody took part

    def __init__(self, optimizer: Any, cfg: ClientDPConfig, sampling: SamplingModel,
                 noise_multiplier: float, delta: float, seed: int, secure: Any = None) -> None:
        self.optimizer = optimizer
        self.secure = secure  # a SecureSum: the server then sees only sums
        self.cfg = cfg
        self.sampling = sampling
        self.noise_multiplier = noise_multiplier
        self.clip_norm = cfg.clip_norm
        self.seed = seed
        adaptive = cfg.adaptive_clip
        # Andrew et al. suggest m / 20; a small cohort needs more, or the update could not be
        # given a finite share of the budget (z < 2 sigma_b); sigma_b = z costs the update
        # 15% more noise
        self.count_noise = None if adaptive is None else (
            adaptive.count_noise_multiplier
            or max(sampling.sample_size / 20.0, noise_multiplier))
        self.update_noise = update_noise_multiplier(noise_multiplier, self.count_noise)
        self.accountant = ClientLevelAccountant(sampling, delta, cfg.accountant)
        self._last: dict[str, float] = {}

    # ------------------------------------------------------------------ protocol

    def broadcast_extras(self, global_state: State) -> dict[str, State]:
        share = 0.0
        if self.cfg.noise == "distributed":
            share = self.update_noise * self.clip_norm / math.sqrt(self.sampling.sample_size)
        return {EXTRAS_KEY: OrderedDict(
            clip_norm=torch.tensor([self.clip_norm], dtype=torch.float64),
            noise_std=torch.tensor([share], dtype=torch.float64))}

    def check_update(self, update: ClientUpdate, global_state: State) -> None:
        bit = update.aux.get(UNCLIPPED_KEY, {}).get("unclipped")
        if bit is None or bit.numel() != 1 or float(bit) not in (0.0, 1.0):
            raise ValueError("client_dp: the update lacks its adaptive-clipping bit (0 or 1)")
        norm = state_ops.global_norm(update.payload)
        if self.secure is None and self.cfg.noise == "central" and norm > self.clip_norm * (
                1 + 1e-5):
            raise ValueError(f"client_dp: update norm {norm:.6g} exceeds the clip norm "
                             f"{self.clip_norm:.6g}")

    def aggregate(self, global_state: State, updates: list[ClientUpdate], round: int) -> State:
        generator = noise_generator(self.seed * 1_000_003 + round, self.cfg.secure_noise)
        total, unclipped, arrived = self._sum(global_state, updates, round)
        realized = self.update_noise
        if self.cfg.noise == "central":
            total = state_ops.add(total, gaussian_like(total, self.update_noise * self.clip_norm,
                                                        generator))
        else:  # the clients' shares: k of m expected arrived
            realized = self.update_noise * math.sqrt(arrived / self.sampling.sample_size)
        mean = state_ops.scale(total, 1.0 / self.sampling.sample_size)
        clip_used = self.clip_norm
        self._adapt_clip(unclipped, generator)
        self.accountant.record_round(self._accounted_noise(realized))
        self._last = {"epsilon": self.accountant.epsilon(), "delta": self.accountant.delta,
                      "noise_multiplier": self._accounted_noise(realized),
                      "clip_norm": clip_used, "next_clip_norm": self.clip_norm,
                      "clients_aggregated": float(arrived)}
        return self.optimizer.step(global_state, mean)

    def _sum(self, like: State, updates: list[ClientUpdate], round_index: int
             ) -> tuple[State, float, int]:
        """(sum of payloads, number of unclipped clients, clients summed): in the clear, or
        through secure aggregation (the adaptive-clipping bit rides along in the secure sum)."""
        bits = {u.client_id: [float(u.aux[UNCLIPPED_KEY]["unclipped"])] for u in updates}
        if self.secure is not None and updates:
            total, extra, survived = self.secure.sum(
                {u.client_id: u.payload for u in updates}, bits, like, round_index)
            return total, float(extra[0]), len(survived)
        total = state_ops.zeros_like(like)
        for update in updates:
            total = state_ops.add(total, update.payload)
        return total, sum(b[0] for b in bits.values()), len(updates)

    def round_metrics(self) -> dict[str, Any]:
        found: dict[str, Any] = {"privacy": dict(self._last)}
        if self.secure is not None:
            found["secure_aggregation"] = dict(self.secure.last)
            found[WIRE_BYTES] = dict(self.secure.wire)
        return found

    # ------------------------------------------------------------------ parts

    def _accounted_noise(self, update_noise: float) -> float:
        """The single Gaussian multiplier equivalent to this round's releases."""
        if self.count_noise is None or update_noise == 0:
            return update_noise
        return (update_noise ** -2 + (2.0 * self.count_noise) ** -2) ** -0.5

    def _adapt_clip(self, count: float, generator: torch.Generator) -> None:
        adaptive = self.cfg.adaptive_clip
        if adaptive is None or self.count_noise is None:
            return
        noisy = count + float(torch.randn(1, generator=generator, dtype=torch.float64)
                              ) * self.count_noise
        fraction = noisy / self.sampling.sample_size
        self.clip_norm *= math.exp(-adaptive.learning_rate
                                   * (fraction - adaptive.target_quantile))

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, State]:
        return {
            "client_dp": OrderedDict(
                clip_norm=torch.tensor([self.clip_norm], dtype=torch.float64),
                noise_history=torch.tensor(self.accountant.noise_history, dtype=torch.float64)),
            **{f"optimizer.{k}": v for k, v in self.optimizer.state_dict().items()},
        }

    def load_state_dict(self, states: Mapping[str, State]) -> None:
        saved = states.get("client_dp")
        if saved is not None:
            self.clip_norm = float(saved["clip_norm"])
            self.accountant.noise_history = [float(x) for x in saved["noise_history"]]
        prefix = "optimizer."
        self.optimizer.load_state_dict(
            {k[len(prefix):]: v for k, v in states.items() if k.startswith(prefix)})


# --------------------------------------------------------------------------- building


def resolve_noise_multiplier(cfg: ClientDPConfig, sampling: SamplingModel, rounds: int,
                             delta: float) -> float:
    """The configured multiplier, or the one calibrated to ``target_epsilon`` over ``rounds``."""
    from fedfm.trust.privacy.accountant import calibrate_noise_multiplier

    if cfg.noise_multiplier is not None:
        return cfg.noise_multiplier
    assert cfg.target_epsilon is not None
    return calibrate_noise_multiplier(sampling, cfg.target_epsilon, rounds, delta,
                                      cfg.accountant)
