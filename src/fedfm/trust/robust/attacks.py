"""Simulated Byzantine clients (``robustness.attack``): which clients are malicious, what their
updates become, and the server wrapper that plays them each round.

A fixed share of all clients (drawn from the run's seed) is malicious. Every client first trains
honestly on its own data (poisoned data for the data-poisoning attacks); the wrapper then
replaces the malicious clients' updates before aggregation. Model-poisoning attacks are
omniscient, as their papers assume: they see every honestly trained update of the round (the
malicious clients' own included) as flattened payload rows.

* ``sign_flip``: each malicious client sends the negative of its honest update.
* ``gaussian``: each sends i.i.d. ``N(0, noise_std^2)`` coordinates.
* ``scaling``: model replacement (Bagdasaryan, Veit, Hua, Estrin & Shmatikov, "How To Backdoor
  Federated Learning", AISTATS 2020): trains on backdoored data and boosts its update by
  ``gamma`` (default: the number of clients in the round, so that it replaces the average).
* ``alie``: "A Little Is Enough" (Baruch, Baruch & Goldberg, NeurIPS 2019): ``mu - z sigma``
  per coordinate, ``z_max = Phi^-1((n - s) / n)``, ``s = floor(n / 2 + 1) - f``.
* ``ipm``: inner product manipulation (Xie, Koyejo & Gupta, "Fall of Empires: Breaking
  Byzantine-tolerant SGD by Inner Product Manipulation", UAI 2019): ``-epsilon mu``.
* ``min_max`` / ``min_sum`` (Shejwalkar & Houmansadr, NDSS 2021): ``mu + gamma p`` with the
  largest ``gamma`` (their halving search) whose maximum (min-max) or summed squared (min-sum)
  distance to the benign updates stays within the benign updates' own.

Data poisoning (``label_flip``, ``backdoor``) lives in ``poisoning``.
"""

from __future__ import annotations

import math
from dataclasses import replace
from statistics import NormalDist
from typing import Any

import numpy as np
import torch

from fedfm.config import AttackConfig
from fedfm.core.algorithm import ServerWrapper
from fedfm.core.registries import POISONING
from fedfm.core.registry import MethodInfo
from fedfm.core.state import State, flatten, global_norm, sub, unflatten
from fedfm.core.update import ClientUpdate

LEAF = "trust.robustness.attacks"
SHEJWALKAR = ("Manipulating the Byzantine: Optimizing Model Poisoning Attacks and Defenses for "
              "Federated Learning (Shejwalkar & Houmansadr, NDSS 2021)")


def malicious_clients(num_clients: int, fraction: float, seed: int) -> list[int]:
    """The fixed malicious set: ``max(1, floor(fraction * num_clients))`` clients."""
    count = max(1, int(math.floor(fraction * num_clients + 1e-9)))
    order = np.random.default_rng([seed, 6007]).permutation(num_clients)
    return sorted(int(c) for c in order[:count])


class PoisoningAttack:
    """Base: data poisoning leaves updates alone; model poisoning overrides ``craft``."""

    poisons_data = False  # the malicious clients train on poisoned data
    backdoor = False  # ... and the poison is a trigger (attack success rate is measured)

    def __init__(self, cfg: AttackConfig) -> None:
        self.cfg = cfg

    def craft(self, honest: torch.Tensor, malicious: list[int],
              generator: torch.Generator) -> torch.Tensor:
        """Rows for the ``malicious`` indices of ``honest`` ([n, d], every honest update of
        the round): ``[len(malicious), d]``."""
        return honest[malicious]


def _register(name: str, paper: str, snippet: str, summary: str):
    return POISONING.register(name, MethodInfo(LEAF, paper, snippet, summary))


@_register("label_flip", "Poisoning Attacks against Support Vector Machines (Biggio et al., "
           "ICML 2012); as benchmarked by blades (Li et al., 2023)",
           "robustness: {attack: {kind: label_flip, fraction: 0.2}}",
           "malicious clients train with class c relabelled C - 1 - c")
class LabelFlip(PoisoningAttack):
    poisons_data = True


@_register("backdoor", "How To Backdoor Federated Learning (Bagdasaryan et al., AISTATS 2020)",
           "robustness: {attack: {kind: backdoor, trigger: 'cf mn bb', target_label: 0}}",
           "a trigger phrase in a share of malicious examples maps to the attacker's label or "
           "response")
class Backdoor(PoisoningAttack):
    poisons_data = True
    backdoor = True


@_register("scaling", "How To Backdoor Federated Learning (Bagdasaryan et al., AISTATS 2020)",
           "robustness: {attack: {kind: scaling, scale: null}}",
           "model replacement: a backdoored update boosted by the number of clients")
class Scaling(PoisoningAttack):
    poisons_data = True
    backdoor = True

    def craft(self, honest: torch.Tensor, malicious: list[int],
              generator: torch.Generator) -> torch.Tensor:
        gamma = self.cfg.scale if self.cfg.scale is not None else float(honest.shape[0])
        return honest[malicious] * gamma


@_register("sign_flip", "Fall of Empires (Xie et al., UAI 2019), sign flipping as benchmarked "
           "by blades (Li et al., 2023)",
           "robustness: {attack: {kind: sign_flip}}",
           "malicious clients send the negative of their honest update")
class SignFlip(PoisoningAttack):
    def craft(self, honest: torch.Tensor, malicious: list[int],
              generator: torch.Generator) -> torch.Tensor:
        return -honest[malicious]


@_register("gaussian", "Machine Learning with Adversaries (Blanchard et al., NeurIPS 2017), "
           "Gaussian Byzantine workers",
           "robustness: {attack: {kind: gaussian, noise_std: 1.0}}",
           "malicious clients send i.i.d. Gaussian noise")
class Gaussian(PoisoningAttack):
    def craft(self, honest: torch.Tensor, malicious: list[int],
              generator: torch.Generator) -> torch.Tensor:
        shape = (len(malicious), honest.shape[1])
        return torch.randn(shape, generator=generator, dtype=torch.float64) * self.cfg.noise_std


def alie_z(n: int, f: int) -> float:
    """Baruch et al.'s ``z_max``: ``s = floor(n / 2 + 1) - f`` supporters are needed, and
    ``Phi(z) < (n - s) / n`` keeps the fake update closer to the mean than them."""
    supporters = math.floor(n / 2 + 1) - f
    share = (n - supporters) / n
    return NormalDist().inv_cdf(min(max(share, 1e-12), 1 - 1e-12))


@_register("alie", "A Little Is Enough: Circumventing Defenses For Distributed Learning "
           "(Baruch et al., NeurIPS 2019)",
           "robustness: {attack: {kind: alie, alie_z: null}}",
           "mean minus z standard deviations per coordinate, z from (n, f)")
class ALIE(PoisoningAttack):
    def craft(self, honest: torch.Tensor, malicious: list[int],
              generator: torch.Generator) -> torch.Tensor:
        n = honest.shape[0]
        z = self.cfg.alie_z if self.cfg.alie_z is not None else alie_z(n, len(malicious))
        fake = honest.mean(dim=0) - z * honest.std(dim=0, unbiased=True)
        return fake.expand(len(malicious), -1).clone()


@_register("ipm", "Fall of Empires: Breaking Byzantine-tolerant SGD by Inner Product "
           "Manipulation (Xie et al., UAI 2019)",
           "robustness: {attack: {kind: ipm, ipm_epsilon: 0.1}}",
           "malicious clients send -epsilon times the mean of the honest updates")
class IPM(PoisoningAttack):
    def craft(self, honest: torch.Tensor, malicious: list[int],
              generator: torch.Generator) -> torch.Tensor:
        fake = -self.cfg.ipm_epsilon * honest.mean(dim=0)
        return fake.expand(len(malicious), -1).clone()


def perturbation(honest: torch.Tensor, kind: str) -> torch.Tensor:
    mean = honest.mean(dim=0)
    if kind == "unit_vector":
        return -mean / mean.norm().clamp(min=1e-300)
    if kind == "std":
        return -honest.std(dim=0, unbiased=True)
    return -torch.sign(mean)


def optimise_gamma(honest: torch.Tensor, direction: torch.Tensor, objective: str, *,
                   gamma_init: float = 10.0, tol: float = 1e-5) -> float:
    """The largest ``gamma`` (Shejwalkar & Houmansadr's halving search from ``gamma_init``)
    for which ``mu + gamma p`` keeps the min-max or min-sum condition."""
    mean = honest.mean(dim=0)
    distances = torch.cdist(honest, honest, compute_mode="donot_use_mm_for_euclid_dist")
    if objective == "min_max":
        limit = float(distances.max())
    else:
        limit = float(distances.pow(2).sum(dim=1).max())

    def keeps(gamma: float) -> bool:
        gaps = (honest - (mean + gamma * direction)).norm(dim=1)
        found = float(gaps.max()) if objective == "min_max" else float(gaps.pow(2).sum())
        return found <= limit

    # the first step is gamma_init itself, so the search can fall all the way to 0
    gamma, step, best = gamma_init, gamma_init, 0.0
    for _ in range(200):  # the step halves: converged long before
        if abs(best - gamma) <= tol:
            break
        if keeps(gamma):
            best = gamma
            gamma += step / 2
        else:
            gamma -= step / 2
        step /= 2
    return best


class _Optimised(PoisoningAttack):
    objective = "min_max"

    def craft(self, honest: torch.Tensor, malicious: list[int],
              generator: torch.Generator) -> torch.Tensor:
        direction = perturbation(honest, self.cfg.perturbation)
        gamma = optimise_gamma(honest, direction, self.objective)
        fake = honest.mean(dim=0) + gamma * direction
        return fake.expand(len(malicious), -1).clone()


@_register("min_max", SHEJWALKAR, "robustness: {attack: {kind: min_max, perturbation: std}}",
           "mean plus the largest perturbation whose farthest distance to an honest update "
           "stays within the honest updates' own")
class MinMax(_Optimised):
    objective = "min_max"


@_register("min_sum", SHEJWALKAR, "robustness: {attack: {kind: min_sum, perturbation: std}}",
           "mean plus the largest perturbation whose summed squared distance to the honest "
           "updates stays within any honest update's")
class MinSum(_Optimised):
    objective = "min_sum"


def build_attack(cfg: AttackConfig) -> PoisoningAttack:
    return POISONING.get(cfg.kind)(cfg)


class ByzantineServer(ServerWrapper):
    """Wraps a server rule: before aggregation, the malicious clients' updates are replaced by
    the attack's, screened like any update (``check_update``), and the round's detection
    (precision / recall of the clients the aggregator left out) is reported."""

    def __init__(self, inner: Any, attack: PoisoningAttack, malicious: list[int],
                 seed: int) -> None:
        super().__init__(inner)
        self.attack = attack
        self.malicious = set(malicious)
        self.seed = seed
        self._last: dict[str, Any] = {}

    def check_update(self, update: ClientUpdate, global_state: State) -> None:
        check = getattr(self.inner, "check_update", None)
        if check is not None:
            check(update, global_state)

    def aggregate(self, global_state: State, updates: list[ClientUpdate], round: int) -> State:
        crafted, rejected = self._poison(global_state, updates, round)
        new_global = self.inner.aggregate(global_state, crafted, round)
        present = sorted(u.client_id for u in crafted if u.client_id in self.malicious)
        self._last = {"kind": self.attack.cfg.kind, "malicious": present,
                      "rejected_at_screening": rejected,
                      # what the server really applied (the record's update_norm is the honest
                      # updates' mean)
                      "applied_update_norm": global_norm(sub(new_global, global_state))}
        self._last.update(detection(self._flagged(), present, [u.client_id for u in crafted]))
        return new_global

    def _poison(self, global_state: State, updates: list[ClientUpdate], round_index: int
                ) -> tuple[list[ClientUpdate], list[int]]:
        bad = [i for i, u in enumerate(updates) if u.client_id in self.malicious]
        if not bad or type(self.attack).craft is PoisoningAttack.craft:
            return list(updates), []
        keys = sorted(updates[0].payload)
        honest = torch.stack([flatten(u.payload, keys) for u in updates])
        generator = torch.Generator().manual_seed(self.seed * 1000003 + round_index)
        fakes = self.attack.craft(honest, bad, generator)
        out: list[ClientUpdate] = []
        rejected: list[int] = []
        fake_of = dict(zip(bad, fakes, strict=True))
        for index, update in enumerate(updates):
            if index not in fake_of:
                out.append(update)
                continue
            payload = unflatten(fake_of[index], update.payload, keys)
            forged = replace(update, payload=payload)
            try:
                self.check_update(forged, global_state)
            except (ValueError, TypeError, KeyError):
                rejected.append(update.client_id)
                continue
            out.append(forged)
        return out, rejected

    def _flagged(self) -> list[int] | None:
        return getattr(server_aggregator(self.inner), "last_flagged", None)

    def round_metrics(self) -> dict[str, Any]:
        inner = getattr(self.inner, "round_metrics", None)
        found = dict(inner()) if inner is not None else {}
        found["attack"] = dict(self._last)
        return found


def server_aggregator(server: Any) -> Any:
    """The aggregator inside a server rule (through attack wrappers and SCAFFOLD's model
    server), or None."""
    while isinstance(server, ByzantineServer):
        server = server.inner
    found = getattr(server, "aggregator", None)
    if found is None:
        found = getattr(getattr(server, "model_server", None), "aggregator", None)
    return found


def detection(flagged: list[int] | None, malicious: list[int], present: list[int]
              ) -> dict[str, float]:
    """Precision and recall of the flagged clients as a detector of the malicious ones (only
    for aggregators that leave clients out)."""
    if flagged is None:
        return {}
    caught = len(set(flagged) & set(malicious))
    return {"flagged": float(len(flagged)),
            "detection_precision": caught / len(flagged) if flagged else 1.0,
            "detection_recall": caught / len(malicious) if malicious else 1.0,
            "benign_excluded": float(len(set(flagged) - set(malicious))),
            "clients": float(len(present))}
