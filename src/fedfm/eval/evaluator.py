"""Evaluators: loss/perplexity/accuracy over a set of examples, ROUGE-L on greedy generations, and
a fairness summary of a metric across clients.

``evaluate_examples`` computes every cross-entropy itself, in float32, from the model's logits:

- ``causal_lm``: next-token loss (``logits[:, :-1]`` against ``labels[:, 1:]``, ``-100`` ignored),
  summed over all supervised tokens of the set and divided by their number -- a token-weighted
  mean, so the result does not depend on the batch size, the batch composition or the padding.
- ``seq2seq``: the labels are passed to the model (which derives the decoder inputs from them) and
  the loss of the decoder logits against the labels is token-weighted the same way.
- ``classification``: mean cross-entropy over examples, accuracy and macro-F1.
- preference pairs (examples with ``chosen_input_ids``, any task): the preference scorer
  registered in ``PAIR_SCORERS`` (federated DPO, ``fedfm.adaptability.preference``) gives each
  pair's loss and implicit rewards; the set's ``dpo_loss``, ``preference_accuracy`` (chosen
  reward strictly above rejected), ``reward_margin``, ``chosen_reward`` and ``rejected_reward``
  are means over pairs.

Only the supervised positions of one batch are ever up-cast to float32, never the whole set.
``generate_rouge`` decodes greedily (left-padded prompts for causal LMs) and scores ROUGE-L.
``fairness_summary`` reduces per-client metrics to mean / std / worst-10% / best-10% / min / max.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import GenerationConfig

from fedfm.config import DPOConfig
from fedfm.eval.metrics import accuracy, macro_f1, perplexity, rouge_l

__all__ = ["PAIR_SCORERS", "evaluate_examples", "example_length", "fairness_summary",
           "generate_rouge", "primary_metric"]

LM_TASKS = ("causal_lm", "seq2seq")
TASKS = (*LM_TASKS, "classification")
IGNORE_INDEX = -100
PREFERENCE_KEY = "chosen_input_ids"

PairScorer = Callable[[Any, dict[str, torch.Tensor], DPOConfig],
                      tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
PAIR_SCORERS: dict[str, PairScorer] = {}
"""``"dpo"`` -> ``(model, batch, DPOConfig) -> (losses, chosen rewards, rejected rewards)`` per
pair; registered by ``fedfm.adaptability.preference`` when it is imported (so this module
never imports a method)."""


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _batches(items: Sequence[dict], batch_size: int) -> Iterator[list[dict]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(items), batch_size):
        yield list(items[start : start + batch_size])


def _check_task(task: str, allowed: Sequence[str]) -> None:
    if task not in allowed:
        raise ValueError(f"unknown task {task!r}; expected one of {list(allowed)}")


def _model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Every collated tensor except the labels, on ``device``."""
    return {k: v.to(device) for k, v in batch.items() if k != "labels"}


def _token_ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """Float32 cross-entropy summed over the positions where ``targets != -100``; their count."""
    mask = targets != IGNORE_INDEX
    count = int(mask.sum())
    if count == 0:
        return 0.0, 0
    picked = logits[mask].float()  # (count, vocab): only the supervised rows are up-cast
    loss = F.cross_entropy(picked, targets[mask], reduction="sum")
    return float(loss), count


def _lm_batch_loss(
    model: Any, batch: dict[str, torch.Tensor], task: str, device: torch.device
) -> tuple[float, int]:
    inputs = _model_inputs(batch, device)
    labels = batch["labels"].to(device)
    if task == "seq2seq":
        logits = model(**inputs, labels=labels, use_cache=False).logits
        return _token_ce_sum(logits, labels)
    logits = model(**inputs, use_cache=False).logits
    seq_len = labels.shape[1]
    if logits.shape[1] > seq_len:  # prompt-learning adapters prepend virtual tokens
        logits = logits[:, -seq_len:]
    return _token_ce_sum(logits[:, :-1], labels[:, 1:])


def _evaluate_lm(
    model: Any, batches: Iterator[dict[str, torch.Tensor]], task: str, device: torch.device
) -> dict[str, float]:
    total, tokens = 0.0, 0
    for batch in batches:
        loss_sum, count = _lm_batch_loss(model, batch, task, device)
        total += loss_sum
        tokens += count
    if tokens == 0:
        return {"tokens": 0}
    loss = total / tokens
    return {"loss": loss, "perplexity": perplexity(loss), "tokens": tokens}


def _evaluate_pairs(
    model: Any, batches: Iterator[dict[str, torch.Tensor]], device: torch.device, dpo: DPOConfig
) -> dict[str, float]:
    scorer = PAIR_SCORERS.get("dpo")
    if scorer is None:
        raise ValueError("preference examples are scored by federated DPO: import "
                         "fedfm.adaptability (fedfm.run does) to register its scorer")
    pairs, loss, correct, chosen, rejected = 0, 0.0, 0.0, 0.0, 0.0
    for batch in batches:
        losses, chosen_r, rejected_r = scorer(model, {k: v.to(device) for k, v in batch.items()},
                                              dpo)
        pairs += int(losses.shape[0])
        loss += float(losses.float().sum())
        correct += float((chosen_r > rejected_r).sum())
        chosen += float(chosen_r.float().sum())
        rejected += float(rejected_r.float().sum())
    return {
        "dpo_loss": loss / pairs,
        "preference_accuracy": correct / pairs,
        "reward_margin": (chosen - rejected) / pairs,
        "chosen_reward": chosen / pairs,
        "rejected_reward": rejected / pairs,
        "examples": pairs,
    }


def _evaluate_classification(
    model: Any,
    batches: Iterator[dict[str, torch.Tensor]],
    device: torch.device,
    num_labels: int | None,
) -> dict[str, float]:
    total, preds, labels = 0.0, [], []
    width = num_labels
    for batch in batches:
        target = batch["labels"].to(device).long().view(-1)
        logits = model(**_model_inputs(batch, device)).logits.float()
        width = width or logits.shape[-1]
        total += float(F.cross_entropy(logits, target, reduction="sum"))
        preds.append(logits.argmax(dim=-1).cpu())
        labels.append(target.cpu())
    pred_t, label_t = torch.cat(preds), torch.cat(labels)
    n = int(label_t.numel())
    return {
        "loss": total / n,
        "accuracy": accuracy(pred_t, label_t),
        "macro_f1": macro_f1(pred_t, label_t, int(width)),
        "examples": n,
    }


# --------------------------------------------------------------------------- loss / accuracy


@torch.no_grad()
def evaluate_examples(
    model: Any,
    examples: list[dict],
    *,
    task: str,
    collate_fn: Callable[[list[dict]], dict[str, torch.Tensor]],
    batch_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    num_labels: int | None = None,
    dpo: DPOConfig | None = None,
) -> dict[str, float]:
    """Evaluate ``model`` on ``examples``.

    LM tasks return ``{"loss", "perplexity", "tokens"}`` (token-weighted mean CE over every
    supervised token of the set; only ``{"tokens": 0}`` when no token is supervised).
    Classification returns ``{"loss", "accuracy", "macro_f1", "examples"}`` (``num_labels``
    defaults to the logits' width). Preference pairs return ``{"dpo_loss",
    "preference_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "examples"}``
    under ``dpo``'s beta and label smoothing (default ``DPOConfig()``). No examples: ``{}``.
    Every collated key except ``labels`` is passed to the model. The model's train/eval mode is
    restored afterwards.
    """
    _check_task(task, TASKS)
    if not examples:
        return {}
    device = torch.device(device)
    batches = (collate_fn(chunk) for chunk in _batches(examples, batch_size))
    with eval_mode(model), _autocast(device, autocast_dtype):
        if PREFERENCE_KEY in examples[0]:
            return _evaluate_pairs(model, batches, device, dpo or DPOConfig())
        if task == "classification":
            return _evaluate_classification(model, batches, device, num_labels)
        return _evaluate_lm(model, batches, task, device)


# --------------------------------------------------------------------------- generation


def _special_ids(model: Any, tokenizer: Any) -> tuple[int, list[int]]:
    """(pad id, eos ids) from the tokenizer, falling back to the model's generation config."""
    gen_cfg = getattr(model, "generation_config", None)
    eos = tokenizer.eos_token_id
    if eos is None and gen_cfg is not None:
        eos = gen_cfg.eos_token_id
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = tokenizer.pad_token_id
    if pad is None and gen_cfg is not None:
        pad = gen_cfg.pad_token_id
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    return int(pad), eos_ids


def _greedy_config(
    model: Any, max_new_tokens: int, start: int, pad_id: int, eos_ids: list[int]
) -> GenerationConfig:
    """Plain greedy decoding whatever the model's own generation config says.

    The length is given as ``max_length = start + max_new_tokens`` rather than ``max_new_tokens``
    (transformers warns on every call when the model's config sets ``max_length`` and the call
    sets ``max_new_tokens``) unless the model's config itself sets ``max_new_tokens``, which would
    otherwise win. The sampling knobs are pinned to their neutral values, so inherited ones such as
    ``temperature=0.6`` neither apply nor trigger warnings.
    """
    model_cfg = getattr(model, "generation_config", None)
    if model_cfg is not None and getattr(model_cfg, "max_new_tokens", None) is not None:
        length: dict[str, int] = {"max_new_tokens": max_new_tokens}
    else:
        length = {"max_length": start + max_new_tokens}
    return GenerationConfig(
        **length,
        do_sample=False,
        num_beams=1,
        temperature=1.0,
        top_k=50,
        top_p=1.0,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        pad_token_id=pad_id,
        eos_token_id=eos_ids or None,
    )


def _pad_prompts(
    prompts: list[list[int]], pad_id: int, *, left: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError("cannot generate from an empty prompt")
        span = slice(width - len(prompt), width) if left else slice(0, len(prompt))
        ids[row, span] = torch.tensor(prompt, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def _cut_at_eos(tokens: list[int], eos_ids: list[int]) -> list[int]:
    for i, tok in enumerate(tokens):
        if tok in eos_ids:
            return tokens[:i]
    return tokens


def _new_tokens(output: torch.Tensor, input_ids: torch.Tensor, task: str) -> torch.Tensor:
    """The generated continuation: causal LMs echo the prompt first, which is dropped."""
    if task == "seq2seq":
        return output
    width = input_ids.shape[1]
    if output.shape[1] >= width and torch.equal(output[:, :width], input_ids):
        return output[:, width:]
    return output  # backends that return only the new tokens


def _generate_batch(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    *,
    task: str,
    max_new_tokens: int,
    pad_id: int,
    eos_ids: list[int],
    device: torch.device,
) -> list[str]:
    input_ids, attention_mask = _pad_prompts(prompts, pad_id, left=task == "causal_lm")
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    # Causal LMs count the (left-padded, equal-width) prompt in max_length; encoder-decoders count
    # the decoder start token.
    start = input_ids.shape[1] if task == "causal_lm" else 1
    config = _greedy_config(model, max_new_tokens, start, pad_id, eos_ids)
    output = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, generation_config=config
    )
    new = _new_tokens(output, input_ids, task).cpu().tolist()
    return [
        tokenizer.decode(_cut_at_eos(seq, eos_ids), skip_special_tokens=True).strip()
        for seq in new
    ]


@torch.no_grad()
def generate_rouge(
    model: Any,
    tokenizer: Any,
    examples: list[dict],
    *,
    task: str,
    max_new_tokens: int,
    device: torch.device | str,
    batch_size: int = 8,
) -> dict[str, float]:
    """Greedy-decode each example's ``prompt_ids`` and score ROUGE-L against its ``reference``.

    Returns ``{"rouge_l": mean F-measure, "generated": n}``, or ``{}`` for no examples. Causal LM
    prompts are left-padded with explicit attention masks; only the new tokens are decoded,
    stopping at the first end-of-sequence token and skipping special tokens. Works for plain HF
    models and ``peft`` models alike.
    """
    _check_task(task, LM_TASKS)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not examples:
        return {}
    if "input_features" in examples[0]:  # speech: greedy transcripts, exact match
        from fedfm.data.media import transcript_accuracy

        return transcript_accuracy(model, tokenizer, examples, device=device,
                                   batch_size=batch_size, max_new_tokens=max_new_tokens)
    device = torch.device(device)
    pad_id, eos_ids = _special_ids(model, tokenizer)
    predictions: list[str] = []
    with eval_mode(model):
        for chunk in _batches(examples, batch_size):
            predictions += _generate_batch(
                model,
                tokenizer,
                [list(ex["prompt_ids"]) for ex in chunk],
                task=task,
                max_new_tokens=max_new_tokens,
                pad_id=pad_id,
                eos_ids=eos_ids,
                device=device,
            )
    references = [str(ex["reference"]) for ex in examples]
    return {"rouge_l": rouge_l(predictions, references), "generated": len(predictions)}


# --------------------------------------------------------------------------- across clients


def fairness_summary(
    per_client: dict[int, dict[str, float]], *, metric: str, higher_is_better: bool
) -> dict[str, float]:
    """Distribution of ``metric`` across clients: mean, population std, mean of the worst and the
    best ``ceil(10%)`` of clients, min and max. Clients without the metric (or with ``nan``) are
    ignored; ``{}`` when none has it."""
    values = [
        float(m[metric])
        for m in per_client.values()
        if metric in m and not math.isnan(float(m[metric]))
    ]
    if not values:
        return {}
    ordered = np.sort(np.asarray(values, dtype=np.float64))  # ascending
    k = math.ceil(0.1 * len(ordered))
    low, high = float(ordered[:k].mean()), float(ordered[-k:].mean())
    worst, best = (low, high) if higher_is_better else (high, low)
    return {
        f"{metric}_mean": float(ordered.mean()),
        f"{metric}_std": float(ordered.std()),
        f"{metric}_worst10": worst,
        f"{metric}_best10": best,
        f"{metric}_min": float(ordered[0]),
        f"{metric}_max": float(ordered[-1]),
    }


def example_length(example: dict[str, Any]) -> int:
    """Tokens an example puts through the model (both sides of a preference pair; 0 without
    token ids, e.g. an image): the key that batches evaluation rows by length."""
    if PREFERENCE_KEY in example:
        return len(example[PREFERENCE_KEY]) + len(example["rejected_input_ids"])
    return len(example.get("input_ids", ()))


def primary_metric(task: str, data_format: str | None = None) -> tuple[str, bool]:
    """The headline metric of a task (of preference data: ``preference_accuracy``) and whether
    higher is better."""
    _check_task(task, TASKS)
    if data_format == "preference":
        return "preference_accuracy", True
    if task == "classification":
        return "accuracy", True
    return "loss", False
