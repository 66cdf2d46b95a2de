"""The workload a runtime process holds: one base model with its adapter, the clients' data,
the algorithm's client half, and the evaluator over them.

Every runtime builds one ``Workload`` per process (the local runtime: one; a Ray actor: one per
actor) and runs many clients through it by swapping the small communicated ``State``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from fedfm.config import ConfigError, EvalConfig, RunConfig, RuntimeConfig
from fedfm.core.algorithm import ClientContext, ClientProcedure
from fedfm.core.loop import EvalReport
from fedfm.core.state import State
from fedfm.data import FederatedData, collate
from fedfm.eval import evaluate_examples, generate_rouge
from fedfm.eval.evaluator import example_length
from fedfm.models import ModelBundle, get_state, set_state
from fedfm.runtime.fast import LossFn, SpeedPlan, standard_loss


def resolve_device(cfg: RuntimeConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("invalid config: runtime.device: 'cuda' but no CUDA device is "
                          "available (use 'auto' or 'cpu')")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


_FINETUNE_STREAM = 11  # keeps evaluation fine-tuning seeds apart from the clients' own


@dataclass
class Workload:
    bundle: ModelBundle
    data: FederatedData
    client: ClientProcedure
    config: RunConfig
    device: torch.device
    autocast_dtype: torch.dtype | None
    loss_fn: LossFn = standard_loss
    speed: SpeedPlan = field(default_factory=SpeedPlan)
    # triggered validation rows of a simulated backdoor (robustness.attack): attack success rate
    backdoor_eval: list[dict[str, Any]] | None = None
    # other models evaluated beside ``model`` on the same rows, sharing its trainable tensors
    # (so they hold the same State), e.g. offsite tuning's emulator: metrics "<name>_<metric>"
    views: dict[str, torch.nn.Module] = field(default_factory=dict)

    @property
    def model(self) -> torch.nn.Module:
        return self.bundle.model

    @property
    def pad_token_id(self) -> int:
        pad = self.bundle.tokenizer.pad_token_id
        return int(pad) if pad is not None else 0

    def collate_fn(self) -> Any:
        return partial(collate, pad_token_id=self.pad_token_id, task=self.bundle.task)

    def get_state(self) -> State:
        return get_state(self.model)

    def client_context(self, examples: list[dict[str, Any]], *, client_id: int, round: int,
                       seed: int, client_state: Any = None) -> ClientContext:
        """A client's view of this workload, training on ``examples``."""
        return ClientContext(
            client_id=client_id, round=round, seed=seed, model=self.model,
            get_state=self.get_state, set_state=self.set_state, train_examples=examples,
            collate=self.collate_fn(), device=self.device, autocast_dtype=self.autocast_dtype,
            client_state=client_state, loss_fn=self.loss_fn,
            max_length=self.config.model.max_length)

    def set_state(self, state: Mapping[str, torch.Tensor]) -> None:
        set_state(self.model, state)

    def evaluate(self, global_state: State, *, per_client: bool,
                 personal: Callable[[int], State] | None = None, round: int = 0,
                 extras: Mapping[str, State] | None = None) -> EvalReport:
        """Global metrics on the global validation set; per-client metrics of the global model
        on each client's own validation split; and, when the algorithm keeps a personal model
        (``personal(client_id)``: FedSA-LoRA's B, a personal head, a cluster model) or
        ``eval.finetune_steps`` is set, personalized metrics of each client's own model on
        the same split (after that many local fine-tuning steps on its training data)."""
        self.set_state(global_state)
        eval_cfg = self.config.eval
        examples = self.data.global_validation
        if eval_cfg.max_examples is not None:
            examples = examples[: eval_cfg.max_examples]
        report = EvalReport(global_metrics=self._evaluate_views(examples, eval_cfg))
        routed = getattr(self.client, "routed_metrics", None)  # domain_lora: rows by domain
        if routed is not None and extras is not None:
            report.global_metrics.update(
                {f"routed_{k}": v for k, v in routed(self, global_state, extras).items()})
            self.set_state(global_state)
        if self.bundle.task != "classification" and eval_cfg.generation.enabled and examples:
            report.global_metrics.update(self._generation_metrics(examples, eval_cfg))
        if self.backdoor_eval:
            report.global_metrics["attack_success_rate"] = self._attack_success(eval_cfg)
        if not per_client:
            return report
        for client in self.data.clients:
            if client.validation:
                report.per_client[client.client_id] = self._evaluate_views(
                    client.validation, eval_cfg)
        if personal is not None or eval_cfg.finetune_steps > 0:
            for client in self.data.clients:
                if client.validation:
                    own = personal(client.client_id) if personal is not None else global_state
                    self.set_state(self._finetuned(own, client, round))
                    report.personalized[client.client_id] = self._evaluate_views(
                        client.validation, eval_cfg)
            self.set_state(global_state)
        return report

    def _finetuned(self, state: State, client: Any, round: int) -> State:
        """``state`` after ``eval.finetune_steps`` local steps on the client's training data
        (``algorithm.local``'s optimizer and batch size), seeded by (run seed, round, client);
        ``state`` itself when no fine-tuning is asked for."""
        steps = self.config.eval.finetune_steps
        if steps == 0:
            return state
        from fedfm.algorithms.local_train import train_locally
        from fedfm.core.loop import derive_seed

        self.set_state(state)
        local = self.config.algorithm.local.model_copy(update={"steps": steps, "epochs": None})
        ctx = self.client_context(client.train, client_id=client.client_id, round=round,
                                  seed=derive_seed(self.config.seed, round, client.client_id,
                                                   _FINETUNE_STREAM))
        train_locally(ctx, local)
        return self.get_state()

    def evaluate_examples(self, state: Mapping[str, torch.Tensor],
                          examples: list[dict[str, Any]]) -> dict[str, float]:
        """Metrics of the model holding ``state`` on ``examples`` (a client agent measuring
        the global model on its own validation split)."""
        self.set_state(state)
        return self._evaluate_set(examples, self.config.eval)

    def _evaluate_views(self, examples: list[dict[str, Any]], eval_cfg: EvalConfig
                        ) -> dict[str, float]:
        """The model's metrics on ``examples``, then each view's under its name."""
        metrics = self._evaluate_set(examples, eval_cfg)
        for name, view in self.views.items():
            found = self._evaluate_set(examples, eval_cfg, view)
            metrics.update({f"{name}_{key}": value for key, value in found.items()})
        return metrics

    def _evaluate_set(self, examples: list[dict[str, Any]], eval_cfg: EvalConfig,
                      model: torch.nn.Module | None = None) -> dict[str, float]:
        # Every metric here is order-free (token- or example-weighted over the whole set), so
        # batching by length only removes padding work. The prefix cache serves ``self.model``
        # alone (a view's blocks differ).
        by_length = sorted(examples, key=example_length)
        cache = self.speed.cache if model is None else None
        with cache.enabled() if cache is not None else nullcontext():
            return evaluate_examples(
                self.model if model is None else model, by_length, task=self.bundle.task,
                collate_fn=self.collate_fn(), batch_size=eval_cfg.batch_size, device=self.device,
                autocast_dtype=self.autocast_dtype, num_labels=self.bundle.num_labels,
                dpo=self.config.algorithm.dpo)

    def _attack_success(self, eval_cfg: EvalConfig) -> float:
        from fedfm.trust.robust.poisoning import attack_success_rate

        triggered = self.backdoor_eval or []
        if eval_cfg.max_examples is not None:
            triggered = triggered[: eval_cfg.max_examples]
        return attack_success_rate(self.model, triggered, self.collate_fn(),
                                   task=self.bundle.task, device=self.device,
                                   batch_size=eval_cfg.batch_size,
                                   autocast_dtype=self.autocast_dtype)

    def _generation_metrics(self, examples: list[dict[str, Any]], eval_cfg: EvalConfig
                            ) -> dict[str, float]:
        sample = examples[: eval_cfg.generation.num_samples]
        return generate_rouge(self.model, self.bundle.tokenizer, sample, task=self.bundle.task,
                              max_new_tokens=eval_cfg.generation.max_new_tokens,
                              device=self.device, batch_size=eval_cfg.batch_size)
