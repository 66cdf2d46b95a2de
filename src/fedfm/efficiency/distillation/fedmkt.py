"""FedMKT: mutual knowledge transfer between a server-side large model and clients' small ones.

Fan, Ma, Yang, Yang, Kang, Song, Chen & Yang, "FedMKT: Federated Mutual Knowledge Transfer for
Large and Small Language Models", arXiv 2024 (COLING 2025). Clients fine-tune the small model
(its adapter is the communicated State, FedAvg'd); the server also holds a large model
(``distill.server_model``, with its own adapter). Knowledge moves both ways through logits on
the unlabeled public data: small -> large, the server distils the round's client ensemble into
the large model (``distill.server_steps`` Adam steps); large -> small, the large model's logits
on the public data are broadcast and each client trains on its own loss plus
``distill.client_weight`` times the distillation loss towards them (one public batch per local
step), as FedMKT's clients do, so the private labels keep anchoring the small model while it
learns from the large one. The first round has no teacher yet (the large model has learnt
nothing), and its clients train as in FedAvg.

Knowledge crosses between the models as logits, so they must agree on what a logit is:
classification logits are over the run's label set whatever each tokenizer does (each model
reads the public texts with its own tokenizer); token-level (causal LM) logits are compared
position by position and vocabulary entry by entry, which needs the same vocabulary. FedMKT
aligns differing vocabularies by minimum edit distance between the two tokenizations; fedfm
does not implement that alignment and refuses causal-LM pairs whose vocabularies differ, with
the reason.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

from fedfm.algorithms.fedavg import DeltaClient, build_delta_server
from fedfm.algorithms.local_train import train_locally
from fedfm.config import AlgorithmConfig, ConfigError, DistillConfig, LocalTrainingConfig
from fedfm.core.algorithm import (
    Algorithm,
    ClientContext,
    ClientResult,
    ServerRule,
    ServerWrapper,
)
from fedfm.core.registries import ALGORITHMS
from fedfm.core.registry import MethodInfo
from fedfm.core.state import State
from fedfm.core.update import Broadcast, ClientUpdate
from fedfm.efficiency.distillation.feddf import (
    client_models,
    workload_view,
)
from fedfm.efficiency.distillation.kd import (
    Batch,
    ModelView,
    distill,
    ensemble_logits,
    kd_loss,
)
from fedfm.efficiency.distillation.public import (
    load_public_texts,
    public_batches,
    tokenize_public,
)
from fedfm.models.fused_loss import standard_loss

STATE_KEY = "fedmkt_server_model"  # the large model's adapter, in the server's checkpoint
EXTRAS_KEY = "fedmkt_teacher"  # broadcast: the large model's logits per public batch
_SEED_STREAM = 104723


def check_vocabularies(small: Any, large: Any, task: str) -> None:
    """Token-level logits need one vocabulary; label logits need nothing of the tokenizers."""
    if task != "causal_lm":
        return
    if small.get_vocab() != large.get_vocab():
        raise ConfigError(
            f"invalid config: algorithm 'fedmkt' distils token-level logits between the "
            f"clients' model and algorithm.distill.server_model, whose vocabularies differ "
            f"({len(small.get_vocab())} vs {len(large.get_vocab())} tokens); aligning them "
            f"(FedMKT's minimum-edit-distance token alignment) is not implemented: use a server "
            f"model with the clients' tokenizer, or a classification task, whose logits are over "
            f"the shared label set")


class ServerModel:
    """The large model at the server: loaded once, with its adapter and its tokenization of
    the public set."""

    def __init__(self, workload: Any, cfg: DistillConfig) -> None:
        from fedfm.models import apply_adapter, get_state, load_model, set_state

        assert cfg.server_model is not None
        config = workload.config
        bundle = load_model(cfg.server_model, seed=config.seed,
                            num_labels=workload.data.num_labels)
        if bundle.task != workload.bundle.task:
            raise ConfigError(f"invalid config: algorithm.distill.server_model is a "
                              f"{bundle.task} model, the clients' is {workload.bundle.task}")
        check_vocabularies(workload.bundle.tokenizer, bundle.tokenizer, bundle.task)
        bundle = apply_adapter(bundle, cfg.server_adapter or config.adapter, seed=config.seed)
        self.model = bundle.model.to(workload.device)
        self.get_state = lambda: get_state(self.model)
        self.view = ModelView(self.model, workload.device, workload.autocast_dtype,
                              lambda state: set_state(self.model, state))
        pad = bundle.tokenizer.pad_token_id
        rows = tokenize_public(load_public_texts(cfg.public, config.data), bundle.tokenizer,
                               task=bundle.task, max_length=config.model.max_length)
        self.batches = public_batches(rows, cfg.batch_size, int(pad if pad is not None else 0))
        self.same_tokens = workload.bundle.tokenizer.get_vocab() == bundle.tokenizer.get_vocab()


class FedMKTClient:
    """FedAvg's local training on ``loss + client_weight * KD(teacher)``, the teacher being the
    large model's broadcast logits on the public batches."""

    def __init__(self, local: LocalTrainingConfig, cfg: DistillConfig) -> None:
        self.delta = DeltaClient(local)
        self.local = local
        self.cfg = cfg
        self.batches: list[Batch] = []

    def bind(self, batches: list[Batch]) -> None:
        self.batches = batches

    def run(self, ctx: ClientContext, broadcast: Broadcast) -> ClientResult:
        teacher = broadcast.extras.get(EXTRAS_KEY)
        kd = None
        if teacher and self.cfg.client_weight > 0:
            kd = TeacherLoss(self.batches, teacher, ctx, self.cfg)
            ctx = dataclasses.replace(ctx, loss_fn=kd.loss)
        result = self.delta.finish(ctx, broadcast, train_locally(ctx, self.local))
        if kd is not None:
            result.update.metrics["kd_loss"] = kd.mean()
        return result


class TeacherLoss:
    """The client's loss plus the weighted distillation loss on the next public batch."""

    def __init__(self, batches: list[Batch], teacher: State, ctx: ClientContext,
                 cfg: DistillConfig) -> None:
        if len(teacher) != len(batches):
            raise ValueError(f"fedmkt: the broadcast holds {len(teacher)} teacher batches, the "
                             f"client's public data {len(batches)}")
        self.batches = batches
        self.teacher = [teacher[teacher_key(i)] for i in range(len(batches))]
        self.base = ctx.loss_fn or standard_loss
        self.device = ctx.device
        self.cfg = cfg
        self.calls = 0
        self.total = 0.0

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        index = self.calls % len(self.batches)
        self.calls += 1
        public = {k: v.to(self.device) for k, v in self.batches[index].items()}
        student = model(**public).logits.float()
        kd = kd_loss(student, self.teacher[index].to(self.device), public["attention_mask"],
                     self.cfg.temperature)
        self.total += float(kd.detach())
        return self.base(model, batch) + self.cfg.client_weight * kd

    def mean(self) -> float:
        return self.total / max(self.calls, 1)


def teacher_key(index: int) -> str:
    return f"batch_{index}"


class FedMKTServer(ServerWrapper):
    """Aggregate as the inner rule does; distil the clients' ensemble into the large model and
    broadcast the large model's logits on the public data."""

    def __init__(self, inner: ServerRule, client: FedMKTClient, cfg: DistillConfig) -> None:
        super().__init__(inner)
        self.client = client
        self.cfg = cfg
        self.small: ModelView | None = None
        self.large: ServerModel | None = None
        self.batches: list[Batch] = []
        self.workload: Any = None
        self.seed = 0
        self.teacher: State = OrderedDict()
        self.last: dict[str, Any] = {}

    def bind_workload(self, workload: Any) -> None:
        from fedfm.efficiency.distillation.feddf import workload_public_batches

        self.workload = workload
        self.small = workload_view(workload)
        self.batches = workload_public_batches(workload, self.cfg)
        self.client.bind(self.batches)
        self.large = ServerModel(workload, self.cfg)
        self.seed = int(workload.config.seed)

    def _bound(self) -> tuple[ModelView, ServerModel]:
        if self.small is None or self.large is None:
            raise RuntimeError("fedmkt: the server rule was never bound to a workload")
        return self.small, self.large

    def broadcast_extras(self, global_state: State) -> dict[str, State]:
        extras = dict(self.inner.broadcast_extras(global_state))
        if self.teacher:
            extras[EXTRAS_KEY] = self.teacher
        return extras

    def aggregate(self, global_state: State, updates: list[ClientUpdate], round: int) -> State:
        aggregated = self.inner.aggregate(global_state, updates, round)
        small, large = self._bound()
        ensemble = ensemble_logits(small, client_models(global_state, updates), self.batches)
        to_large = distill(large.view, large.batches, ensemble,
                           steps=self.cfg.server_steps or self.cfg.steps, lr=self.cfg.lr,
                           temperature=self.cfg.temperature,
                           seed=self.seed * _SEED_STREAM + round)
        self.teacher = self._teacher()
        self.last = {"small_to_large": to_large, **self._server_model_metrics()}
        return aggregated

    def _teacher(self) -> State:
        """The large model's logits on the public batches, as the clients will read them
        (token-level logits travel as bfloat16, label logits as float32)."""
        _, large = self._bound()
        logits = ensemble_logits(large.view, [large.get_state()], large.batches)
        return OrderedDict((teacher_key(i), value.contiguous()) for i, value in enumerate(logits))

    def _server_model_metrics(self) -> dict[str, Any]:
        """The large model on the global validation set, when it reads the clients'
        tokenization (the validation examples are tokenized by the clients' tokenizer)."""
        small, large = self._bound()
        if not large.same_tokens or self.workload is None:
            return {}
        from fedfm.eval import evaluate_examples

        workload = self.workload
        eval_cfg = workload.config.eval
        examples = workload.data.global_validation[: eval_cfg.max_examples]
        if not examples:
            return {}
        metrics = evaluate_examples(large.model, examples, task=workload.bundle.task,
                                    collate_fn=workload.collate_fn(),
                                    batch_size=eval_cfg.batch_size, device=workload.device,
                                    autocast_dtype=workload.autocast_dtype,
                                    num_labels=workload.bundle.num_labels)
        return {"server_model": metrics}

    def round_metrics(self) -> dict[str, Any]:
        inner = getattr(self.inner, "round_metrics", None)
        return {**(dict(inner()) if inner is not None else {}), "distill": dict(self.last)}

    def state_dict(self) -> dict[str, State]:
        _, large = self._bound()
        return {**self.inner.state_dict(), STATE_KEY: OrderedDict(large.get_state())}

    def load_state_dict(self, states: Mapping[str, State]) -> None:
        self.inner.load_state_dict({k: v for k, v in states.items() if k != STATE_KEY})
        if STATE_KEY in states:
            _, large = self._bound()
            large.view.set_state(states[STATE_KEY])
            self.teacher = self._teacher()


@ALGORITHMS.register("fedmkt", MethodInfo(
    "efficiency.distillation",
    "FedMKT: Federated Mutual Knowledge Transfer for Large and Small Language Models (Fan et "
    "al., arXiv 2024)",
    "algorithm: {name: fedmkt, distill: {public: {path: public.jsonl}, server_model: {name: "
    "minilm}}}",
    "clients train a small model; the server's large model and the small one teach each other "
    "through logits on public data"))
def build_fedmkt(cfg: AlgorithmConfig, num_clients: int) -> Algorithm:
    if cfg.distill is None or cfg.distill.server_model is None:
        raise ValueError("algorithm 'fedmkt' needs algorithm.distill.server_model")
    client = FedMKTClient(cfg.local, cfg.distill)
    return Algorithm(name="fedmkt", client=client,
                     server=FedMKTServer(build_delta_server(cfg), client, cfg.distill),
                     info={"distill_steps": cfg.distill.steps})
