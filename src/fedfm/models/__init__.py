"""Models: load foundation models (presets, hub ids, local dirs) and adapt them with PEFT.

``load_model`` gives a ``ModelBundle`` (model, tokenizer, task, ...); ``apply_adapter`` makes
exactly the communicated parameters trainable; ``get_state`` / ``set_state`` move them in and
out as a ``State``.
"""

from fedfm.models.adapters import (
    DEFAULT_LORA_TARGETS,
    PEFT_KINDS,
    SELECTIVE_KINDS,
    AdapterError,
    apply_adapter,
    count_parameters,
    find_blocks,
    get_state,
    set_state,
    trainable_names,
)
from fedfm.models.loader import ModelBundle, ModelLoadError, load_model, seeded, tiny_tokenizer
from fedfm.models.presets import CHAT_TEMPLATE, PRESETS, Preset, preset_names

__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_LORA_TARGETS",
    "PEFT_KINDS",
    "PRESETS",
    "SELECTIVE_KINDS",
    "AdapterError",
    "ModelBundle",
    "ModelLoadError",
    "Preset",
    "apply_adapter",
    "count_parameters",
    "find_blocks",
    "get_state",
    "load_model",
    "preset_names",
    "seeded",
    "set_state",
    "tiny_tokenizer",
    "trainable_names",
]
