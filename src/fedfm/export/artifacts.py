"""Writing a run's global model where Hugging Face tools can load it.

* ``peft``: ``adapter_config.json`` + ``adapter_model.safetensors`` through peft's own
  ``save_pretrained``, so ``PeftModel.from_pretrained(base, dir)`` rebuilds exactly fedfm's global
  model (LoRA, IA3, prompt and prefix tuning; a trained classifier head rides along as peft's
  ``modules_to_save``).
* ``merged`` (alias ``full``): a plain ``transformers`` model directory. LoRA and IA3 are merged
  into the base weights (peft's ``merge_and_unload``); selective methods (BitFit, LayerNorm, last
  layers, head) and full fine-tuning already are whole models. Prompt and prefix tuning have no
  weights to merge into and are refused with a pointer to ``peft``.

Both write the tokenizer next to the weights. A base that exists nowhere else (the tiny presets,
initialised from the run's seed) is written to ``base_model/`` so the export is self-contained.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import torch
from peft import PeftModel

from fedfm.core.state import State, StateMismatchError
from fedfm.models import (
    PEFT_KINDS,
    PRESETS,
    ModelBundle,
    count_parameters,
    load_model,
    set_state,
)
from fedfm.tracking.run_record import RunRecord, RunRecordError


class ExportError(RunRecordError):
    """A run cannot be exported as asked; the message names the file or option."""


ExportFormat = Literal["peft", "merged", "full"]
EXPORT_FORMATS: tuple[str, ...] = ("peft", "merged", "full")
BASE_DIR = "base_model"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
_UNMERGEABLE = ("prompt_tuning", "prefix_tuning")


def label_info(record: RunRecord) -> tuple[list[str] | None, int | None]:
    """Label names and count of a classification run: from its summary, else from its data."""
    summary = record.summary
    if record.config.data.format != "classification":
        return None, None
    if summary.get("num_labels"):
        return summary.get("label_names"), int(summary["num_labels"])
    from fedfm.data import DataError, load_label_info

    try:
        return load_label_info(record.config.data)
    except (DataError, FileNotFoundError, OSError) as exc:
        raise ExportError(f"{record.path}/summary.json does not record num_labels and the run's "
                          f"data ({record.config.data.path}) cannot be read to count them: "
                          f"{exc}") from exc


def load_base(record: RunRecord) -> ModelBundle:
    """The run's base model, exactly as the run built it (same seed, same label count)."""
    names, num_labels = label_info(record)
    bundle = load_model(record.config.model, seed=record.config.seed, num_labels=num_labels)
    if names:
        config = bundle.model.config
        config.id2label = dict(enumerate(names))
        config.label2id = {name: index for index, name in enumerate(names)}
    return bundle


def rebuild_global_model(record: RunRecord, state: State) -> ModelBundle:
    """Base + adapter with ``state`` loaded: the model fedfm evaluated as the global one."""
    config = record.config
    from fedfm.api import adapt_model, build_algorithm

    # the algorithm may add adapters of its own (dual_lora's local one, domain adapters)
    bundle = adapt_model(load_base(record), config, build_algorithm(config))
    try:
        set_state(bundle.model, state)
    except StateMismatchError as exc:
        raise ExportError(f"the global State in {record.path} does not fit the model its "
                          f"config.yaml builds: {exc}") from exc
    bundle.model.eval()
    return bundle


def base_reference(record: RunRecord) -> tuple[str, bool]:
    """(how to name the base model, whether it must be written to ``base_model/``)."""
    name = record.config.model.name
    preset = PRESETS.get(name)
    if preset is not None and preset.make_config is not None:
        return BASE_DIR, True  # random-init from the run's seed: exists nowhere else
    if preset is not None:  # minilm: the package ships the hub model's files
        return MINILM_HUB_ID, False
    local = Path(name).expanduser()
    return (str(local.resolve()) if local.is_dir() else name), False


def write_base(record: RunRecord, out: Path) -> Path:
    target = out / BASE_DIR
    bundle = load_base(record)
    bundle.model.save_pretrained(target)
    bundle.tokenizer.save_pretrained(target)
    return target


def write_peft(record: RunRecord, bundle: ModelBundle, out: Path, base_ref: str) -> None:
    kind = record.config.adapter.kind
    if kind not in PEFT_KINDS or not isinstance(bundle.model, PeftModel):
        raise ExportError(f"--format peft needs a peft adapter ({', '.join(PEFT_KINDS)}); this "
                          f"run trained adapter.kind={kind!r}, a selective method: use "
                          f"--format full to write the whole model")
    model: PeftModel = bundle.model
    for peft_config in model.peft_config.values():
        peft_config.base_model_name_or_path = base_ref
        peft_config.revision = record.config.model.revision
    model.save_pretrained(str(out), save_embedding_layers=False)  # fedfm never resizes them
    bundle.tokenizer.save_pretrained(out)


def write_merged(record: RunRecord, bundle: ModelBundle, out: Path) -> None:
    kind = record.config.adapter.kind
    if kind in _UNMERGEABLE:
        raise ExportError(f"--format merged: adapter.kind={kind!r} adds virtual tokens, which "
                          f"have no weights to merge into; use --format peft")
    model: torch.nn.Module = bundle.model
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    model.save_pretrained(out)
    bundle.tokenizer.save_pretrained(out)


@dataclasses.dataclass
class WrittenModel:
    directory: Path
    base_reference: str
    base_written: bool
    task: str
    trainable_params: int
    total_params: int
    peft_settings: dict[str, object]  # what peft resolved (e.g. the family's default targets)


def write_model(record: RunRecord, state: State, fmt: str, out: Path) -> WrittenModel:
    """Write the global model in ``fmt`` under ``out`` (created)."""
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"--format {fmt!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    bundle = rebuild_global_model(record, state)
    trainable, total = count_parameters(bundle.model)
    settings = resolved_peft_settings(bundle.model)
    base_ref, needs_base = base_reference(record)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "peft":
        write_peft(record, bundle, out, base_ref)
        if needs_base:
            write_base(record, out)
    else:
        write_merged(record, bundle, out)
        needs_base = False
    return WrittenModel(out, base_ref, needs_base, bundle.task, trainable, total, settings)


def resolved_peft_settings(model: torch.nn.Module) -> dict[str, object]:
    """Target and saved modules as peft resolved them (sorted lists; empty for selective)."""
    if not isinstance(model, PeftModel):
        return {}
    config = model.peft_config["default"]
    found: dict[str, object] = {}
    for name in ("target_modules", "feedforward_modules", "modules_to_save"):
        value = getattr(config, name, None)
        if value is not None:
            found[name] = sorted(value) if not isinstance(value, str) else value
    return found
