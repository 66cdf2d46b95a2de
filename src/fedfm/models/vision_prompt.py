"""Visual prompt tuning, shallow (VPT-shallow; Jia et al., "Visual Prompt Tuning", ECCV 2022).

``num_tokens`` learnable prompt vectors are inserted into a ViT's input sequence right after the
CLS token, after the position embeddings were added (prompts have no position), so the first
transformer layer sees ``[CLS, P_1 .. P_n, patch_1 .. patch_m]``. The backbone stays frozen; the
prompts and the classifier head train and are the communicated State, under stable names:
``vit.embeddings.visual_prompt`` (``num_tokens x hidden``), ``classifier.weight`` and
``classifier.bias``. Prompts are initialised as in the paper: uniform in ``[-v, v]`` with
``v = sqrt(6 / (3 * patch_size**2 + hidden))`` (Xavier over the patch projection's fan in/out),
drawn under the adapter seed.

Written by hand rather than through ``peft``: peft's prompt tuning prepends virtual tokens to
the *word* embeddings of a text model and feeds them as ``inputs_embeds``; a ViT takes
``pixel_values`` through a convolutional patch embedding, accepts no ``inputs_embeds``, and
peft has no image task type, so ``PromptTuningConfig`` cannot reach its token sequence.

The ViT's ``ViTEmbeddings`` module is replaced by ``PromptedViTEmbeddings``, a subclass that
holds the same (frozen) weights under the same names plus the prompt; with zero prompt tokens
it is the original module. ``remove_visual_prompt`` puts a plain ``ViTEmbeddings`` back.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import ViTConfig
from transformers.models.vit.modeling_vit import ViTEmbeddings

from fedfm.config import AdapterConfig
from fedfm.models.adapters import AdapterError, head_parameter_names
from fedfm.models.loader import ModelBundle, seeded

PROMPT_NAME = "visual_prompt"  # the prompt parameter, inside the embeddings module


class PromptedViTEmbeddings(ViTEmbeddings):
    """ViT embeddings followed by ``num_tokens`` prompt vectors inserted after CLS."""

    def __init__(self, config: ViTConfig, num_tokens: int, *, use_mask_token: bool = False,
                 dropout: float = 0.0) -> None:
        super().__init__(config, use_mask_token=use_mask_token)
        self.visual_prompt = nn.Parameter(torch.zeros(num_tokens, config.hidden_size))
        self.prompt_dropout = nn.Dropout(dropout)

    @property
    def num_tokens(self) -> int:
        return self.visual_prompt.shape[0]

    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: torch.BoolTensor | None = None,
                interpolate_pos_encoding: bool = False) -> torch.Tensor:
        embeddings = super().forward(pixel_values, bool_masked_pos, interpolate_pos_encoding)
        if self.num_tokens == 0:
            return embeddings
        prompts = self.prompt_dropout(self.visual_prompt).to(embeddings.dtype)
        prompts = prompts.unsqueeze(0).expand(embeddings.shape[0], -1, -1)
        return torch.cat([embeddings[:, :1], prompts, embeddings[:, 1:]], dim=1)


def find_vit_embeddings(model: nn.Module) -> tuple[str, ViTEmbeddings]:
    """(name, module) of the ViT embeddings (``vit.embeddings`` in an image classifier)."""
    for name, module in model.named_modules():
        if isinstance(module, ViTEmbeddings):
            return name, module
    raise ValueError(f"{type(model).__name__} has no ViT embeddings (ViTEmbeddings); visual "
                     "prompt tuning needs a ViT")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def prompt_init_bound(config: ViTConfig) -> float:
    """VPT's uniform init bound: Xavier over the patch projection (3 * patch^2 -> hidden)."""
    patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
    return math.sqrt(6.0 / float(3 * patch * patch + config.hidden_size))


def add_visual_prompt(model: nn.Module, num_tokens: int, *, dropout: float = 0.0
                      ) -> PromptedViTEmbeddings:
    """Insert ``num_tokens`` prompt tokens after CLS in ``model`` (in place); returns the new
    embeddings module. Draws from the global RNG (callers seed it)."""
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    name, old = find_vit_embeddings(model)
    if isinstance(old, PromptedViTEmbeddings):
        raise ValueError("the model already carries a visual prompt")
    new = PromptedViTEmbeddings(model.config, num_tokens,
                                use_mask_token=old.mask_token is not None, dropout=dropout)
    missing, unexpected = new.load_state_dict(old.state_dict(), strict=False)
    assert missing == [PROMPT_NAME] and not unexpected, (missing, unexpected)
    bound = prompt_init_bound(model.config)
    with torch.no_grad():
        new.visual_prompt.uniform_(-bound, bound)
    new.to(device=old.cls_token.device, dtype=old.cls_token.dtype)
    new.train(old.training)
    _set_module(model, name, new)
    return new


def remove_visual_prompt(model: nn.Module) -> None:
    """Put a plain ``ViTEmbeddings`` with the same weights back (the prompt is dropped)."""
    name, prompted = find_vit_embeddings(model)
    if not isinstance(prompted, PromptedViTEmbeddings):
        return
    plain = ViTEmbeddings(model.config, use_mask_token=prompted.mask_token is not None)
    state = {k: v for k, v in prompted.state_dict().items() if k != PROMPT_NAME}
    plain.load_state_dict(state)
    plain.to(device=prompted.cls_token.device, dtype=prompted.cls_token.dtype)
    plain.train(prompted.training)
    _set_module(model, name, plain)


def apply_visual_prompt(bundle: ModelBundle, cfg: AdapterConfig, seed: int = 0) -> nn.Module:
    """The ``visual_prompt`` adapter: ``adapter.num_virtual_tokens`` prompts (prompt dropout
    ``adapter.dropout``), plus the classifier head when ``adapter.train_head``."""
    model = bundle.model
    try:
        with seeded(seed):
            add_visual_prompt(model, cfg.num_virtual_tokens, dropout=cfg.dropout)
    except ValueError as exc:
        raise AdapterError(f"adapter.kind='visual_prompt' is not supported for model family "
                           f"{bundle.family!r} (model {bundle.source!r}): {exc}") from exc
    heads = set(head_parameter_names(model)) if cfg.train_head else set()
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith(f".{PROMPT_NAME}") or name in heads)
    return model
