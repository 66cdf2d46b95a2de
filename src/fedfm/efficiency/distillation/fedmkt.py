"""FedMKT: mutual knowledge transfer between a server-side large model and clients' small ones.

Fan, Ma, Yang, Yang, Kang, Song, Chen & Yang, "FedMKT: Federated Mutual Knowledge Transfer for
Large and Small Language Models", arXiv 2024 (COLING 2025). Clients fine-tune the small model
(its adapter is the communicated State, FedAvg'd); the server also holds a large model
(``distill.server_model``, with its own adapter). Each round, on the unlabeled public data, the
clients' ensemble teaches the large model (small -> large), then the large model teaches the
aggregated small model (large -> small), both through temperature-softened logits.

Knowledge crosses between the models as logits, so they must agree on what a logit is:
classification logits are over the run's label set whatever each tokenizer does (each model
reads the public texts with its own tokenizer); token-level (causal LM) logits are compared
position by position and vocabulary entry by entry, which needs the same vocabulary. FedMKT
aligns differing vocabularies by minimum edit distance between the two tokenizations; fedfm
does not implement that alignment and refuses causal-LM pairs whose vocabularies differ, with
the reason.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from fedfm.algorithms.fedavg import DeltaClient, build_delta_server
from fedfm.config import AlgorithmConfig, ConfigError, DistillConfig
from fedfm.core.algorithm import Algorithm, ServerRule, ServerWrapper
from fedfm.core.registries import ALGORITHMS
from fedfm.core.registry import MethodInfo
from fedfm.core.state import State
from fedfm.core.update import ClientUpdate
from fedfm.efficiency.distillation.feddf import (
    client_models,
    trained_state,
    workload_view,
)
from fedfm.efficiency.distillation.kd import Batch, ModelView, distill, ensemble_logits
from fedfm.efficiency.distillation.public import (
    load_public_texts,
    public_batches,
    tokenize_public,
)

STATE_KEY = "fedmkt_server_model"  # the large model's adapter, in the server's checkpoint
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


class FedMKTServer(ServerWrapper):
    """Aggregate, then small -> large and large -> small distillation on the public data."""

    def __init__(self, inner: ServerRule, cfg: DistillConfig) -> None:
        super().__init__(inner)
        self.cfg = cfg
        self.small: ModelView | None = None
        self.large: ServerModel | None = None
        self.batches: list[Batch] = []
        self.workload: Any = None
        self.seed = 0
        self.last: dict[str, Any] = {}

    def bind_workload(self, workload: Any) -> None:
        from fedfm.efficiency.distillation.feddf import workload_public_batches

        self.workload = workload
        self.small = workload_view(workload)
        self.batches = workload_public_batches(workload, self.cfg)
        self.large = ServerModel(workload, self.cfg)
        self.seed = int(workload.config.seed)

    def _bound(self) -> tuple[ModelView, ServerModel]:
        if self.small is None or self.large is None:
            raise RuntimeError("fedmkt: the server rule was never bound to a workload")
        return self.small, self.large

    def aggregate(self, global_state: State, updates: list[ClientUpdate], round: int) -> State:
        aggregated = self.inner.aggregate(global_state, updates, round)
        small, large = self._bound()
        cfg = self.cfg
        seed = self.seed * _SEED_STREAM + round
        ensemble = ensemble_logits(small, client_models(global_state, updates), self.batches)
        to_large = distill(large.view, large.batches, ensemble,
                           steps=cfg.server_steps or cfg.steps, lr=cfg.lr,
                           temperature=cfg.temperature, seed=seed)
        teacher = ensemble_logits(large.view, [large.get_state()], large.batches)
        small.set_state(aggregated)
        to_small = distill(small, self.batches, teacher, steps=cfg.steps, lr=cfg.lr,
                           temperature=cfg.temperature, seed=seed + 1)
        self.last = {"small_to_large": to_large, "large_to_small": to_small,
                     **self._server_model_metrics()}
        return trained_state(small, aggregated)

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
    return Algorithm(name="fedmkt", client=DeltaClient(cfg.local),
                     server=FedMKTServer(build_delta_server(cfg), cfg.distill),
                     info={"distill_steps": cfg.distill.steps})
