"""FedBABU: federate the body, keep the head at its shared random initialisation.

Oh, Kim & Yun, "FedBABU: Toward Enhanced Representation for Federated Image Classification",
ICLR 2022. Under label skew, most of the harm of local training lands on the classifier head:
each client pulls the class vectors toward its own classes. FedBABU never trains the head
during federation: every client starts from the same random head (the model is built from the
run's seed) and trains only the body (here: the adapter); the head's global tensors stay
bitwise at their initialisation (the server restores them, whatever the server optimizer or
the noise a privacy mechanism adds). The head is fine-tuned at the end: per client with
``eval.finetune_steps`` (the paper's personalization, the personalized metrics), and, with
``head_rounds: k``, federatedly in the last k rounds, where only the head trains and the body
stays fixed, so the global model ends with a trained head.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from fedfm.adaptability.heterogeneity.base import ClientWrapper, LossOnly
from fedfm.adaptability.personalization.heads import head_matcher, trained_only
from fedfm.algorithms.fedavg import DeltaClient
from fedfm.config import ConfigError, RunConfig, SkewConfig
from fedfm.core.algorithm import Algorithm, ClientContext, ClientResult, ServerWrapper
from fedfm.core.registries import SKEW
from fedfm.core.registry import MethodInfo
from fedfm.core.state import State
from fedfm.core.update import Broadcast, ClientUpdate


def head_phase(round: int, rounds: int, head_rounds: int) -> bool:
    """Whether ``round`` (1-based) is one of the last ``head_rounds`` of ``rounds``."""
    return round > rounds - head_rounds


class BabuClient(ClientWrapper):
    """Trains the body with the head frozen (the head alone in the head rounds)."""

    def __init__(self, inner: DeltaClient, is_head: Callable[[str], bool], rounds: int,
                 head_rounds: int) -> None:
        super().__init__(inner)
        self.is_head = is_head
        self.rounds = rounds
        self.head_rounds = head_rounds

    def prepare_model(self, bundle: Any, config: RunConfig) -> Any:
        """Refuse a model whose trainable tensors hold no head, or nothing but the head."""
        from fedfm.models import trainable_names

        prepare = getattr(self.inner, "prepare_model", None)
        if prepare is not None:
            bundle = prepare(bundle, config)
        names = trainable_names(bundle.model)
        heads = [n for n in names if self.is_head(n)]
        if not heads or len(heads) == len(names):
            what = "no head tensor" if not heads else "only head tensors"
            raise ConfigError(f"invalid config: algorithm.skew 'fedbabu' freezes the head and "
                              f"trains the body, but the trainable tensors hold {what} (set "
                              f"adapter.train_head: true, or algorithm.skew[].head)")
        return bundle

    def run(self, ctx: ClientContext, broadcast: Broadcast) -> ClientResult:
        names = list(broadcast.global_state)
        heads = {n for n in names if self.is_head(n)}
        trained = (heads if head_phase(ctx.round, self.rounds, self.head_rounds)
                   else set(names) - heads)
        with trained_only(ctx.model, trained):
            result = self.inner.train(ctx, broadcast)
        return self.inner.finish(ctx, broadcast, result)


class BabuServer(ServerWrapper):
    """The inner rule's next State with the frozen part (the head; the body in head rounds)
    copied back from the current global State, so it never moves."""

    def __init__(self, inner: Any, is_head: Callable[[str], bool], rounds: int,
                 head_rounds: int) -> None:
        super().__init__(inner)
        self.is_head = is_head
        self.rounds = rounds
        self.head_rounds = head_rounds

    def aggregate(self, global_state: State, updates: list[ClientUpdate], round: int) -> State:
        proposed = self.inner.aggregate(global_state, updates, round)
        head_trains = head_phase(round, self.rounds, self.head_rounds)
        return OrderedDict(
            (k, global_state[k] if self.is_head(k) != head_trains else v)
            for k, v in proposed.items())


@SKEW.register("fedbabu", MethodInfo(
    "adaptability.heterogeneity",
    "FedBABU: Toward Enhanced Representation for Federated Image Classification "
    "(Oh et al., ICLR 2022)",
    "algorithm: {skew: [{name: fedbabu, head_rounds: 0}]}\neval: {finetune_steps: 10}",
    "head frozen at its shared random init during federation, fine-tuned at the end"))
class FedBABU(LossOnly):
    name = "fedbabu"

    def __init__(self, cfg: SkewConfig, config: RunConfig) -> None:
        self.is_head = head_matcher(cfg.head)
        self.rounds = config.federation.rounds
        self.head_rounds = cfg.head_rounds

    @staticmethod
    def check(cfg: SkewConfig, config: RunConfig) -> None:
        from fedfm.adaptability.heterogeneity.base import DELTA_ALGORITHMS

        if config.algorithm.name not in DELTA_ALGORITHMS:
            raise ConfigError(f"invalid config: algorithm.skew 'fedbabu' chooses which "
                              f"tensors a client trains, which needs a plain client half "
                              f"({', '.join(DELTA_ALGORITHMS)}); algorithm "
                              f"{config.algorithm.name!r} has its own")
        if cfg.head_rounds >= config.federation.rounds:
            raise ConfigError(f"invalid config: algorithm.skew 'fedbabu': head_rounds "
                              f"({cfg.head_rounds}) must be fewer than federation.rounds "
                              f"({config.federation.rounds}): the body trains in the others")

    def apply(self, algorithm: Algorithm) -> Algorithm:
        if not isinstance(algorithm.client, DeltaClient):
            raise ConfigError("invalid config: algorithm.skew 'fedbabu' needs a plain client "
                              "half (fedavg, fedprox, scaffold)")
        client = BabuClient(algorithm.client, self.is_head, self.rounds, self.head_rounds)
        server = BabuServer(algorithm.server, self.is_head, self.rounds, self.head_rounds)
        return dataclasses.replace(algorithm, client=client, server=server)
