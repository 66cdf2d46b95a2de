"""FedDF: ensemble distillation for robust model fusion.

Lin, Kong, Stich & Jaggi, "Ensemble Distillation for Robust Model Fusion in Federated
Learning", NeurIPS 2020. After the usual aggregation the server treats the round's client
models as an ensemble: their averaged logits on unlabeled public data are the teacher, and the
aggregated global model (the student, from the aggregate) takes ``distill.steps`` Adam steps
towards them (KL at temperature ``T``). Clients train exactly as in FedAvg; only the server
needs the public data, and nothing more travels.
"""

from __future__ import annotations

from typing import Any

from fedfm.algorithms.fedavg import DeltaClient, build_delta_server
from fedfm.config import AlgorithmConfig, DistillConfig
from fedfm.core import state as state_ops
from fedfm.core.algorithm import Algorithm, ServerRule, ServerWrapper
from fedfm.core.registries import ALGORITHMS
from fedfm.core.registry import MethodInfo
from fedfm.core.state import State
from fedfm.core.update import ClientUpdate
from fedfm.efficiency.distillation.kd import Batch, ModelView, distill, ensemble_logits
from fedfm.efficiency.distillation.public import (
    load_public_texts,
    public_batches,
    tokenize_public,
)
from fedfm.models import get_state

_SEED_STREAM = 7919  # keeps the distillation batch order apart from the clients' streams


def workload_view(workload: Any) -> ModelView:
    return ModelView(workload.model, workload.device, workload.autocast_dtype,
                     workload.set_state)


def workload_public_batches(workload: Any, cfg: DistillConfig) -> list[Batch]:
    """The public set, tokenized by the workload's tokenizer, in fixed batches."""
    config = workload.config
    texts = load_public_texts(cfg.public, config.data)
    rows = tokenize_public(texts, workload.bundle.tokenizer, task=workload.bundle.task,
                           max_length=config.model.max_length)
    return public_batches(rows, cfg.batch_size, workload.pad_token_id)


def client_models(global_state: State, updates: list[ClientUpdate]) -> list[State]:
    """Each client's model: the global State plus its delta."""
    return [state_ops.add(global_state, update.payload) for update in updates]


class FedDFServer(ServerWrapper):
    """Aggregate as the inner rule does, then distil the clients' ensemble into the result."""

    def __init__(self, inner: ServerRule, cfg: DistillConfig) -> None:
        super().__init__(inner)
        self.cfg = cfg
        self.view: ModelView | None = None
        self.batches: list[Batch] = []
        self.seed = 0
        self.last: dict[str, float] = {}

    def bind_workload(self, workload: Any) -> None:
        self.view = workload_view(workload)
        self.batches = workload_public_batches(workload, self.cfg)
        self.seed = int(workload.config.seed)
        inner_bind = getattr(self.inner, "bind_workload", None)
        if inner_bind is not None:
            inner_bind(workload)

    def _view(self) -> ModelView:
        if self.view is None:
            raise RuntimeError("feddf: the server rule was never bound to a workload (the "
                               "public data and the model it distils into)")
        return self.view

    def aggregate(self, global_state: State, updates: list[ClientUpdate], round: int) -> State:
        aggregated = self.inner.aggregate(global_state, updates, round)
        view = self._view()
        teacher = ensemble_logits(view, client_models(global_state, updates), self.batches)
        view.set_state(aggregated)
        self.last = distill(view, self.batches, teacher, steps=self.cfg.steps, lr=self.cfg.lr,
                            temperature=self.cfg.temperature,
                            seed=self.seed * _SEED_STREAM + round)
        return get_state(view.model)

    def round_metrics(self) -> dict[str, Any]:
        inner = getattr(self.inner, "round_metrics", None)
        found = dict(inner()) if inner is not None else {}
        found["distill"] = {**self.last, "public_rows": float(
            sum(len(b["input_ids"]) for b in self.batches))}
        return found


@ALGORITHMS.register("feddf", MethodInfo(
    "efficiency.distillation",
    "Ensemble Distillation for Robust Model Fusion in Federated Learning (Lin et al., "
    "NeurIPS 2020)",
    "algorithm: {name: feddf, distill: {public: {path: public.jsonl}, steps: 50}}",
    "FedAvg, then the clients' averaged logits on public data are distilled into the global "
    "model"))
def build_feddf(cfg: AlgorithmConfig, num_clients: int) -> Algorithm:
    if cfg.distill is None:
        raise ValueError("algorithm 'feddf' needs algorithm.distill (its public data)")
    return Algorithm(name="feddf", client=DeltaClient(cfg.local),
                     server=FedDFServer(build_delta_server(cfg), cfg.distill),
                     info={"distill_steps": cfg.distill.steps})
