"""Offsite tuning (FedOT): clients tune adapters against a lossy emulator, never the full model.

Xiao, Lin & Han, "Offsite-Tuning: Transfer Learning without Full Model", arXiv:2302.04870, 2023;
federated as FedOT in Kuang et al., "FederatedScope-LLM: A Comprehensive Package for Fine-tuning
Large Language Models in Federated Learning", KDD 2024.

The model's owner keeps the full model. Clients get an *emulator*: the embeddings, the bottom
``offsite.bottom`` and top ``offsite.top`` transformer blocks (the only ones whose LoRA adapters
train), a uniformly spaced ``1 - offsite.drop`` share of the middle blocks (layer drop), the final
norm and the head. Clients train their adapters through the emulator; the adapters are named as in
the full model, so the global State, checkpoints and exports are the full model's, and the owner
plugs them back into the full model for evaluation. Each eval round reports the full model's
metrics and the emulator's (``emulator_loss``, ``emulator_accuracy``, ...) side by side.

In simulation the emulator is a view of the runtime's one base model: a shallow copy of the
containers on the path to the block list, holding only the kept blocks, sharing every tensor with
the full model (no weight is copied); the dropped blocks are not reachable from it. Attention
modules of renumbered blocks are shallow-copied too with their ``layer_idx`` renumbered (KV caches
index layers by it), and the emulator's config has the reduced ``num_hidden_layers`` (and
``layer_types``). ``save_emulator`` writes the emulator as a loadable Hugging Face model directory:
what a real owner would ship instead of the full model.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedfm.algorithms.fedavg import build_delta_server
from fedfm.algorithms.local_train import train_locally
from fedfm.config import AlgorithmConfig, ConfigError, LocalTrainingConfig, OffsiteConfig, RunConfig
from fedfm.core import state as state_ops
from fedfm.core.algorithm import Algorithm, ClientContext, ClientResult, ServerRule, ServerWrapper
from fedfm.core.registries import ALGORITHMS
from fedfm.core.registry import MethodInfo
from fedfm.core.state import State
from fedfm.core.update import Broadcast, ClientUpdate
from fedfm.models import find_blocks, get_state, set_state

EMULATOR_VIEW = "emulator"  # the workload's view name: metrics "emulator_loss", ...
ALLOWED_ADAPTERS = ("lora",)
_PER_LAYER_LISTS = ("layer_types",)  # config lists with one entry per block
_PEFT_ONLY = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.",
              ".lora_magnitude_vector.", ".modules_to_save.")
_PEFT_WRAPS = (".base_layer.", ".original_module.")


# --------------------------------------------------------------------------- which blocks


def emulator_layers(num_blocks: int, bottom: int, top: int, drop: float) -> list[int]:
    """Indices of the full model's blocks the emulator keeps, ascending: the bottom ``bottom``
    and top ``top`` always, and of the ``m`` middle blocks ``round((1 - drop) * m)`` (half up),
    spaced uniformly from the first middle block to the last (``numpy.linspace``, rounded half
    up; a single one is the centre)."""
    if bottom < 1 or top < 1:
        raise ValueError(f"bottom and top must be >= 1 (got {bottom}, {top})")
    if bottom + top >= num_blocks:
        raise ValueError(f"bottom + top = {bottom + top} must be below the {num_blocks} blocks")
    if not 0.0 <= drop < 1.0:
        raise ValueError(f"drop must be in [0, 1) (got {drop})")
    middle = num_blocks - bottom - top
    keep = min(middle, math.floor((1.0 - drop) * middle + 0.5 + 1e-9))
    first, last = bottom, bottom + middle - 1
    spots = np.linspace(first, last, keep) if keep > 1 else np.full(keep, (first + last) / 2)
    kept_middle = [int(math.floor(x + 0.5)) for x in spots]
    return [*range(bottom), *kept_middle, *range(num_blocks - top, num_blocks)]


def tuned_layers(num_blocks: int, bottom: int, top: int) -> list[int]:
    """The blocks whose adapters train: the bottom ``bottom`` and the top ``top``."""
    return [*range(bottom), *range(num_blocks - top, num_blocks)]


# --------------------------------------------------------------------------- model surgery


def _shallow(module: torch.nn.Module) -> torch.nn.Module:
    """A new module object sharing ``module``'s parameters, buffers and children, with its own
    child table and hook tables (so replacing a child or adding a hook leaves ``module`` as is)
    and no compiled call of ``module``'s."""
    twin = copy.copy(module)
    twin.__dict__["_modules"] = dict(module._modules)
    for key, value in module.__dict__.items():
        if "hooks" in key and isinstance(value, dict):
            twin.__dict__[key] = type(value)(value)
    if module.__dict__.get("_compiled_call_impl") is not None:
        twin.__dict__["_compiled_call_impl"] = None
        twin.compile(dynamic=True)  # the original's compiled call would run the original
    return twin


def _renumbered(module: torch.nn.Module, index: int) -> torch.nn.Module:
    """``module`` whose submodules with a ``layer_idx`` (attention: KV caches index layers by
    it) say ``index``: shallow copies along the paths that change, ``module`` if none does."""
    changed = {name: twin for name, child in module._modules.items()
               if child is not None and (twin := _renumbered(child, index)) is not child}
    own = module.__dict__.get("layer_idx")
    renumber = isinstance(own, int) and own != index
    if not changed and not renumber:
        return module
    twin = _shallow(module)
    twin._modules.update(changed)
    if renumber:
        twin.__dict__["layer_idx"] = index
    return twin


def emulator_config(config: Any, kept: Sequence[int], num_blocks: int) -> Any:
    """A copy of a transformers config for the blocks ``kept`` (of ``num_blocks``): reduced
    ``num_hidden_layers`` / ``num_layers`` and per-layer lists cut to the kept ones."""
    reduced = copy.deepcopy(config)
    count = len(kept)
    if hasattr(reduced, "num_hidden_layers"):
        reduced.num_hidden_layers = count
    if "num_layers" in reduced.__dict__:
        reduced.num_layers = count
    for key in _PER_LAYER_LISTS:
        values = getattr(reduced, key, None)
        if isinstance(values, list) and len(values) == num_blocks:
            setattr(reduced, key, [values[i] for i in kept])
    return reduced


def _with_blocks(module: torch.nn.Module, path: list[str], blocks: torch.nn.ModuleList,
                 configs: dict[int, Any]) -> torch.nn.Module:
    """Shallow copies of the containers along ``path`` ending in ``blocks``; a container's
    config is swapped for its reduced one (``configs``: id of the full config -> reduced)."""
    if not path:
        return blocks
    twin = _shallow(module)
    twin._modules[path[0]] = _with_blocks(module._modules[path[0]], path[1:], blocks, configs)
    config = module.__dict__.get("config")
    if config is not None and id(config) in configs:
        twin.__dict__["config"] = configs[id(config)]
    return twin


def _configs_on_path(model: torch.nn.Module, path: list[str]) -> list[Any]:
    found: list[Any] = []
    module = model
    for name in path:
        config = module.__dict__.get("config")
        if config is not None and hasattr(config, "to_dict") and all(
                config is not seen for seen in found):
            found.append(config)
        module = module._modules[name]
    return found


def build_emulator(model: torch.nn.Module, kept: Sequence[int]) -> torch.nn.Module:
    """A smaller model whose block list holds only the blocks ``kept`` (ascending), sharing
    every module and tensor with ``model`` (embeddings, kept blocks, final norm, head, adapters):
    no weight is copied. Works on transformers models and peft wrappers of them."""
    list_name, blocks = find_blocks(model)
    if list(kept) != sorted(set(kept)) or not kept or kept[-1] >= len(blocks) or kept[0] < 0:
        raise ValueError(f"kept blocks {list(kept)} are not ascending indices into the "
                         f"{len(blocks)} blocks of {list_name}")
    path = list_name.split(".")
    configs = {id(c): emulator_config(c, kept, len(blocks)) for c in _configs_on_path(model, path)}
    chosen = torch.nn.ModuleList([_renumbered(blocks[i], j) for j, i in enumerate(kept)])
    return _with_blocks(model, path, chosen, configs)


def full_name(name: str, list_name: str, kept: Sequence[int]) -> str:
    """The full model's name of emulator parameter ``name`` (block ``j`` is block ``kept[j]``)."""
    return _rename_block(name, list_name, lambda j: kept[j])


def emulator_name(name: str, list_name: str, kept: Sequence[int]) -> str:
    """The emulator's name of full-model parameter ``name`` (a kept block's)."""
    position = {block: j for j, block in enumerate(kept)}
    return _rename_block(name, list_name, lambda i: position[i])


def _rename_block(name: str, list_name: str, renumber: Any) -> str:
    prefix = f"{list_name}."
    if not name.startswith(prefix):
        return name
    index, _, rest = name[len(prefix):].partition(".")
    return f"{prefix}{renumber(int(index))}.{rest}"


def restrict_adapters(model: torch.nn.Module, tuned: Sequence[int]) -> list[str]:
    """Freeze every trainable parameter inside a block not in ``tuned``; returns their names
    (they stay at their initialisation and leave the communicated State)."""
    list_name, _ = find_blocks(model)
    prefix, keep = f"{list_name}.", set(tuned)
    frozen = []
    for name, param in model.named_parameters():
        if (param.requires_grad and name.startswith(prefix)
                and int(name[len(prefix):].split(".", 1)[0]) not in keep):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


@dataclasses.dataclass
class Emulator:
    """The emulator of ``full`` keeping blocks ``kept``, and its State in full-model names."""

    full: torch.nn.Module
    model: torch.nn.Module
    kept: list[int]
    list_name: str

    @classmethod
    def of(cls, full: torch.nn.Module, kept: Sequence[int]) -> Emulator:
        list_name, _ = find_blocks(full)
        emulator = cls(full, build_emulator(full, kept), list(kept), list_name)
        emulator.check_names()
        return emulator

    def check_names(self) -> None:
        """The translated names are the full model's names of the very same tensors, and every
        trainable tensor of the full model is in the emulator."""
        by_id = {id(p): n for n, p in self.full.named_parameters()}
        names = []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                translated = full_name(name, self.list_name, self.kept)
                if by_id.get(id(param)) != translated:
                    raise ValueError(f"emulator parameter {name} is not the full model's "
                                     f"{translated}")
                names.append(translated)
        held = set(names)
        outside = [n for n, p in self.full.named_parameters() if p.requires_grad
                   and n not in held]
        if outside:
            raise ValueError(f"trainable parameters outside the emulator: {outside[:3]}")

    def get_state(self) -> State:
        """The emulator's trainable tensors, keyed by their full-model names."""
        return OrderedDict((full_name(k, self.list_name, self.kept), v)
                           for k, v in get_state(self.model).items())

    def set_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Write a State in full-model names into the emulator's trainable tensors."""
        set_state(self.model, OrderedDict((emulator_name(k, self.list_name, self.kept), v)
                                          for k, v in state.items()))


def prepare_offsite(model: torch.nn.Module, cfg: OffsiteConfig) -> Emulator:
    """Restrict ``model``'s trainable adapters to the bottom/top blocks and build its emulator.
    A ConfigError when ``bottom + top`` leaves no middle block to drop."""
    list_name, blocks = find_blocks(model)
    count = len(blocks)
    if cfg.bottom + cfg.top >= count:
        raise ConfigError(f"invalid config: algorithm.offsite.bottom ({cfg.bottom}) + "
                          f"algorithm.offsite.top ({cfg.top}) must be below the model's "
                          f"{count} blocks ({list_name}), so that middle blocks remain to "
                          f"emulate")
    restrict_adapters(model, tuned_layers(count, cfg.bottom, cfg.top))
    return Emulator.of(model, emulator_layers(count, cfg.bottom, cfg.top, cfg.drop))


# --------------------------------------------------------------------------- export


def base_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The transformers model inside ``model`` as a plain state dict: peft's adapter tensors
    (LoRA factors, trained head copies) left out, wrapped base layers under their own names."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    plain: dict[str, torch.Tensor] = {}
    for name, tensor in base.state_dict().items():
        if any(marker in f".{name}" for marker in _PEFT_ONLY):
            continue
        for marker in _PEFT_WRAPS:
            name = name.replace(marker, ".")
        plain[name] = tensor
    return plain


def save_emulator(source: Any, directory: str | Path, *, kept: Sequence[int] | None = None,
                  tokenizer: Any = None) -> Path:
    """Write the emulator as a Hugging Face model directory (``save_pretrained``: config with
    the reduced block count, weights of the kept blocks only, and the tokenizer) that
    ``fedfm.models.load_model(ModelConfig(name=directory))`` loads: what an owner ships to
    clients instead of the full model. ``source`` is a workload of a fedot run (its model,
    offsite config and tokenizer) or a model with ``kept`` given (and ``tokenizer``, which
    ``load_model`` needs beside the weights). Adapters are not included: they travel as State."""
    if isinstance(source, torch.nn.Module):
        if kept is None:
            raise ValueError("save_emulator(model, ...) needs kept= (the blocks to keep)")
        model = source
    else:
        model, tokenizer = source.model, tokenizer or source.bundle.tokenizer
        if kept is None:
            cfg = source.config.algorithm.offsite
            kept = emulator_layers(len(find_blocks(model)[1]), cfg.bottom, cfg.top, cfg.drop)
    emulator = build_emulator(model, kept)
    base = emulator.get_base_model() if hasattr(emulator, "get_base_model") else emulator
    with torch.device("meta"):
        plain = type(base)(base.config)
    plain.load_state_dict(base_state_dict(emulator), strict=True, assign=True)
    out = Path(directory)
    plain.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    (out / "offsite.json").write_text(json.dumps({"kept_blocks": list(kept)}) + "\n")
    return out


# --------------------------------------------------------------------------- validation


def check_offsite(config: RunConfig) -> None:
    """Reject what offsite tuning cannot run, before anything is loaded (the block count of a
    preset or local model is known here; of a hub model, only when it is loaded)."""
    if config.algorithm.name != "fedot":
        return
    kind = config.adapter.kind
    if kind not in ALLOWED_ADAPTERS:
        raise ConfigError(f"invalid config: algorithm 'fedot' tunes adapters on the emulator's "
                          f"bottom and top blocks and plugs them into the full model; "
                          f"adapter.kind is {kind!r} (allowed: {', '.join(ALLOWED_ADAPTERS)})")
    if config.privacy.dp_sgd is not None:
        raise ConfigError("invalid config: algorithm 'fedot' cannot be combined with "
                          "privacy.dp_sgd: DP-SGD's per-example training runs on the runtime's "
                          "full model, and fedot clients train the emulator")
    if config.privacy.client_dp is not None:
        raise ConfigError("invalid config: algorithm 'fedot' cannot be combined with "
                          "privacy.client_dp: DP-FedAvg's server replaces fedot's, which binds "
                          "the emulator to the model and restricts the adapters to its bottom "
                          "and top blocks")
    task = _task(config)
    if task not in ("causal_lm", "classification"):
        raise ConfigError(f"invalid config: algorithm 'fedot' emulates one stack of blocks "
                          f"(causal_lm or classification models); this model's task is {task!r}")
    count = known_block_count(config)
    offsite = config.algorithm.offsite
    if count is not None and offsite.bottom + offsite.top >= count:
        raise ConfigError(f"invalid config: algorithm.offsite.bottom ({offsite.bottom}) + "
                          f"algorithm.offsite.top ({offsite.top}) must be below the model's "
                          f"{count} blocks, so that middle blocks remain to emulate")


def _task(config: RunConfig) -> str:
    from fedfm.models import PRESETS

    preset = PRESETS.get(config.model.name)
    return config.model.task or (preset.task if preset is not None else "causal_lm")


def known_block_count(config: RunConfig) -> int | None:
    """The model's number of blocks when it is known without loading weights: a tiny preset's
    config (with ``model.config_overrides``) or a local directory's ``config.json``."""
    from fedfm.models import PRESETS

    overrides = config.model.config_overrides
    preset = PRESETS.get(config.model.name)
    if preset is not None and preset.make_config is not None:
        made = preset.make_config()
        for key, value in overrides.items():
            setattr(made, key, value)
        count = getattr(made, "num_hidden_layers", None)
        return count if isinstance(count, int) else None
    path = Path(config.model.name).expanduser() / "config.json"
    if preset is not None or not path.is_file():
        return None
    values = {**json.loads(path.read_text()), **overrides}
    found = [values[key] for key in ("num_hidden_layers", "n_layer", "num_layers")
             if isinstance(values.get(key), int)]
    return found[0] if found else None


# --------------------------------------------------------------------------- the two halves


class FedOTClient:
    """Trains the adapters through the emulator (``train_locally`` on it) and sends
    ``local - global`` keyed by full-model names. Not a ``DeltaClient``: the batched runtime,
    which trains delta clients on the full model, runs fedot through the local runtime."""

    def __init__(self, local: LocalTrainingConfig, cfg: OffsiteConfig) -> None:
        self.local = local
        self.cfg = cfg
        self.emulator: Emulator | None = None

    def bind(self, emulator: Emulator) -> None:
        self.emulator = emulator

    def emulator_for(self, model: torch.nn.Module) -> Emulator:
        """The emulator of the runtime's model (built once per model)."""
        if self.emulator is None or self.emulator.full is not model:
            self.emulator = prepare_offsite(model, self.cfg)
        return self.emulator

    def context(self, ctx: ClientContext) -> ClientContext:
        """The client's context with the emulator in place of the full model."""
        emulator = self.emulator_for(ctx.model)
        return dataclasses.replace(ctx, model=emulator.model, get_state=emulator.get_state,
                                   set_state=emulator.set_state)

    def run(self, ctx: ClientContext, broadcast: Broadcast) -> ClientResult:
        local_ctx = self.context(ctx)
        local_ctx.set_state(broadcast.global_state)
        result = train_locally(local_ctx, self.local)
        delta = state_ops.sub(local_ctx.get_state(), broadcast.global_state)
        blocks = len(self.emulator_for(ctx.model).kept)
        metrics = {**result.metrics(), "emulator_blocks": float(blocks)}
        return ClientResult(ClientUpdate(client_id=ctx.client_id, payload=delta,
                                         num_examples=len(ctx.train_examples), metrics=metrics))


class FedOTServer(ServerWrapper):
    """FedAvg / FedOpt of the adapter deltas; binds the workload: restricts the adapters to the
    bottom/top blocks, builds the emulator for its client half and registers it as an
    evaluation view (``emulator_*`` metrics beside the full model's)."""

    def __init__(self, inner: ServerRule, client: FedOTClient, cfg: OffsiteConfig) -> None:
        super().__init__(inner)
        self.client = client
        self.cfg = cfg

    def bind_workload(self, workload: Any) -> None:
        emulator = prepare_offsite(workload.model, self.cfg)
        self.client.bind(emulator)
        workload.views[EMULATOR_VIEW] = emulator.model


@ALGORITHMS.register("fedot", MethodInfo(
    "trust.ip.offsite",
    "Offsite-Tuning: Transfer Learning without Full Model (Xiao, Lin & Han, arXiv 2023); "
    "FedOT in FederatedScope-LLM (Kuang et al., KDD 2024)",
    "algorithm: {name: fedot, offsite: {drop: 0.5, bottom: 1, top: 1}}",
    "clients tune bottom/top-block LoRA on a layer-dropped emulator; full model kept by the "
    "owner, evaluated with the adapters plugged in"))
def build_fedot(cfg: AlgorithmConfig, num_clients: int) -> Algorithm:
    client = FedOTClient(cfg.local, cfg.offsite)
    return Algorithm(name="fedot", client=client,
                     server=FedOTServer(build_delta_server(cfg), client, cfg.offsite),
                     info={"offsite": cfg.offsite.model_dump()})
