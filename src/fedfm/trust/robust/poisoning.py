"""Data poisoning of the malicious clients' tokenized training data, and the backdoor's attack
success rate.

* Label flipping (classification): class ``c`` becomes ``C - 1 - c`` on a share of the malicious
  clients' examples (all by default).
* Backdoor (Bagdasaryan et al., "How To Backdoor Federated Learning", AISTATS 2020): the trigger
  phrase is put at the start of the input (after a leading BOS / CLS token) of a share of the
  malicious examples (half by default) and their target becomes the attacker's: ``target_label``
  for classifiers, ``target_response`` for language models (instruction data: the prompt keeps
  its masked labels, the response is replaced).

The attack success rate is measured on the global validation set with the trigger added: for
classifiers, rows whose true label is not the target, scored as the share predicted as the
target; for language models, the share of triggered prompts for which greedy decoding emits the
whole target response (teacher-forced argmax equal to the target at every position, which is
the same event).
"""

from __future__ import annotations

import random
from typing import Any

import torch

from fedfm.config import AttackConfig, ConfigError
from fedfm.models.per_example import IGNORE_INDEX


def trigger_ids(tokenizer: Any, trigger: str) -> list[int]:
    ids = tokenizer(trigger, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError(f"robustness.attack.trigger {trigger!r} tokenizes to nothing")
    return list(ids)


def _insert_at(ids: list[int], special: set[int]) -> int:
    return 1 if ids and ids[0] in special else 0


def _with_trigger(ids: list[int], trigger: list[int], special: set[int]) -> list[int]:
    at = _insert_at(ids, special)
    return ids[:at] + trigger + ids[at:]


def _fit(ids: list[int], max_length: int, special: set[int]) -> list[int]:
    """Truncate to ``max_length``, keeping a trailing special token (SEP / EOS)."""
    if len(ids) <= max_length:
        return ids
    if ids[-1] in special:
        return ids[: max_length - 1] + [ids[-1]]
    return ids[:max_length]


class Poisoner:
    """Rewrites tokenized examples for one attack on one tokenizer."""

    def __init__(self, cfg: AttackConfig, tokenizer: Any, task: str, max_length: int,
                 num_labels: int | None) -> None:
        self.cfg = cfg
        self.task = task
        self.max_length = max_length
        self.num_labels = num_labels
        self.special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self.trigger = trigger_ids(tokenizer, cfg.trigger)
        eos = tokenizer.eos_token_id
        self.response = list(tokenizer(cfg.target_response, add_special_tokens=False)
                             ["input_ids"]) + ([int(eos)] if eos is not None else [])
        if task == "classification" and num_labels is not None and \
                cfg.target_label >= num_labels:
            raise ConfigError(f"robustness.attack.target_label={cfg.target_label} but the "
                              f"task has {num_labels} labels")

    def flip(self, example: dict[str, Any]) -> dict[str, Any]:
        if self.task != "classification" or self.num_labels is None:
            raise ConfigError("robustness.attack.kind 'label_flip' needs classification data")
        return {**example, "labels": self.num_labels - 1 - int(example["labels"])}

    def backdoor(self, example: dict[str, Any]) -> dict[str, Any]:
        if self.task == "classification":
            ids = _fit(_with_trigger(list(example["input_ids"]), self.trigger, self.special),
                       self.max_length, self.special)
            return {**example, "input_ids": ids, "labels": self.cfg.target_label}
        prompt = _with_trigger(self._prompt(example), self.trigger, self.special)
        prompt = prompt[: max(1, self.max_length - len(self.response))]
        out = {**example, "input_ids": prompt + self.response,
               "labels": [IGNORE_INDEX] * len(prompt) + self.response}
        if "prompt_ids" in example:
            out["prompt_ids"] = prompt
        if "reference" in example:
            out["reference"] = self.cfg.target_response
        return out

    @staticmethod
    def _prompt(example: dict[str, Any]) -> list[int]:
        if "prompt_ids" in example:
            return list(example["prompt_ids"])
        ids, labels = list(example["input_ids"]), example["labels"]
        supervised = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
        return ids[: supervised[0]] if supervised else ids


def poison_clients(data: Any, cfg: AttackConfig, poisoner: Poisoner, malicious: list[int],
                   seed: int) -> int:
    """Poison a share of each malicious client's training examples in place; how many."""
    flip = cfg.kind == "label_flip"
    share = cfg.poison_fraction if cfg.poison_fraction is not None else (1.0 if flip else 0.5)
    poisoned = 0
    for client_id in malicious:
        train = data.clients[client_id].train
        count = int(round(share * len(train)))
        chosen = random.Random(seed * 7919 + client_id).sample(range(len(train)), count)
        for index in chosen:
            train[index] = poisoner.flip(train[index]) if flip else poisoner.backdoor(
                train[index])
        poisoned += count
    return poisoned


def backdoor_eval_set(validation: list[dict[str, Any]], poisoner: Poisoner
                      ) -> list[dict[str, Any]]:
    """Triggered validation rows whose target differs from the truth."""
    if poisoner.task == "classification":
        kept = [ex for ex in validation if int(ex["labels"]) != poisoner.cfg.target_label]
        return [poisoner.backdoor(ex) for ex in kept]
    return [poisoner.backdoor(ex) for ex in validation]


@torch.no_grad()
def attack_success_rate(model: torch.nn.Module, examples: list[dict[str, Any]], collate: Any,
                        *, task: str, device: torch.device, batch_size: int = 32,
                        autocast_dtype: torch.dtype | None = None) -> float:
    """Share of ``examples`` for which the model outputs the attacker's target."""
    if not examples:
        return 0.0
    was_training = model.training
    model.eval()
    hits = 0
    try:
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in
                     collate(examples[start:start + batch_size]).items()}
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            if task == "seq2seq":  # the decoder reads the shifted target
                inputs["labels"] = batch["labels"]
            with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16,
                                enabled=autocast_dtype is not None):
                logits = model(**inputs).logits
            hits += int(_successes(logits, batch["labels"], task).sum())
    finally:
        model.train(was_training)
    return hits / len(examples)


def _successes(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    if task == "classification":
        return logits.argmax(dim=-1) == labels.view(-1)
    if task == "seq2seq":
        supervised = labels != IGNORE_INDEX
        return ((logits.argmax(dim=-1) == labels) | ~supervised).all(dim=1) & supervised.any(1)
    predicted = logits[:, -labels.shape[1]:][:, :-1].argmax(dim=-1)
    targets = labels[:, 1:]
    supervised = targets != IGNORE_INDEX
    return ((predicted == targets) | ~supervised).all(dim=1) & supervised.any(dim=1)
