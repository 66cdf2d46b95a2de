"""Chunked, fused linear + cross-entropy for causal language models.

The standard path (``model(**batch).loss``) builds the full ``[batch, length, vocab]`` logits
tensor in fp32, then a log-softmax, then keeps both alive for backward; with an 8k-32k vocabulary
that is the largest tensor of the step and a large share of its time. Here the output projection
and the loss run together over chunks of tokens, only for positions that carry a label (instruction
data masks its prompt, so those positions never reach the vocabulary matmul), and the gradient with
respect to the hidden states is computed in the forward pass, chunk by chunk, so no logits outlive
their chunk. This is the idea of "Cut Your Losses in Large-Vocabulary Language Models" (Wijmans et
al., ICLR 2025) and of Liger Kernel's fused linear cross-entropy (Hsu et al., 2024), written here
with plain PyTorch ops because neither ships a CPU path.

``CausalLMLoss`` wraps a Hugging Face causal LM (optionally inside a ``peft`` model) and is checked
against the model's own loss on a probe batch before it is trusted; models whose head does more
than ``hidden @ W.T + b`` (logit soft-capping, scaling) fail that check and keep the standard path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

IGNORE_INDEX = -100
DEFAULT_CHUNK_TOKENS = 256


def _accumulate_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """Softmax and sums run in fp32 (fp64 when computing in fp64)."""
    return torch.float64 if compute_dtype == torch.float64 else torch.float32


def _chunk_loss_and_grad(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                         compute_dtype: torch.dtype, want_grad: bool
                         ) -> tuple[Tensor, Tensor | None]:
    """Summed cross-entropy of one chunk and d(sum)/d(logits), without keeping logits.
    ``weight`` is already in ``compute_dtype``; the logits buffer is fp32 (fp64 for fp64)."""
    accumulate = _accumulate_dtype(compute_dtype)
    logits = (hidden.to(compute_dtype) @ weight.T).to(accumulate)
    if bias is not None:
        logits += bias.to(accumulate)
    picked = logits.gather(1, targets[:, None]).squeeze(1)
    # one pass of exp, in place on the logits buffer: exp(z - max), its row sums, softmax
    row_max = logits.amax(dim=-1)
    logits.sub_(row_max[:, None]).exp_()
    row_sum = logits.sum(dim=-1)
    loss_sum = (row_sum.log() + row_max - picked).sum()
    if not want_grad:
        return loss_sum, None
    # softmax - onehot
    logits.div_(row_sum[:, None])
    logits[torch.arange(len(targets), device=logits.device), targets] -= 1.0
    return loss_sum, logits


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Mean CE of ``hidden @ weight.T + bias`` against valid ``targets``, fused and chunked."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                chunk_tokens: int, compute_dtype: torch.dtype) -> Tensor:
        count = targets.numel()
        want_hidden = hidden.requires_grad
        want_weight = weight.requires_grad
        want_bias = bias is not None and bias.requires_grad
        want_grad = want_hidden or want_weight or want_bias
        accumulate = _accumulate_dtype(compute_dtype)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=accumulate,
                                  device=weight.device) if want_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=accumulate,
                                device=weight.device) if want_bias else None
        total = torch.zeros((), dtype=accumulate, device=hidden.device)
        weight_c = weight.to(compute_dtype)
        for start in range(0, count, chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            loss_sum, dlogits = _chunk_loss_and_grad(hidden[rows], weight_c, bias, targets[rows],
                                                     compute_dtype, want_grad)
            total += loss_sum
            if dlogits is None:
                continue
            dlogits_c = dlogits.to(compute_dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = (dlogits_c @ weight_c).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (dlogits_c.T @ hidden[rows].to(compute_dtype)).to(accumulate)
            if grad_bias is not None:
                grad_bias += dlogits.sum(0)
        scale = 1.0 / max(count, 1)
        ctx.scale = scale
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(*(g if g is not None else torch.empty(0)
                                for g in (grad_hidden, grad_weight, grad_bias)))
        ctx.has = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        return total * scale

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        has_hidden, has_weight, has_bias = ctx.has
        factor = grad_output * ctx.scale
        out_hidden = grad_hidden * factor.to(grad_hidden.dtype) if has_hidden else None
        out_weight = (grad_weight * factor).to(ctx.weight_dtype) if has_weight else None
        out_bias = (grad_bias * factor).to(ctx.bias_dtype) if has_bias else None
        return out_hidden, out_weight, out_bias, None, None, None


def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None,
                               labels: Tensor, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                               compute_dtype: torch.dtype | None = None) -> Tensor:
    """Mean cross-entropy of ``hidden @ weight.T + bias`` over positions whose label is not -100.

    ``hidden``: ``[..., H]``; ``labels``: ``[...]`` (already aligned: no shifting here). Returns a
    scalar with the gradient of ``torch.nn.functional.cross_entropy`` on the full logits."""
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    keep = flat_labels != IGNORE_INDEX
    if not bool(keep.any()):
        raise ValueError("no position carries a label (all labels are -100)")
    dtype = compute_dtype or weight.dtype
    return _FusedLinearCrossEntropy.apply(flat_hidden[keep], weight, bias, flat_labels[keep],
                                          chunk_tokens, dtype)


def standard_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's own loss (``model(**batch).loss``). Packed rows (``position_ids`` without an
    attention mask) run without a KV cache: Hugging Face only derives the per-example mask
    then."""
    if "position_ids" in batch and "attention_mask" not in batch:
        outputs = model(**batch, use_cache=False)
    else:
        outputs = model(**batch)
    loss = outputs.loss if hasattr(outputs, "loss") else outputs["loss"]
    if loss is None:
        raise RuntimeError("the model returned no loss; batches must carry `labels`")
    return loss


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


class CausalLMLoss:
    """``loss(model, batch)`` for a Hugging Face causal LM through the backbone and the fused
    head; the same value and gradients as ``model(**batch).loss`` (shifted labels, mean over
    labelled positions)."""

    def __init__(self, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> None:
        self.chunk_tokens = chunk_tokens

    @staticmethod
    def parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
        """(backbone, output layer) of a plain HF causal LM, or None when the model is not one
        (prompt-learning peft models prepend tokens inside their own forward)."""
        hf_model = model
        if hasattr(model, "peft_config"):
            if getattr(model, "active_peft_config", None) is not None and getattr(
                    model.active_peft_config, "is_prompt_learning", False):
                return None
            hf_model = model.get_base_model()
        prefix = getattr(hf_model, "base_model_prefix", None)
        backbone = getattr(hf_model, prefix, None) if prefix else None
        head = hf_model.get_output_embeddings() if hasattr(
            hf_model, "get_output_embeddings") else None
        if backbone is None or backbone is hf_model or not isinstance(head, torch.nn.Linear):
            return None
        return backbone, head

    def hidden_states(self, model: torch.nn.Module, batch: dict[str, Tensor]
                      ) -> tuple[Tensor, torch.nn.Linear]:
        """The backbone's last hidden states for ``batch`` (labels ignored) and the head."""
        parts = self.parts(model)
        if parts is None:
            raise ValueError("the fused loss needs a causal LM with a linear output layer")
        backbone, head = parts
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        # no KV cache in training (and Hugging Face derives packed rows' masks only without one)
        return backbone(**inputs, use_cache=False).last_hidden_state, head  # type: ignore[return-value]

    def loss_from_hidden(self, hidden: Tensor, labels: Tensor, head: torch.nn.Linear) -> Tensor:
        """Mean next-token cross-entropy of ``hidden`` (rows of a batch) against ``labels``."""
        return fused_linear_cross_entropy(
            hidden[:, :-1], head.weight, head.bias, labels[:, 1:],
            chunk_tokens=self.chunk_tokens, compute_dtype=_autocast_dtype(hidden.device))

    def __call__(self, model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
        hidden, head = self.hidden_states(model, batch)
        return self.loss_from_hidden(hidden, batch["labels"], head)
