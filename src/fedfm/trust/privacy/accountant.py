"""Privacy accounting for client-level DP, on Google's ``dp-accounting`` library.

Each round is one sampled Gaussian mechanism over clients:

* ``poisson`` sampling (each client joins independently with probability ``q``):
  ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` under add/remove-one-client adjacency, with the
  RDP accountant (Mironov et al., 2019) or the PLD accountant (connect-the-dots; Doroshenko et
  al., PETS 2022).
* ``fixed`` sampling (exactly ``m`` of ``n`` clients, without replacement):
  ``SampledWithoutReplacementDpEvent(n, m, GaussianDpEvent(z / 2))`` under replace-one adjacency
  (Wang, Balle & Kasiviswanathan, AISTATS 2019). Replacing one client moves the sum of clipped
  updates by up to twice the clip norm, so the noise-to-sensitivity ratio is ``z / 2``.

Rounds are composed one by one with the noise multiplier each round actually had (distributed
noise shrinks when clients drop out), so the reported epsilon is that of the run as it happened.
This module is written here rather than taken whole from a library only in the thin part that maps
fedfm's rounds to dp-accounting events; every epsilon comes from dp-accounting itself.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import dp_accounting
from dp_accounting import pld, rdp

Sampling = Literal["poisson", "fixed"]
AccountantKind = Literal["rdp", "pld"]
# extends dp-accounting's default RDP orders upwards, for small epsilons over many rounds
RDP_ORDERS = ([1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64))
              + [64, 80, 96, 128, 192, 256, 384, 512, 1024])


@dataclass(frozen=True)
class SamplingModel:
    """How clients are sampled each round: ``num_clients`` in all, ``sample_size`` expected."""

    kind: Sampling
    num_clients: int
    sample_size: int

    @property
    def rate(self) -> float:
        return self.sample_size / self.num_clients

    def event(self, noise_multiplier: float) -> dp_accounting.DpEvent:
        if noise_multiplier <= 0:
            return dp_accounting.NonPrivateDpEvent()
        if self.kind == "poisson":
            return dp_accounting.PoissonSampledDpEvent(
                self.rate, dp_accounting.GaussianDpEvent(noise_multiplier))
        return dp_accounting.SampledWithoutReplacementDpEvent(
            self.num_clients, self.sample_size,
            dp_accounting.GaussianDpEvent(noise_multiplier / 2.0))


def make_accountant(kind: AccountantKind, sampling: Sampling) -> dp_accounting.PrivacyAccountant:
    relation = (dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE if sampling == "poisson"
                else dp_accounting.NeighboringRelation.REPLACE_ONE)
    if kind == "pld":
        return pld.PLDAccountant(neighboring_relation=relation)
    return rdp.RdpAccountant(orders=RDP_ORDERS, neighboring_relation=relation)


@dataclass
class ClientLevelAccountant:
    """Epsilon of the rounds run so far; rebuilt exactly from ``noise_history`` on resume."""

    sampling: SamplingModel
    delta: float
    kind: AccountantKind = "rdp"
    noise_history: list[float] = field(default_factory=list)

    def record_round(self, noise_multiplier: float) -> None:
        self.noise_history.append(float(noise_multiplier))

    def epsilon(self) -> float:
        if not self.noise_history:
            return 0.0
        if any(z <= 0 for z in self.noise_history):
            return math.inf
        accountant = make_accountant(self.kind, self.sampling.kind)
        with quiet_absl():
            for noise, count in _runs(self.noise_history):
                accountant.compose(self.sampling.event(noise), count)
            return float(accountant.get_epsilon(self.delta))


@contextlib.contextmanager
def quiet_absl() -> Iterator[None]:
    """dp-accounting logs a warning for every RDP order whose series does not converge (the
    order is then left out, which only makes epsilon conservative); keep runs' logs readable."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _runs(values: list[float]) -> list[tuple[float, int]]:
    """Consecutive equal values as (value, count): one self-composed event per run."""
    runs: list[tuple[float, int]] = []
    for value in values:
        if runs and runs[-1][0] == value:
            runs[-1] = (value, runs[-1][1] + 1)
        else:
            runs.append((value, 1))
    return runs


def epsilon_for(sampling: SamplingModel, noise_multiplier: float, rounds: int, delta: float,
                kind: AccountantKind = "rdp") -> float:
    accountant = ClientLevelAccountant(sampling, delta, kind, [noise_multiplier] * rounds)
    return accountant.epsilon()


def calibrate_noise_multiplier(sampling: SamplingModel, target_epsilon: float, rounds: int,
                               delta: float, kind: AccountantKind = "rdp") -> float:
    """The smallest noise multiplier whose ``rounds`` rounds stay within ``target_epsilon``
    (dp-accounting's ``calibrate_dp_mechanism``: bracketing, then bisection)."""
    def make_event(noise: float) -> dp_accounting.DpEvent:
        return dp_accounting.SelfComposedDpEvent(sampling.event(noise), rounds)

    with quiet_absl():
        return float(dp_accounting.calibrate_dp_mechanism(
            lambda: make_accountant(kind, sampling.kind), make_event, target_epsilon, delta,
            dp_accounting.ExplicitBracketInterval(1e-3, 1e3), tol=1e-4))


def default_delta(num_clients: int) -> float:
    """``1 / n^1.1``: below 1/n, as McMahan et al. (ICLR 2018) choose it."""
    return 1.0 / num_clients ** 1.1
