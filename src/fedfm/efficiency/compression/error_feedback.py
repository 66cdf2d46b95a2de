"""Error feedback: each client keeps what compression dropped and sends it later.

Seide, Fu, Droppo, Li & Yu, "1-Bit Stochastic Gradient Descent and its Application to
Data-Parallel Distributed Training of Speech DNNs", Interspeech 2014; analysed for sparsifiers
by Stich, Cordonnier & Jaggi, "Sparsified SGD with Memory", NeurIPS 2018, and for any biased
compressor by Karimireddy, Rebjock, Stich & Jaggi, "Error Feedback Fixes SignSGD and other
Gradient Compression Schemes", ICML 2019. Client ``i`` compresses ``p = Δ + e`` instead of its
update ``Δ`` and keeps ``e' = p - D(C(p))``; over rounds the decoded uploads add up to the sum of
the updates minus the current residual, so nothing is lost, only delayed. The residual is
per-client state (kept by the client store across rounds, committed only when the round
accepts the update).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch

from fedfm.core import state as state_ops
from fedfm.core.state import State

RESIDUAL_KEY = "compression_residual"  # the client-state entry


def corrected(update: Mapping[str, torch.Tensor], residual: Mapping[str, torch.Tensor] | None
              ) -> State:
    """``Δ + e`` in float32 (``Δ`` alone before the client's first compressed round)."""
    target = OrderedDict((k, v.detach().to(torch.float32)) for k, v in update.items())
    if residual is None:
        return target
    state_ops.check_compatible(target, residual, what="error-feedback residual")
    return OrderedDict((k, v + residual[k]) for k, v in target.items())


def next_residual(target: Mapping[str, torch.Tensor], decoded: Mapping[str, torch.Tensor]
                  ) -> State:
    """``e' = p - D(C(p))``: what the server did not receive this round."""
    return OrderedDict((k, (v - decoded[k].to(torch.float32)).contiguous())
                       for k, v in target.items())
