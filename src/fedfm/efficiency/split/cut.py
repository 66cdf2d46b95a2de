"""The cut between the client's and the server's part of one model, in the autograd sense.

A forward hook on the last client block (``cut_layer - 1``) takes that block's hidden-state
output (HF blocks return a tensor, or a tuple whose first element is it), casts it to the wire
dtype and back, and hands the server's blocks a *detached leaf* in its place. The server's loss
therefore ends at that leaf: its backward fills the server parameters' gradients and the
leaf's gradient, which travels back (cast to the wire dtype) and is pushed through the client's
part with ``torch.autograd.backward(client_output, received_gradient)``. Nothing else connects
the two graphs; ``parameter_sides`` walks both graphs and refuses a parameter that both reach
(tied input/output embeddings trained on both sides, prefix key/values fed to every block).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from fedfm.models.adapters import find_blocks

WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# what the server's blocks need besides the activations (token ids and types stay with the
# embeddings on the client); the labels, for the loss, are counted apart
SERVER_INPUTS = ("attention_mask", "position_ids")
NamedParams = list[tuple[str, torch.nn.Parameter]]


def cut_point(model: torch.nn.Module, cut_layer: int) -> tuple[str, torch.nn.Module, int]:
    """The block list's name, the last client block and the number of blocks; a ValueError
    naming ``algorithm.split.cut_layer`` when the server would be left without a block."""
    list_name, blocks = find_blocks(model)
    if not 1 <= cut_layer < len(blocks):
        raise ValueError(f"algorithm.split.cut_layer={cut_layer} but the model has "
                         f"{len(blocks)} transformer blocks ({list_name}); the cut must leave "
                         f"at least one block to each side (1 <= cut_layer <= "
                         f"{len(blocks) - 1})")
    return list_name, blocks[cut_layer - 1], len(blocks)


@dataclass
class WireCount:
    """Bytes that crossed the cut during one client's round (every micro-batch)."""

    activation_bytes: int = 0  # client -> server: the cut activations
    gradient_bytes: int = 0  # server -> client: their gradients
    label_bytes: int = 0  # client -> server: the labels of the loss
    mask_bytes: int = 0  # client -> server: attention mask (and packed position ids)

    def metrics(self) -> dict[str, float]:
        return {"split_activation_bytes": float(self.activation_bytes),
                "split_gradient_bytes": float(self.gradient_bytes),
                "split_label_bytes": float(self.label_bytes),
                "split_mask_bytes": float(self.mask_bytes)}


def tensor_bytes(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> int:
    """``numel`` times the element size of ``dtype`` (default: the tensor's own)."""
    return tensor.numel() * (dtype or tensor.dtype).itemsize


class Wire:
    """What crosses the cut: cast to the wire dtype (and back, as the receiver would use it)
    and counted."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.count = WireCount()

    def send_activation(self, hidden: torch.Tensor) -> torch.Tensor:
        """The server's copy of the cut activation: a leaf, detached from the client's graph."""
        self.count.activation_bytes += tensor_bytes(hidden, self.dtype)
        received = hidden.detach().to(self.dtype).to(hidden.dtype)
        return received.requires_grad_(hidden.requires_grad)

    def return_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """The client's copy of the gradient of the server's loss at the cut."""
        self.count.gradient_bytes += tensor_bytes(grad, self.dtype)
        return grad.to(self.dtype).to(grad.dtype)

    def send_batch(self, batch: dict[str, torch.Tensor]) -> None:
        """Count the labels and the server-side inputs of a micro-batch."""
        if "labels" in batch:
            self.count.label_bytes += tensor_bytes(batch["labels"])
        self.count.mask_bytes += sum(tensor_bytes(batch[k]) for k in SERVER_INPUTS if k in batch)


class Cut:
    """The hook on the last client block; one forward at a time (``with cut.active():``)."""

    def __init__(self, block: torch.nn.Module, wire: Wire) -> None:
        self.block = block
        self.wire = wire
        self.sent: torch.Tensor | None = None  # the client's output (end of its graph)
        self.received: torch.Tensor | None = None  # the server's leaf

    @contextmanager
    def active(self) -> Iterator[None]:
        self.sent = self.received = None
        handle = self.block.register_forward_hook(self._swap)
        try:
            yield
        finally:
            handle.remove()
        if self.sent is None:
            raise RuntimeError("splitfed: the cut block did not run in the forward pass")

    def _swap(self, module: torch.nn.Module, args: Any, output: Any) -> Any:
        if self.sent is not None:
            raise RuntimeError("splitfed: the cut block ran twice in one forward pass")
        hidden = output[0] if isinstance(output, tuple) else output
        self.sent = hidden
        self.received = self.wire.send_activation(hidden)
        return (self.received, *output[1:]) if isinstance(output, tuple) else self.received

    def backward(self) -> None:
        """After the server's backward: send the leaf's gradient back and run the client's
        backward with it (nothing to do when no client-side tensor trains)."""
        sent, received = self.sent, self.received
        assert sent is not None and received is not None
        self.sent = self.received = None
        if not sent.requires_grad:
            return
        grad = received.grad if received.grad is not None else torch.zeros_like(received)
        torch.autograd.backward(sent, self.wire.return_gradient(grad))


def reachable_leaves(root: torch.Tensor) -> set[int]:
    """Ids of the leaf tensors whose gradient a backward from ``root`` would accumulate."""
    found: set[int] = set()
    seen: set[Any] = set()
    stack = [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf's gradient sink
        if variable is not None:
            found.add(id(variable))
        stack.extend(child for child, _ in node.next_functions)
    return found


def parameter_sides(named: NamedParams, client_output: torch.Tensor, loss: torch.Tensor,
                    block_list: str, cut_layer: int) -> list[str]:
    """Names of the client-side trainable parameters, read off the two autograd graphs: those
    the client's output depends on. A parameter the server's loss reaches as well (not through
    the cut's leaf) is an error. A parameter neither graph uses goes by its position: blocks
    before ``cut_layer`` are the client's, everything else the server's."""
    client = reachable_leaves(client_output)
    server = reachable_leaves(loss)
    both = [name for name, param in named if id(param) in client and id(param) in server]
    if both:
        raise ValueError(f"splitfed: {both[0]} is used on both sides of the cut (e.g. input "
                         f"and output embeddings tied and trained, or prefixes fed to every "
                         f"block), so the server's loss would reach a client-side parameter "
                         f"without the returned gradient")
    return [name for name, param in named
            if id(param) in client or (id(param) not in server
                                       and _block_index(name, block_list) < cut_layer)]


def _block_index(name: str, block_list: str) -> int:
    """The block a parameter lives in (a large number when it is in none)."""
    marker = f"{block_list}."
    if not name.startswith(marker):
        return 1 << 30
    index = name[len(marker):].split(".", 1)[0]
    return int(index) if index.isdigit() else 1 << 30
