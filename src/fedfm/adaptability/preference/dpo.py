"""Federated DPO: clients align the shared adapter on their own preference pairs.

Direct Preference Optimization (Rafailov et al., "Direct Preference Optimization: Your Language
Model is Secretly a Reward Model", NeurIPS 2023), federated as in OpenFedLLM (Ye et al.,
"OpenFedLLM: Training Large Language Models on Decentralized Private Data via Federated
Learning", KDD 2024): every client trains the adapter on ``prompt`` / ``chosen`` / ``rejected``
pairs with the loss

    -(1 - eps) log sigma(beta * h) - eps log sigma(-beta * h),
    h = (log pi(c) - log pi_ref(c)) - (log pi(r) - log pi_ref(r)),

where ``log pi(y)`` sums the log-probabilities of the response tokens only (``labels != -100``;
the prompt is context, never scored) and ``eps`` is the label smoothing of conservative DPO
(``eps = 0``: the paper's loss). The server averages the adapter deltas as FedAvg does (any
aggregator and server optimizer).

The frozen reference ``pi_ref`` is the very same model with its ``peft`` adapter disabled
(``model.disable_adapter()``), evaluated without gradients and in eval mode: the base weights
every client shares, never a second copy of the model. With a freshly initialised LoRA adapter
(``B = 0``) policy and reference agree exactly, so the first loss is ``log 2``. The implicit
rewards are ``beta * (log pi(y) - log pi_ref(y))``; a pair counts as correctly ranked when the
chosen reward is strictly above the rejected one.

Chosen and rejected responses run through the model in one concatenated batch (rows ``[0, B)``
chosen, ``[B, 2B)`` rejected), once with the adapter and once without.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fedfm.algorithms.fedavg import build_delta_server
from fedfm.algorithms.local_train import train_locally
from fedfm.config import AlgorithmConfig, ConfigError, DPOConfig, LocalTrainingConfig, RunConfig
from fedfm.core import state as state_ops
from fedfm.core.algorithm import Algorithm, ClientContext, ClientResult
from fedfm.core.registries import ALGORITHMS, POISONING
from fedfm.core.registry import MethodInfo
from fedfm.core.update import Broadcast, ClientUpdate
from fedfm.data import collate
from fedfm.eval.evaluator import PAIR_SCORERS, eval_mode

IGNORE_INDEX = -100
PEFT_ADAPTERS = ("lora", "ia3", "prompt_tuning", "prefix_tuning")
SIDES = ("chosen_", "rejected_")
Batch = dict[str, torch.Tensor]


# --------------------------------------------------------------------------- batches


def _pad_to(tensor: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return F.pad(tensor, (0, width - tensor.shape[1]), value=value)


def concat_pairs(batch: Batch, pad_token_id: int = 0) -> Batch:
    """One causal-LM batch from ``fedfm.data.collate``'s ``chosen_*`` / ``rejected_*`` tensors:
    ``input_ids``, ``attention_mask``, ``labels`` with the chosen rows first, right-padded to a
    common width (padded positions are masked out of attention and loss, so the pad id only
    fills). A batch that already is one is returned as it is."""
    if "input_ids" in batch:
        return batch
    width = max(batch[f"{side}input_ids"].shape[1] for side in SIDES)
    fills = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    return {key: torch.cat([_pad_to(batch[f"{side}{key}"], width, fill) for side in SIDES])
            for key, fill in fills.items()}


def collate_pairs(examples: list[dict[str, Any]], *, pad_token_id: int) -> Batch:
    """Preference examples as the concatenated batch the DPO loss runs on (also the probe batch
    the fast path times attention on)."""
    return concat_pairs(collate(examples, pad_token_id=pad_token_id, task="causal_lm"),
                        pad_token_id)


# --------------------------------------------------------------------------- log-probabilities


def response_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the fp32 sum of ``log p(labels[t] | < t)`` over the positions whose label is not
    ``-100`` (next-token shift: ``logits[:, t]`` predicts ``labels[:, t + 1]``). Only the
    scored positions are up-cast."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    scored = logits[:, :-1][mask].float()
    token = -F.cross_entropy(scored, targets[mask], reduction="none")
    rows = mask.nonzero(as_tuple=True)[0]
    return torch.zeros(labels.shape[0], dtype=token.dtype, device=token.device).index_add(
        0, rows, token)


def sequence_logps(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """``log pi(response | prompt)`` of each row of a concatenated batch, under ``model`` as it
    is (adapter on or off, train or eval mode)."""
    labels = batch["labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   use_cache=False).logits
    return response_logps(logits[:, -labels.shape[1]:], labels)  # prompt tuning prepends


def reference_logps(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """``log pi_ref`` of each row: the same model with its adapter disabled, in eval mode and
    without gradients (a fixed function; no copy of the model is ever made)."""
    disable = getattr(model, "disable_adapter", None)
    if disable is None:
        raise ValueError(
            "fed_dpo needs a peft adapter (adapter.kind one of " + ", ".join(PEFT_ADAPTERS)
            + "): the frozen reference is the model with its adapter disabled")
    with torch.no_grad(), disable(), eval_mode(model):
        return sequence_logps(model, batch)


# --------------------------------------------------------------------------- the objective


@dataclass
class PairTerms:
    """Per pair: the DPO loss and the implicit rewards ``beta * (log pi - log pi_ref)``."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def dpo_terms(policy: torch.Tensor, reference: torch.Tensor, *, beta: float,
              label_smoothing: float = 0.0) -> PairTerms:
    """The DPO loss of each pair from the log-probabilities of a concatenated batch (first half
    chosen, second half rejected). The rewards are detached; the losses carry the gradient."""
    pairs = policy.shape[0] // 2
    ratios = policy - reference
    chosen, rejected = ratios[:pairs], ratios[pairs:]
    logits = beta * (chosen - rejected)
    losses = (-(1.0 - label_smoothing) * F.logsigmoid(logits)
              - label_smoothing * F.logsigmoid(-logits))
    return PairTerms(losses, beta * chosen.detach(), beta * rejected.detach())


def pair_terms(model: torch.nn.Module, batch: Batch, cfg: DPOConfig) -> PairTerms:
    """The DPO terms of a batch of pairs (either form): policy and reference log-probs of the
    concatenated batch, then ``dpo_terms``."""
    joined = concat_pairs(batch)
    return dpo_terms(sequence_logps(model, joined), reference_logps(model, joined),
                     beta=cfg.beta, label_smoothing=cfg.label_smoothing)


def score_pairs(model: torch.nn.Module, batch: Batch, cfg: DPOConfig
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses, chosen rewards, rejected rewards): the evaluator's preference scorer."""
    terms = pair_terms(model, batch, cfg)
    return terms.losses, terms.chosen_rewards, terms.rejected_rewards


PAIR_SCORERS["dpo"] = score_pairs


@dataclass
class PairStats:
    """Running sums over scored pairs: mean loss, preference accuracy, rewards and margin."""

    pairs: int = 0
    loss: float = 0.0
    correct: float = 0.0
    chosen: float = 0.0
    rejected: float = 0.0

    def add(self, terms: PairTerms) -> None:
        self.pairs += int(terms.losses.shape[0])
        self.loss += float(terms.losses.detach().sum())
        self.correct += float((terms.chosen_rewards > terms.rejected_rewards).sum())
        self.chosen += float(terms.chosen_rewards.sum())
        self.rejected += float(terms.rejected_rewards.sum())

    def metrics(self, prefix: str = "") -> dict[str, float]:
        if self.pairs == 0:
            return {}
        n = self.pairs
        return {f"{prefix}dpo_loss": self.loss / n,
                f"{prefix}preference_accuracy": self.correct / n,
                f"{prefix}reward_margin": (self.chosen - self.rejected) / n,
                f"{prefix}chosen_reward": self.chosen / n,
                f"{prefix}rejected_reward": self.rejected / n}


class DPOLoss:
    """``loss_fn(model, batch)`` for ``train_locally``: the mean DPO loss of a batch of pairs;
    keeps the pairs' statistics in ``stats`` (measured before each step's update) and the
    real / computed tokens of the policy passes (``useful_tokens`` / ``processed_tokens``)."""

    def __init__(self, cfg: DPOConfig) -> None:
        self.cfg = cfg
        self.stats = PairStats()
        self.useful_tokens = 0
        self.processed_tokens = 0

    def __call__(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        joined = concat_pairs(batch)
        self.useful_tokens += int(joined["attention_mask"].sum())
        self.processed_tokens += joined["input_ids"].numel()
        terms = pair_terms(model, joined, self.cfg)
        self.stats.add(terms)
        return terms.losses.mean()

    def metrics(self) -> dict[str, float]:
        """The training metrics: the pairs' statistics (``train_`` prefixed; ``train_loss``
        already is the DPO loss) and the token counts."""
        found = {k: v for k, v in self.stats.metrics("train_").items() if k != "train_dpo_loss"}
        found.update(useful_tokens=float(self.useful_tokens),
                     processed_tokens=float(self.processed_tokens))
        return found


# --------------------------------------------------------------------------- the algorithm


class DPOClient:
    """Train the adapter with the DPO loss, send ``local - global``; the training metrics are
    ``train_loss`` (the DPO loss) and the pairs' ``train_preference_accuracy``,
    ``train_reward_margin``, ``train_chosen_reward`` and ``train_rejected_reward``."""

    def __init__(self, local: LocalTrainingConfig, dpo: DPOConfig) -> None:
        self.local = local
        self.dpo = dpo

    def run(self, ctx: ClientContext, broadcast: Broadcast) -> ClientResult:
        loss = DPOLoss(self.dpo)
        result = train_locally(dataclasses.replace(ctx, loss_fn=loss), self.local)
        delta = state_ops.sub(ctx.get_state(), broadcast.global_state)
        metrics = {**result.metrics(), **loss.metrics()}
        update = ClientUpdate(client_id=ctx.client_id, payload=delta,
                              num_examples=len(ctx.train_examples), metrics=metrics)
        return ClientResult(update=update)


@ALGORITHMS.register("fed_dpo", MethodInfo(
    "adaptability.alignment",
    "Direct Preference Optimization: Your Language Model is Secretly a Reward Model "
    "(Rafailov et al., NeurIPS 2023); OpenFedLLM: Training Large Language Models on "
    "Decentralized Private Data via Federated Learning (Ye et al., KDD 2024)",
    "data: {format: preference}\nalgorithm: {name: fed_dpo, dpo: {beta: 0.1, "
    "label_smoothing: 0.0}}",
    "clients train the adapter with the DPO loss on prompt/chosen/rejected pairs against the "
    "adapter-disabled base model; FedAvg of the deltas"))
def build_fed_dpo(cfg: AlgorithmConfig, num_clients: int) -> Algorithm:
    if cfg.local.packing:
        raise ConfigError(_PACKING)
    return Algorithm(name="fed_dpo", client=DPOClient(cfg.local, cfg.dpo),
                     server=build_delta_server(cfg),
                     info={"server_optimizer": cfg.server_optimizer.name, "beta": cfg.dpo.beta,
                           "label_smoothing": cfg.dpo.label_smoothing})


# --------------------------------------------------------------------------- config checks

_PACKING = ("invalid config: algorithm.local.packing cannot be combined with algorithm 'fed_dpo': "
            "a preference pair is two sequences scored as a whole, which packing would cut "
            "into one stream")


def check_dpo(config: RunConfig) -> None:
    """Refuse, before anything is loaded, what fed_dpo cannot run with (a sentence says why)."""
    if config.algorithm.name != "fed_dpo":
        # compared by value: a saved run's config lists every field, defaults included
        if config.algorithm.dpo != DPOConfig():
            raise ConfigError(f"invalid config: algorithm.dpo is read by algorithm 'fed_dpo' "
                              f"only; algorithm {config.algorithm.name!r} would ignore it")
        return
    reason = next(_refusals(config), None)
    if reason is not None:
        raise ConfigError(f"invalid config: {reason}")


def _refusals(config: RunConfig) -> Iterator[str]:
    kind = config.adapter.kind
    if kind not in PEFT_ADAPTERS:
        yield (f"algorithm 'fed_dpo' needs a peft adapter ({', '.join(PEFT_ADAPTERS)}): its "
               f"frozen reference is the base model with the adapter disabled, and "
               f"adapter.kind {kind!r} trains the base weights themselves")
    if config.algorithm.local.packing:
        yield _PACKING.removeprefix("invalid config: ")
    if config.privacy.dp_sgd is not None:
        yield ("privacy.dp_sgd clips per-example gradients of the token loss and cannot be "
               "combined with algorithm 'fed_dpo' (use privacy.client_dp)")
    if config.eval.finetune_steps > 0:
        yield ("eval.finetune_steps fine-tunes with the token loss, which preference pairs do "
               "not have; it cannot be combined with algorithm 'fed_dpo'")
    if config.eval.canaries is not None:
        yield ("eval.canaries plants instruction examples, which preference data cannot hold; "
               "it cannot be combined with algorithm 'fed_dpo'")
    attack = config.robustness.attack
    if attack is not None and attack.kind in POISONING and POISONING.get(attack.kind).poisons_data:
        yield (f"robustness.attack {attack.kind!r} poisons instruction or classification data; "
               f"preference pairs have no label or response it could rewrite")


__all__ = ["DPOClient", "DPOLoss", "PairStats", "PairTerms", "build_fed_dpo", "check_dpo",
           "collate_pairs", "concat_pairs", "dpo_terms", "pair_terms", "reference_logps",
           "response_logps", "score_pairs", "sequence_logps"]
