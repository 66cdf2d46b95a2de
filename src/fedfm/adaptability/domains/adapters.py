"""Domain LoRA adapters beside the run's shared adapter, all in one ``peft`` model.

The run's adapter (peft's ``default``) is the *shared* adapter; ``add_domain_adapters`` adds one
LoRA adapter per domain (``domain_0``, ``domain_1``, ... in the order of the domain names) with
the same rank, alpha and target modules, and without a classifier copy of its own (the head stays
shared). Every adapter is active, so a LoRA layer computes
``W x + s * B_shared A_shared x + sum_d s * B_d A_d x``; a domain adapter whose ``B`` is zero (its
initialisation) adds exactly nothing. Every adapter parameter stays trainable, so each one is in
the communicated State under its own name (``...lora_A.domain_1.weight``).

``active_adapters`` restricts the forward pass to some adapters for a block (a client trains the
shared adapter and its own domain's) without changing which parameters the State holds: the
others take no part in the forward pass, so they get no gradient and the optimizer skips them.

``DomainRouter`` is the learned alternative to picking a domain by its label: a linear gate over
the mean-pooled input embeddings (padding excluded) gives softmax weights over the domain
adapters per input, and each domain adapter's output is scaled by its weight, in the spirit of
Mixture of LoRA Experts (Wu, Huang & Wei, ICLR 2024). The gate sits in the model as
``domain_router`` and is communicated like any adapter tensor.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer

from fedfm.core.state import State
from fedfm.models import seeded

SHARED = "default"  # peft's name of the run's adapter
DOMAIN_PREFIX = "domain_"
ROUTER_MODULE = "domain_router"
_DOMAIN_KEY = re.compile(r"\.lora_[A-Za-z_]+\.(domain_\d+)(?:\.|$)")


def adapter_name(index: int) -> str:
    return f"{DOMAIN_PREFIX}{index}"


def adapter_index(name: str) -> int:
    return int(name[len(DOMAIN_PREFIX):])


def domain_of_key(key: str) -> str | None:
    """The domain adapter a State key belongs to (``domain_3``), or None for a shared key."""
    found = _DOMAIN_KEY.search(key)
    return found.group(1) if found else None


def split_keys(state: Mapping[str, Any]) -> tuple[list[str], dict[str, list[str]]]:
    """(shared keys, {domain adapter: its keys}), each in the State's order."""
    shared: list[str] = []
    domains: dict[str, list[str]] = {}
    for key in state:
        name = domain_of_key(key)
        if name is None:
            shared.append(key)
        else:
            domains.setdefault(name, []).append(key)
    return shared, domains


def with_adapter(global_state: Mapping[str, torch.Tensor], adapter: Mapping[str, torch.Tensor]
                 ) -> State:
    """``global_state`` with the tensors of ``adapter`` in place of its own."""
    return OrderedDict((k, adapter.get(k, v)) for k, v in global_state.items())


def tuner_layers(model: torch.nn.Module) -> list[BaseTunerLayer]:
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def add_domain_adapters(model: torch.nn.Module, count: int, *, seed: int) -> list[str]:
    """Add ``count`` domain LoRA adapters shaped like the shared one, all active and trainable;
    their ``A`` is drawn under ``seed``, their ``B`` is zero. Returns their names."""
    if not isinstance(model, PeftModel) or SHARED not in model.peft_config:
        raise TypeError("domain adapters are added beside a peft LoRA adapter named 'default'")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    # no classifier copy per domain: the head (modules_to_save) stays the shared adapter's
    config = dataclasses.replace(model.peft_config[SHARED], modules_to_save=None)
    names = [adapter_name(i) for i in range(count)]
    with seeded(seed):
        for name in names:
            # PeftModel's own add_adapter: the sequence-classification subclass would give each
            # new adapter a classifier copy of its own
            PeftModel.add_adapter(model, name, copy.deepcopy(config))
    for layer in tuner_layers(model):
        layer.set_adapter([SHARED, *names])
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable or domain_of_key(name) is not None)
    return names


@contextmanager
def active_adapters(model: torch.nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Only ``names`` take part in the forward pass inside the block; which parameters are
    trainable (the State's keys) does not change."""
    layers = tuner_layers(model)
    if not layers:
        raise TypeError("the model has no peft adapter layers")
    before = list(layers[0].active_adapters)
    flags = [(param, param.requires_grad) for param in model.parameters()]
    _activate(layers, list(names), flags)
    try:
        yield
    finally:
        _activate(layers, before, flags)


def _activate(layers: list[BaseTunerLayer], names: list[str],
              flags: list[tuple[torch.nn.Parameter, bool]]) -> None:
    for layer in layers:
        layer.set_adapter(names)  # peft also flips requires_grad: put it back
    for param, flag in flags:
        param.requires_grad_(flag)


class DomainRouter(torch.nn.Module):
    """Softmax gate over the domain adapters from the mean-pooled input embeddings.

    The weight and bias start at zero, so every domain adapter starts with weight ``1/D``.
    ``route`` runs as a forward hook of the input embedding layer and keeps the batch's weights
    for the domain adapters' hooks (``scale``) that run later in the same forward pass.
    """

    def __init__(self, hidden_size: int, num_domains: int, pad_token_id: int | None) -> None:
        super().__init__()
        self.gate = torch.nn.Linear(hidden_size, num_domains)
        torch.nn.init.zeros_(self.gate.weight)
        torch.nn.init.zeros_(self.gate.bias)
        self.pad_token_id = pad_token_id
        self.weights: torch.Tensor | None = None

    def route(self, input_ids: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        if self.pad_token_id is None:
            keep = torch.ones(input_ids.shape, dtype=embeddings.dtype, device=embeddings.device)
        else:
            keep = (input_ids != self.pad_token_id).to(embeddings.dtype)
        keep = keep.unsqueeze(-1)
        pooled = (embeddings * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)
        self.weights = torch.softmax(self.gate(pooled.to(self.gate.weight.dtype)).float(), dim=-1)
        return self.weights

    def scale(self, index: int, output: torch.Tensor) -> torch.Tensor:
        weights = self.weights
        if weights is None or weights.shape[0] != output.shape[0]:
            raise RuntimeError("domain router: a domain adapter ran on a batch the router did "
                               "not see (its layer must get the batch dimension first)")
        shape = (weights.shape[0],) + (1,) * (output.dim() - 1)
        return output * weights[:, index].reshape(shape).to(output.dtype)


def attach_router(model: torch.nn.Module, names: Sequence[str], pad_token_id: int | None
                  ) -> DomainRouter:
    """Put a trainable ``DomainRouter`` into ``model`` and hook it in: the input embedding
    layer computes the weights, each domain adapter's ``lora_B`` output is scaled by its own."""
    embeddings = model.get_input_embeddings()
    hidden = getattr(embeddings, "embedding_dim", None)
    if not isinstance(hidden, int):
        raise TypeError("the domain router needs an input embedding layer (nn.Embedding)")
    router = DomainRouter(hidden, len(names), pad_token_id)
    model.add_module(ROUTER_MODULE, router)
    embeddings.register_forward_hook(partial(_route_hook, router))
    for layer in tuner_layers(model):
        lora_b = getattr(layer, "lora_B", {})
        for index, name in enumerate(names):
            if name not in lora_b:
                raise TypeError(f"domain router: {type(layer).__name__} holds no LoRA B "
                                f"module for {name} (embedding targets cannot be routed)")
            lora_b[name].register_forward_hook(partial(_scale_hook, router, index))
    return router


def _route_hook(router: DomainRouter, module: torch.nn.Module, args: tuple[Any, ...],
                output: torch.Tensor) -> None:
    router.route(args[0], output)


def _scale_hook(router: DomainRouter, index: int, module: torch.nn.Module,
                args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    return router.scale(index, output)
