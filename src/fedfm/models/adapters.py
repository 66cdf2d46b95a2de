"""Parameter-efficient fine-tuning: which parameters train, and reading/writing them as a State.

``apply_adapter(bundle, AdapterConfig(...), seed=...)`` leaves exactly the communicated
parameters trainable (``requires_grad``) and freezes everything else. The methods, by family:

- reparameterization: LoRA (Hu et al., ICLR 2022), via ``peft``;
- additive: (IA)^3 (Liu et al., NeurIPS 2022), prompt tuning (Lester et al., EMNLP 2021) and
  prefix tuning (Li & Liang, ACL 2021), via ``peft``;
- selective: BitFit (Ben Zaken et al., ACL 2022: all bias terms), LayerNorm/RMSNorm weights and
  biases, the last N transformer blocks, the classifier head alone, and full fine-tuning.

For classification with ``train_head`` the classifier head (``classifier`` / ``score``) trains
too; ``peft`` does this through ``modules_to_save``, so a PEFT model's head is named e.g.
``base_model.model.classifier.modules_to_save.default.weight``. Adapter initialisation is drawn
under ``seed`` with the caller's RNG state restored. ``peft`` injects its layers into the base
model in place: the bundle passed in must not be used unadapted afterwards.

``get_state`` / ``set_state`` read and write the trainable parameters, keyed by their names in
``model.named_parameters()`` (so PEFT keys keep peft's ``.default.`` adapter name), without ever
touching the frozen base weights.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Mapping

import torch
from peft import (
    IA3Config,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    PromptTuningInit,
    TaskType,
    get_peft_model,
)
from peft.utils import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING

from fedfm.config import AdapterConfig
from fedfm.core.registries import ADAPTERS
from fedfm.core.registry import MethodInfo
from fedfm.core.state import State, check_compatible
from fedfm.models.loader import ModelBundle, seeded

PEFT_KINDS = ("lora", "ia3", "prompt_tuning", "prefix_tuning")
SELECTIVE_KINDS = ("bitfit", "layernorm", "last_layers", "head", "full")
LORA_A, LORA_B = ".lora_A.", ".lora_B."  # in peft's parameter names
DEFAULT_LORA_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
    "t5": ["q", "v"],
    "vit": ["q_proj", "v_proj", "query", "value"],  # transformers 5.x / 4.x names
    "whisper": ["q_proj", "v_proj"],
}
HEAD_MODULE_NAMES = ("classifier", "score", "classification_head")
_PEFT_TASK_TYPES = {
    "causal_lm": TaskType.CAUSAL_LM,
    "classification": TaskType.SEQ_CLS,
    "seq2seq": TaskType.SEQ_2_SEQ_LM,
}
# (kind, family, task) combinations that build but fail at forward time with peft 0.21 and
# transformers 5.x; rejected up front (see the preset x adapter matrix in tests/test_models.py).
UNSUPPORTED: dict[tuple[str, str, str], str] = {
    ("prompt_tuning", "t5", "classification"):
        "T5ForSequenceClassification does not accept input embeddings, which prompt tuning needs",
    ("prefix_tuning", "t5", "classification"):
        "T5ForSequenceClassification does not handle prefix key/values (attention mask mismatch)",
    # Decoder-only classifiers pool the last non-pad token; with prompt tuning peft passes
    # inputs_embeds, so padding cannot be located and a pad position would be classified.
    ("prompt_tuning", "llama", "classification"):
        "decoder-only classification pools the last token, which prompt tuning's input "
        "embeddings hide behind padding (use lora, ia3 or prefix_tuning)",
    ("prompt_tuning", "gpt2", "classification"):
        "decoder-only classification pools the last token, which prompt tuning's input "
        "embeddings hide behind padding (use lora, ia3 or prefix_tuning)",
}
_CONV1D_FAMILIES = ("gpt2",)  # fused Conv1D projections: weights stored (in, out)
# peft's seq2seq wrapper passes input_ids=None, which Whisper's decoder receives twice; the
# task-less PeftModel forwards input_features and labels untouched
_NO_PEFT_TASK_TYPE = ("whisper",)


class AdapterError(ValueError):
    """An adapter kind cannot be applied to this model; the message names both."""


def lora_pairs(keys: list[str]) -> list[tuple[str, str]]:
    """(A key, B key) of every LoRA layer whose both factors are in ``keys``."""
    present = set(keys)
    return [(key, key.replace(LORA_A, LORA_B)) for key in keys
            if LORA_A in key and key.replace(LORA_A, LORA_B) in present]


def apply_adapter(bundle: ModelBundle, cfg: AdapterConfig, *, seed: int = 0) -> ModelBundle:
    """Return a bundle whose model trains exactly the parameters ``cfg`` communicates."""
    if isinstance(bundle.model, PeftModel):
        raise AdapterError(f"model {bundle.source!r} already carries a peft adapter; "
                           "load the base model again to apply another one")
    reason = UNSUPPORTED.get((cfg.kind, bundle.family, bundle.task))
    if reason is not None:
        raise _unsupported(cfg, bundle, reason)
    model = ADAPTERS.get(cfg.kind)(bundle, cfg, seed)
    if not trainable_names(model):
        raise _unsupported(cfg, bundle, "no parameter would be trained")
    return dataclasses.replace(bundle, model=model)


def _unsupported(cfg: AdapterConfig, bundle: ModelBundle, reason: str) -> AdapterError:
    return AdapterError(
        f"adapter.kind={cfg.kind!r} is not supported for model family {bundle.family!r} "
        f"(model {bundle.source!r}, task {bundle.task}): {reason}"
    )


# --------------------------------------------------------------------------- peft


def _apply_peft(bundle: ModelBundle, cfg: AdapterConfig, seed: int) -> torch.nn.Module:
    peft_config = build_peft_config(bundle, cfg)
    try:
        with seeded(seed), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            model = get_peft_model(bundle.model, peft_config)
    except (ValueError, TypeError, KeyError, AttributeError, NotImplementedError) as exc:
        raise _unsupported(cfg, bundle, f"peft refused it ({_first_line(exc)})") from exc
    if bundle.task == "classification" and not cfg.train_head:
        for name, param in model.named_parameters():
            if ".modules_to_save." in name:
                param.requires_grad_(False)
    return model


def build_peft_config(bundle: ModelBundle, cfg: AdapterConfig) -> PeftConfig:
    """The ``peft`` config for ``cfg`` on this model (family defaults for target modules)."""
    task_type = None if bundle.family in _NO_PEFT_TASK_TYPE else _PEFT_TASK_TYPES[bundle.task]
    extra_heads = _extra_head_names(bundle) if cfg.train_head else []
    modules_to_save = extra_heads or None
    if cfg.kind == "lora":
        targets = cfg.target_modules or DEFAULT_LORA_TARGETS.get(bundle.family)
        return LoraConfig(task_type=task_type, r=cfg.r, lora_alpha=cfg.alpha,
                          lora_dropout=cfg.dropout, target_modules=targets,
                          fan_in_fan_out=bundle.family in _CONV1D_FAMILIES,
                          modules_to_save=modules_to_save)
    if cfg.kind == "ia3":
        return IA3Config(task_type=task_type, target_modules=cfg.target_modules,
                         feedforward_modules=_ia3_feedforward(bundle.family, cfg.target_modules),
                         fan_in_fan_out=bundle.family in _CONV1D_FAMILIES,
                         modules_to_save=modules_to_save)
    if cfg.kind == "prompt_tuning":
        return PromptTuningConfig(task_type=task_type, num_virtual_tokens=cfg.num_virtual_tokens,
                                  prompt_tuning_init=PromptTuningInit.RANDOM,
                                  modules_to_save=modules_to_save)
    if cfg.kind == "prefix_tuning":
        return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=cfg.num_virtual_tokens,
                                  modules_to_save=modules_to_save)
    raise AdapterError(f"adapter.kind={cfg.kind!r} is not a peft method ({', '.join(PEFT_KINDS)})")


def _ia3_feedforward(family: str, targets: list[str] | None) -> list[str] | None:
    """IA3 feed-forward modules: peft's family default, restricted to explicit targets."""
    if targets is None:
        return None
    defaults = TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(family, [])
    return [name for name in targets if name in defaults]


def _extra_head_names(bundle: ModelBundle) -> list[str]:
    """Head modules peft does not add to ``modules_to_save`` on its own (it adds the first two)."""
    if bundle.task != "classification":
        return []
    return [name for name in head_module_names(bundle.model)
            if name not in ("classifier", "score")]


# --------------------------------------------------------------------------- selective


def _apply_selective(bundle: ModelBundle, cfg: AdapterConfig, seed: int = 0) -> torch.nn.Module:
    model = bundle.model
    chosen = select_parameters(bundle, cfg)
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)
    return model


def select_parameters(bundle: ModelBundle, cfg: AdapterConfig) -> set[str]:
    """Names of the parameters a selective method trains (plus the head when it should)."""
    model, kind = bundle.model, cfg.kind
    classification = bundle.task == "classification"
    if kind == "head" and not classification:
        raise _unsupported(cfg, bundle, "it trains the classifier head, and this model has none")
    heads = set(head_parameter_names(model)) if classification else set()
    if classification and not heads:
        raise _unsupported(cfg, bundle, "no classifier head (classifier / score) was found")
    if kind == "full":
        return {name for name, _ in model.named_parameters()}
    if kind == "head":
        return heads
    if kind == "bitfit":
        chosen = {name for name, _ in model.named_parameters() if name.rsplit(".", 1)[-1] == "bias"}
        chosen -= heads
        if not chosen:
            raise _unsupported(cfg, bundle, "the model has no bias parameters")
    elif kind == "layernorm":
        chosen = set(norm_parameter_names(model))
        if not chosen:
            raise _unsupported(cfg, bundle, "no LayerNorm/RMSNorm module was found")
    elif kind == "last_layers":
        chosen = _last_block_parameter_names(bundle, cfg)
    else:
        raise AdapterError(f"adapter.kind={kind!r} is not a selective method "
                           f"({', '.join(SELECTIVE_KINDS)})")
    return chosen | heads if cfg.train_head else chosen - heads


def head_module_names(model: torch.nn.Module) -> list[str]:
    """Top-level classifier head modules (``classifier``, ``score``, ``classification_head``)."""
    return [name for name, _ in model.named_children() if name in HEAD_MODULE_NAMES]


def head_parameter_names(model: torch.nn.Module) -> list[str]:
    prefixes = tuple(f"{name}." for name in head_module_names(model))
    return [name for name, _ in model.named_parameters() if prefixes and name.startswith(prefixes)]


def _is_norm(module: torch.nn.Module) -> bool:
    if isinstance(module, torch.nn.LayerNorm | torch.nn.RMSNorm):
        return True
    kind = type(module).__name__.lower()
    return "layernorm" in kind or "rmsnorm" in kind


def norm_parameter_names(model: torch.nn.Module) -> list[str]:
    """Weights and biases of every LayerNorm / RMSNorm module (T5LayerNorm, LlamaRMSNorm, ...)."""
    names: list[str] = []
    for module_name, module in model.named_modules():
        if _is_norm(module):
            prefix = f"{module_name}." if module_name else ""
            names.extend(prefix + name for name, _ in module.named_parameters(recurse=False))
    return names


def find_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The transformer block list: the last ``ModuleList`` of same-class, parameterised modules
    not nested inside another such list (``model.layers``, ``transformer.h``, ``encoder.layer``;
    for encoder-decoders the decoder's ``block``)."""
    found: list[tuple[str, torch.nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(f"{outer}.") for outer, _ in found):
            continue
        classes = {type(child) for child in module}
        if len(classes) == 1 and any(True for _ in module[0].parameters()):
            found.append((name, module))
    if not found:
        raise ValueError(f"no list of transformer blocks found in {type(model).__name__}")
    return found[-1]


def _last_block_parameter_names(bundle: ModelBundle, cfg: AdapterConfig) -> set[str]:
    try:
        list_name, blocks = find_blocks(bundle.model)
    except ValueError as exc:
        raise _unsupported(cfg, bundle, str(exc)) from exc
    if cfg.num_layers > len(blocks):
        raise _unsupported(cfg, bundle, f"num_layers={cfg.num_layers} but {list_name} has only "
                                        f"{len(blocks)} blocks")
    first = len(blocks) - cfg.num_layers
    prefixes = tuple(f"{list_name}.{index}." for index in range(first, len(blocks)))
    return {name for name, _ in bundle.model.named_parameters() if name.startswith(prefixes)}


# --------------------------------------------------------------------------- state


def _trainable(model: torch.nn.Module) -> Iterable[tuple[str, torch.nn.Parameter]]:
    # named_parameters() yields a tied (shared) Parameter once, under its first name.
    return ((name, param) for name, param in model.named_parameters() if param.requires_grad)


def trainable_names(model: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters, in ``named_parameters`` order."""
    return [name for name, _ in _trainable(model)]


def get_state(model: torch.nn.Module) -> State:
    """A detached CPU contiguous clone of every trainable parameter (never the frozen base)."""
    return OrderedDict(
        (name, param.detach().to("cpu", copy=True).contiguous())
        for name, param in _trainable(model)
    )


def set_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the trainable parameters in place (onto each parameter's device).

    Keys must be exactly ``trainable_names(model)`` and shapes must match; else
    ``StateMismatchError`` naming the key, raised before any parameter is written. Values are
    cast to the parameter's dtype.
    """
    params = OrderedDict(_trainable(model))
    # values are cast to each parameter's dtype, so only keys and shapes must agree
    check_compatible(params, state, "set_state", check_dtype=False)
    with torch.no_grad():
        for name, param in params.items():
            param.data.copy_(state[name])


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared Parameter counted once."""
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


def _first_line(exc: BaseException) -> str:
    return " ".join(str(exc).split("\n", 1)[0].split()) or type(exc).__name__


# --------------------------------------------------------------------------- registry


def _register(kind: str, taxonomy: str, paper: str, config: str, summary: str) -> None:
    apply = _apply_peft if kind in PEFT_KINDS else _apply_selective
    ADAPTERS.register(kind, MethodInfo(taxonomy, paper, config, summary))(apply)


_register("lora", "efficiency.peft.reparameterization",
          "LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., ICLR 2022)",
          "adapter: {kind: lora, r: 8, alpha: 16, target_modules: [q_proj, v_proj]}",
          "trainable low-rank B A added to frozen weights (via peft)")
_register("ia3", "efficiency.peft.additive.adapter",
          "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context "
          "Learning (Liu et al., NeurIPS 2022)",
          "adapter: {kind: ia3}", "(IA)^3: learned rescaling vectors on keys, values, FFN")
_register("prompt_tuning", "efficiency.peft.additive.prompt",
          "The Power of Scale for Parameter-Efficient Prompt Tuning (Lester et al., EMNLP 2021)",
          "adapter: {kind: prompt_tuning, num_virtual_tokens: 16}",
          "trainable virtual-token embeddings prepended to the input")
_register("prefix_tuning", "efficiency.peft.additive.prompt",
          "Prefix-Tuning: Optimizing Continuous Prompts for Generation (Li & Liang, ACL 2021)",
          "adapter: {kind: prefix_tuning, num_virtual_tokens: 16}",
          "trainable key/value prefixes in every attention layer")
_register("bitfit", "efficiency.peft.selective",
          "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked "
          "Language-models (Ben Zaken et al., ACL 2022)",
          "adapter: {kind: bitfit}", "only the bias terms train")
_register("layernorm", "efficiency.peft.selective",
          "Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM Finetuning "
          "(Zhao et al., ICLR 2024)",
          "adapter: {kind: layernorm}", "only LayerNorm / RMSNorm weights and biases train")
_register("last_layers", "efficiency.peft.selective",
          "How transferable are features in deep neural networks? (Yosinski et al., "
          "NeurIPS 2014)",
          "adapter: {kind: last_layers, num_layers: 2}", "the last N transformer blocks train")
_register("head", "efficiency.peft.selective",
          "Fine-Tuning can Distort Pretrained Features and Underperform Out-of-Distribution "
          "(Kumar et al., ICLR 2022): linear probing",
          "adapter: {kind: head}", "only the classifier head trains (linear probing)")
_register("full", "efficiency.peft.full", "",
          "adapter: {kind: full}", "every weight trains and is communicated (the baseline)")

# after AdapterError and the head helpers, which vision_prompt imports from here
from fedfm.models.vision_prompt import apply_visual_prompt  # noqa: E402

ADAPTERS.register("visual_prompt", MethodInfo(
    "efficiency.peft.additive.prompt", "Visual Prompt Tuning (Jia et al., ECCV 2022)",
    "adapter: {kind: visual_prompt, num_virtual_tokens: 8}",
    "trainable prompt tokens inserted after a ViT's CLS token (VPT-shallow)"))(apply_visual_prompt)
