"""Canary exposure for language models (Carlini, Liu, Erlingsson, Kos & Song, "The Secret Sharer:
Evaluating and Testing Unintended Memorization in Neural Networks", USENIX Security 2019).

``eval.canaries`` inserts ``count`` random secrets, each ``repeats`` times, into one client's
training data: ``<prefix> d1 d2 ... dL`` with digits drawn uniformly (``|R| = 10^L`` possible
secrets). After training, each canary's log-perplexity given the prefix is ranked among
``candidates`` random secrets of the same form: exposure ``= log2 |R| - log2 rank`` with the rank
in ``R`` estimated from the sampled candidates (the sampling estimate of Section 4.2), reported
next to the estimated extraction rank and whether greedy decoding from the prefix reproduces the
secret. The canaries are a function of the run's seed, so the attack regenerates them from the
config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedfm.config import CanaryConfig

PREFIX = "my secret number is"
DIGITS = [str(d) for d in range(10)]


@dataclass(frozen=True)
class Canary:
    prefix: list[int]
    secret: list[int]


def digit_ids(tokenizer: Any) -> list[int]:
    """One token id per digit 0-9 (the tokenizer's own single-digit tokens)."""
    ids = []
    for digit in DIGITS:
        encoded = tokenizer(digit, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            raise ValueError(f"eval.canaries: the tokenizer splits the digit {digit!r} into "
                             f"{len(encoded)} tokens; canaries need single-token digits")
        ids.append(int(encoded[0]))
    if len(set(ids)) != 10:
        raise ValueError("eval.canaries: the tokenizer maps two digits to the same token")
    return ids


def make_canaries(cfg: CanaryConfig, tokenizer: Any, seed: int) -> list[Canary]:
    digits = digit_ids(tokenizer)
    prefix = [int(t) for t in tokenizer(PREFIX, add_special_tokens=True)["input_ids"]]
    rng = np.random.default_rng([seed, 0xCA7A])
    return [Canary(prefix, [digits[d] for d in rng.integers(0, 10, cfg.secret_length)])
            for _ in range(cfg.count)]


def canary_examples(canaries: list[Canary], repeats: int, eos_id: int | None) -> list[dict]:
    """Training examples (causal LM: every token supervised), each canary ``repeats`` times."""
    rows = []
    for canary in canaries:
        ids = canary.prefix + canary.secret + ([eos_id] if eos_id is not None else [])
        rows.extend({"input_ids": list(ids), "labels": list(ids)} for _ in range(repeats))
    return rows


@torch.no_grad()
def secret_log_perplexity(model: torch.nn.Module, prefix: list[int],
                          secrets: torch.Tensor) -> torch.Tensor:
    """``-sum log p(secret | prefix)`` in bits for each row of ``secrets`` ([N, L])."""
    rows = torch.cat([torch.tensor(prefix).expand(len(secrets), -1), secrets], dim=1)
    logits = model(input_ids=rows, use_cache=False).logits.float()
    logits = logits[:, -rows.shape[1]:]  # prompt-learning adapters prepend virtual tokens
    start = len(prefix)
    log_probs = F.log_softmax(logits[:, start - 1:-1], dim=-1)
    picked = log_probs.gather(2, secrets[:, :, None]).squeeze(2)
    return -picked.sum(1) / math.log(2)


def exposure(model: torch.nn.Module, canaries: list[Canary], cfg: CanaryConfig,
             digit_tokens: list[int], seed: int) -> list[dict[str, float]]:
    was_training = model.training
    model.eval()
    try:
        rng = np.random.default_rng([seed, 0xE9])
        alphabet = torch.tensor(digit_tokens)
        space = 10 ** cfg.secret_length
        found = []
        for canary in canaries:
            secret = torch.tensor(canary.secret)
            draws = alphabet[torch.from_numpy(
                rng.integers(0, 10, (cfg.candidates, cfg.secret_length)))]
            draws = draws[~(draws == secret).all(1)]  # other secrets only
            scores = torch.cat([secret_log_perplexity(model, canary.prefix, secret[None]),
                                _batched(model, canary.prefix, draws)])
            rank = int((scores[1:] < scores[0]).sum()) + 1  # 1: the most likely
            fraction = rank / (len(draws) + 1)
            found.append({"exposure_bits": math.log2(space) - math.log2(max(1.0,
                                                                          fraction * space)),
                          "rank_in_candidates": float(rank),
                          "candidates": float(len(draws)),
                          "estimated_extraction_rank": float(max(1, round(fraction * space))),
                          "greedy_extracted": float(_greedy(model, canary)),
                          "max_exposure_bits": math.log2(space)})
        return found
    finally:
        model.train(was_training)


def _batched(model: torch.nn.Module, prefix: list[int], secrets: torch.Tensor,
             size: int = 256) -> torch.Tensor:
    return torch.cat([secret_log_perplexity(model, prefix, secrets[i:i + size])
                      for i in range(0, len(secrets), size)])


@torch.no_grad()
def _greedy(model: torch.nn.Module, canary: Canary) -> bool:
    tokens = list(canary.prefix)
    for _ in canary.secret:
        logits = model(input_ids=torch.tensor([tokens]), use_cache=False).logits
        tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(canary.prefix):] == canary.secret
