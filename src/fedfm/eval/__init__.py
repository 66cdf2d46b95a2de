"""Evaluation: metrics (loss, perplexity, accuracy, macro-F1, ROUGE-L) and evaluators (global and
per-client loss/accuracy, greedy-generation ROUGE-L, fairness across clients)."""

from fedfm.eval.evaluator import (
    evaluate_examples,
    fairness_summary,
    generate_rouge,
    primary_metric,
)
from fedfm.eval.metrics import accuracy, macro_f1, perplexity, rouge_l

__all__ = [
    "accuracy",
    "evaluate_examples",
    "fairness_summary",
    "generate_rouge",
    "macro_f1",
    "perplexity",
    "primary_metric",
    "rouge_l",
]
