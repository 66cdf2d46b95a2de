"""Personalization: each client ends with a model of its own.

FedPer and FedRep (personal heads, ``heads``), Ditto (a proximally regularised personal
model, ``ditto``) and dual LoRA adapters (a federated and a local one, ``dual_lora``).
Every client half has ``personal_state(global_state, client_state, extras)``: the model the
personalized evaluation measures (``eval.personalized`` in metrics.jsonl, ``personal_*`` in the
run summary). Local fine-tuning after federation, for any algorithm, is ``eval.finetune_steps``.
Importing this package registers the algorithms."""

from fedfm.adaptability.personalization import ditto, dual_lora, heads  # noqa: F401
from fedfm.adaptability.personalization.check import (
    PERSONALIZATION_ALGORITHMS,
    check_personalization,
)

__all__ = ["PERSONALIZATION_ALGORITHMS", "check_personalization"]
