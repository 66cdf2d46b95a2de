"""Which tokens did a client's batches hold? Read off its update, three ways, strongest first.

* **Input embedding** (full fine-tuning, or an embedding in ``modules_to_save``): a row of the
  embedding matrix moves only if its token was looked up (Zhu, Liu & Han, "Deep Leakage from
  Gradients", NeurIPS 2019, make the same observation about embedding gradients). Exact.
* **LoRA on the embedding** (``lora_embedding_A``, shape ``r x vocab``): its column ``v`` is
  multiplied by the one-hot of token ``v``, so it too moves only for tokens the client fed. Exact
  once ``B`` is non-zero (a freshly initialised ``B = 0`` gives ``A`` no gradient at all).
* **First-layer projections** (LoRA ``A`` or full weights of the first layer's query / key /
  value): the gradient of a linear map ``y = W x`` is ``sum_t delta_t x_t^T``, so the rows of the
  update lie in the span of the layer's inputs ``x_t``, and the first layer's input for token
  ``v`` at position ``p`` depends on ``(v, p)`` alone. Every vocabulary token is scored by the
  distance of its input from that span (Petrov, Dimitrov, Baader, Müller & Vechev, "DAGER: Exact
  Gradient Inversion for Large Language Models", NeurIPS 2024). Exact for one SGD step whose
  batch has fewer token positions than the update has rows (stacked ``r`` rows per adapted
  projection); over several Adam steps the update's row space is only near the inputs' span, and
  the report gives the ranking's AUC and R-precision instead.

Precision and recall are against the tokens the client really fed (attention-masked positions
only). In a causal LM a token seen only as a row's last token predicts nothing, gets no gradient
and is the one way to stay hidden.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

import numpy as np
import torch

from fedfm.trust.attacks.membership import roc_auc

# the modules that read a transformer layer's input directly (before any token mixing)
INPUT_PROJECTIONS = frozenset({"query", "key", "value", "q_proj", "k_proj", "v_proj",
                               "qkv_proj", "c_attn", "query_key_value", "Wqkv", "q", "k", "v",
                               "in_proj"})
SPAN_THRESHOLD = 0.05  # relative distance from the span below which a token counts as fed
RANK_TOLERANCE = 1e-5  # singular values below this share of the largest are numerical noise
PROBE_ROWS = 256  # vocabulary tokens probed per forward pass


def fed_tokens(batches: list[dict[str, Any]]) -> set[int]:
    """Token ids at attention-masked positions of ``batches`` (the attack's ground truth)."""
    truth: set[int] = set()
    for batch in batches:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        kept = ids[mask.bool()] if mask is not None else ids.flatten()
        truth.update(int(i) for i in kept)
    return truth


def recover_tokens(model: torch.nn.Module, payload: dict[str, Any],
                   batches: list[dict[str, Any]], *, max_positions: int = 128,
                   threshold: float = SPAN_THRESHOLD) -> dict[str, Any]:
    """The strongest applicable recovery from ``payload`` (a client's update of ``model``'s
    trainable State), scored against ``batches``."""
    truth = fed_tokens(batches)
    embedding = _embedding_update(model, payload)
    if embedding is not None:
        moved = embedding.abs().sum(dim=1) > 0
        return _exact_report("input_embedding", moved, truth)
    lora_embedding = next((value for key, value in payload.items()
                           if ".lora_embedding_A." in key), None)
    if lora_embedding is not None:
        return _exact_report("lora_embedding", lora_embedding.abs().sum(dim=0) > 0, truth)
    first_layer = first_layer_updates(payload)
    if first_layer:
        return span_recovery(model, first_layer, truth, max_positions=max_positions,
                             threshold=threshold)
    return {"applicable": False,
            "why": "the update carries no input-embedding matrix, LoRA embedding factor or "
                   "first-layer query/key/value update; nothing to read token ids from"}


def _embedding_update(model: torch.nn.Module, payload: dict[str, Any]) -> torch.Tensor | None:
    embedding = model.get_input_embeddings().weight
    key = next((name for name, param in model.named_parameters() if param is embedding), None)
    return payload.get(key) if key is not None else None


def _exact_report(method: str, moved: torch.Tensor, truth: set[int]) -> dict[str, Any]:
    recovered = set(int(i) for i in moved.nonzero().flatten())
    hits = len(recovered & truth)
    return {"applicable": True, "method": method, "recovered": len(recovered),
            "true_tokens": len(truth), "precision": hits / max(len(recovered), 1),
            "recall": hits / max(len(truth), 1)}


def first_layer_updates(payload: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Module path -> update rows (LoRA ``A`` or the full weight) of the first layer's input
    projections; encoder-decoder models: the encoder's."""
    found: dict[str, tuple[int, torch.Tensor]] = {}
    for key, value in payload.items():
        if not isinstance(value, torch.Tensor) or value.dim() != 2:
            continue
        path = _projection_path(key)
        if path is None or path.rsplit(".", 1)[-1] not in INPUT_PROJECTIONS:
            continue
        layer = _layer_index(path)
        if layer is not None:
            found[path] = (layer, value)
    if any("encoder" in path for path in found):
        found = {path: item for path, item in found.items() if "decoder" not in path}
    if not found:
        return {}
    first = min(layer for layer, _ in found.values())
    return {path: rows for path, (layer, rows) in found.items() if layer == first}


def _projection_path(key: str) -> str | None:
    if ".lora_A." in key:
        return key.split(".lora_A.")[0]
    for suffix in (".base_layer.weight", ".weight"):
        if key.endswith(suffix) and ".lora_" not in key:
            return key[: -len(suffix)]
    return None


def _layer_index(path: str) -> int | None:
    match = re.search(r"\.(\d+)\.", f".{path}.")
    return int(match.group(1)) if match else None


def span_basis(rows: list[torch.Tensor]) -> torch.Tensor:
    """Orthonormal basis (columns) of the row space of the stacked updates."""
    stacked = torch.cat([r.detach().double().reshape(r.shape[0], -1) for r in rows])
    _, singular, right = torch.linalg.svd(stacked, full_matrices=False)
    if singular.numel() == 0 or float(singular[0]) == 0.0:
        return stacked.new_zeros((stacked.shape[1], 0))
    rank = int((singular > singular[0] * RANK_TOLERANCE).sum())
    return right[:rank].T


def span_recovery(model: torch.nn.Module, updates: dict[str, torch.Tensor], truth: set[int], *,
                  max_positions: int, threshold: float) -> dict[str, Any]:
    """Score every vocabulary token by its first-layer input's distance from the span of the
    update's rows (the minimum over positions); recovered: distance below ``threshold``."""
    basis = span_basis(list(updates.values()))
    width = basis.shape[0]
    if basis.shape[1] == 0:
        return {"applicable": False, "why": "the first-layer update is zero (e.g. LoRA B was "
                                            "still zero, so A received no gradient)"}
    if basis.shape[1] >= width:
        return {"applicable": False, "why": f"the first-layer update has full rank {width}: "
                                            f"its span holds every input"}
    module = model.get_submodule(next(iter(updates)))
    distances = token_distances(model, module, basis, max_positions)
    vocab = np.arange(len(distances))
    fed = np.isin(vocab, sorted(truth))
    recovered = set(int(i) for i in vocab[distances < threshold])
    hits = len(recovered & truth)
    ranked = np.argsort(distances, kind="stable")[: len(truth)]
    return {"applicable": True, "method": "first_layer_span", "modules": sorted(updates),
            "span_rank": int(basis.shape[1]), "input_width": int(width),
            "threshold": threshold, "recovered": len(recovered), "true_tokens": len(truth),
            "precision": hits / max(len(recovered), 1), "recall": hits / max(len(truth), 1),
            "auc": roc_auc(-distances[fed], -distances[~fed]) if fed.any() and (~fed).any()
            else float("nan"),
            "r_precision": float(np.isin(ranked, sorted(truth)).mean()) if truth else 0.0}


class _Captured(Exception):
    """Stops the probe's forward pass once the first layer's input is in hand."""


@torch.no_grad()
def token_distances(model: torch.nn.Module, module: torch.nn.Module, basis: torch.Tensor,
                    max_positions: int) -> np.ndarray:
    """For every vocabulary token, the smallest relative distance of its input to ``module``
    (over positions ``0 .. max_positions-1``) from the span of ``basis``."""
    vocab = model.get_input_embeddings().weight.shape[0]
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    positions = min(max_positions, limit) if limit else max_positions
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    captured: dict[str, torch.Tensor] = {}

    def grab(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        captured["x"] = args[0]
        raise _Captured

    handle = module.register_forward_pre_hook(grab)
    best = np.empty(vocab, dtype=np.float64)
    try:
        for start in range(0, vocab, PROBE_ROWS):
            ids = torch.arange(start, min(start + PROBE_ROWS, vocab), device=device)
            probe = ids[:, None].expand(-1, positions)
            with contextlib.suppress(_Captured):
                model(input_ids=probe, attention_mask=torch.ones_like(probe))
            inputs = captured.pop("x").double().cpu()  # [rows, positions, width]
            inside = (inputs @ basis) @ basis.T
            norms = inputs.norm(dim=-1)
            relative = (inputs - inside).norm(dim=-1) / norms.clamp(min=1e-12)
            # a zero input (a padding row of the embedding) is in every span: it tells nothing
            relative[norms < 1e-9] = 1.0
            best[start:start + len(ids)] = relative.min(dim=1).values.numpy()
    finally:
        handle.remove()
        model.train(was_training)
    return best
