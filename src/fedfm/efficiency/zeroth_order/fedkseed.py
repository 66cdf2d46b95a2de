"""FedKSeed: federated full-parameter tuning with a few kilobytes per client per round.

Qin, Chen, Yao, Ding, Li, Gao & Deng, "Federated Full-Parameter Tuning of Billion-Sized Language
Models with Communication Cost under 18 Kilobytes", ICML 2024. The server and every client share a
pool of ``K`` seeds. Each local step draws one seed ``s_j`` from the pool, estimates the
directional derivative along ``z(s_j)`` with two forward passes (``g = (L(theta + eps z) - L(theta
- eps z)) / 2 eps``, as MeZO) and moves ``theta <- theta - lr g z``. The client uploads only its
``(j, g)`` pairs, 6 bytes a step (an int16 index for pools up to 32768 seeds); the server checks
them and replays ``-lr sum_t g_t z(s_t)`` for each client (``decode_update``), so everything after
it (the mean, FedOpt server optimizers) sees an ordinary dense delta. The trainable State is
whatever the adapter makes trainable (``adapter.kind: full`` for the paper's full-parameter tuning;
LoRA, BitFit, ... work too).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from fedfm.algorithms.fedavg import build_delta_server
from fedfm.config import AlgorithmConfig, LocalTrainingConfig, ZerothOrderConfig
from fedfm.core.algorithm import (
    Algorithm,
    ClientContext,
    ClientResult,
    ServerRule,
    ServerWrapper,
)
from fedfm.core.loop import derive_seed
from fedfm.core.registries import ALGORITHMS
from fedfm.core.registry import MethodInfo
from fedfm.core.state import State
from fedfm.core.update import Broadcast, ClientUpdate
from fedfm.efficiency.zeroth_order.common import add_direction, dense_step, start_run, two_point

PAIRS = "pairs"  # the upload: one uint8 tensor, all seed indices then all projected gradients
_POOL_STREAM = 17


def seed_pool(cfg: ZerothOrderConfig) -> list[int]:
    """The ``K`` shared seeds, the same on every client and the server."""
    generator = torch.Generator().manual_seed(derive_seed(cfg.pool_seed, _POOL_STREAM))
    return torch.randint(2**62, (cfg.num_seeds,), generator=generator).tolist()


class FedKSeedClient:
    def __init__(self, local: LocalTrainingConfig, zo: ZerothOrderConfig) -> None:
        self.local = local
        self.zo = zo
        self.pool = seed_pool(zo)

    def run(self, ctx: ClientContext, broadcast: Broadcast) -> ClientResult:
        run = start_run(ctx, self.local)
        chosen, grads, losses = [], [], []
        for batch in run.batches:
            index = int(torch.randint(len(self.pool), (1,), generator=run.generator))
            seed = self.pool[index]
            grad, loss = two_point(ctx, run.named, batch, seed, self.zo.eps, run.loss_of)
            add_direction(run.named, seed, -self.local.lr * grad)
            chosen.append(index)
            grads.append(grad)
            losses.append(loss)
        payload = encode_pairs(torch.tensor(chosen, dtype=index_dtype(len(self.pool))),
                               torch.tensor(grads, dtype=torch.float32))
        metrics = {"train_loss": sum(losses) / len(losses), "steps": float(len(chosen)),
                   "forward_passes": float(2 * len(chosen))}
        return ClientResult(ClientUpdate(ctx.client_id, payload, len(ctx.train_examples),
                                         metrics))


class FedKSeedServer(ServerWrapper):
    """Checks each upload of (seed index, scalar) pairs and replays it as a dense delta;
    aggregation and the server optimizer are FedAvg's / FedOpt's."""

    def __init__(self, inner: ServerRule, local: LocalTrainingConfig,
                 zo: ZerothOrderConfig) -> None:
        super().__init__(inner)
        self.local = local
        self.pool = seed_pool(zo)

    def decode_update(self, update: ClientUpdate, global_state: State) -> ClientUpdate:
        indices, grads = check_pairs(update.payload, len(self.pool))
        steps = [(self.pool[int(i)], float(g)) for i, g in zip(indices, grads, strict=True)]
        delta = dense_step(global_state, steps, self.local.lr)
        payload = OrderedDict((k, delta[k].to(v.dtype)) for k, v in global_state.items())
        return ClientUpdate(update.client_id, payload, update.num_examples,
                            dict(update.metrics), dict(update.aux),
                            {**update.metadata, "zo_steps": len(steps)})


def index_dtype(pool_size: int) -> torch.dtype:
    """The narrowest integer type that holds every seed index (2 bytes for K <= 32768)."""
    return torch.int16 if pool_size <= 2**15 else torch.int32


MAX_STEPS = 1_000_000  # a client claiming more local steps than this is refused


def encode_pairs(indices: torch.Tensor, grads: torch.Tensor) -> State:
    """One uint8 tensor: the indices' bytes, then the float32 gradients' (one header entry on
    the wire instead of two)."""
    blob = torch.cat([indices.contiguous().view(torch.uint8), grads.contiguous().view(torch.uint8)])
    return OrderedDict([(PAIRS, blob)])


def check_pairs(payload: dict[str, torch.Tensor], pool_size: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The upload's (seed indices, projected gradients), or a ValueError naming the problem."""
    blob = payload.get(PAIRS) if set(payload) == {PAIRS} else None
    if not isinstance(blob, torch.Tensor) or blob.dtype != torch.uint8 or blob.dim() != 1:
        raise ValueError(f"fedkseed upload: expected one 1-D uint8 tensor {PAIRS!r}, got "
                         f"{sorted(payload)[:4]}")
    index_type = index_dtype(pool_size)
    record = index_type.itemsize + 4
    steps = blob.numel() // record
    if blob.numel() % record or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"fedkseed upload: {blob.numel()} bytes is not 1..{MAX_STEPS} "
                         f"(seed index, gradient) pairs of {record} bytes")
    split = steps * index_type.itemsize
    indices = blob[:split].clone().view(index_type)
    grads = blob[split:].clone().view(torch.float32)
    if int(indices.min()) < 0 or int(indices.max()) >= pool_size:
        raise ValueError(f"fedkseed upload: a seed index outside the pool of {pool_size}")
    if not bool(torch.isfinite(grads).all()):
        raise ValueError("fedkseed upload: a projected gradient is not finite")
    return indices, grads


@ALGORITHMS.register("fedkseed", MethodInfo(
    "efficiency.zeroth_order",
    "Federated Full-Parameter Tuning of Billion-Sized Language Models with Communication Cost "
    "under 18 Kilobytes (Qin et al., ICML 2024)",
    "algorithm: {name: fedkseed, zo: {num_seeds: 4096, eps: 0.001}, local: {optimizer: sgd, "
    "lr: 1.0e-5, steps: 200}}",
    "zeroth-order steps along seeded directions from a shared pool; uploads (seed, scalar) "
    "pairs"))
def build_fedkseed(cfg: AlgorithmConfig, num_clients: int) -> Algorithm:
    return Algorithm(name="fedkseed", client=FedKSeedClient(cfg.local, cfg.zo),
                     server=FedKSeedServer(build_delta_server(cfg), cfg.local, cfg.zo),
                     info={"num_seeds": cfg.zo.num_seeds, "eps": cfg.zo.eps})


