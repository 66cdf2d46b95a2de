"""FedBPT: federated black-box prompt tuning with CMA-ES.

Sun, Xu, Wang, Li, Duan & Chen, "FedBPT: Efficient Federated Black-box Prompt Tuning for Large
Language Models", ICML 2024, building on Black-Box Tuning (Sun, Shao, Qian, Huang & Qiu, ICML
2022). The model's owner serves forward queries only. Everything the adapter would train (the soft
prompt of ``adapter.kind: prompt_tuning``, and the classifier head when ``adapter.train_head``) is
reparameterised as ``theta = theta_0 + A z`` with a fixed random ``A`` (seeded, ``A_ij ~ N(0, s^2 /
d)`` with ``s`` the spread of ``theta_0``), so the communicated State is ``z`` alone (``d =
bpt.intrinsic_dim`` numbers). Each client runs CMA-ES on ``z`` from the global mean and step size:
every candidate is one query (the loss of a batch), never a gradient. It uploads its final mean (as
a delta, so FedAvg's weighted mean and any FedOpt server optimizer apply) and its step size; the
server averages the step sizes and broadcasts them with ``z``. Query counts are reported per
client.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fedfm.algorithms.fedavg import build_delta_server
from fedfm.algorithms.local_train import batch_indices
from fedfm.config import AlgorithmConfig, BlackBoxConfig, LocalTrainingConfig
from fedfm.core.algorithm import (
    Algorithm,
    ClientContext,
    ClientResult,
    ServerRule,
    ServerWrapper,
)
from fedfm.core.registries import ALGORITHMS
from fedfm.core.registry import MethodInfo
from fedfm.core.state import State
from fedfm.core.update import Broadcast, ClientUpdate

EXTRAS_KEY = "fedbpt"  # broadcast: {"sigma": [s]}; update aux: {"sigma": [s_i]}
Z_NAME = "fedbpt_intrinsic.z"


class IntrinsicPrompt(torch.nn.Module):
    """``theta = theta_0 + A z`` written into the adapter's (frozen) tensors before every
    forward pass; ``z`` is the model's only trainable parameter."""

    def __init__(self, targets: list[tuple[str, torch.nn.Parameter]], dim: int,
                 seed: int) -> None:
        super().__init__()
        self.targets = targets
        flat = torch.cat([p.detach().reshape(-1).float().cpu() for _, p in targets])
        self.register_buffer("theta0", flat, persistent=False)
        spread = float(flat.std()) if flat.numel() > 1 and float(flat.std()) > 0 else 1e-2
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("projection", torch.randn(flat.numel(), dim, generator=generator)
                             * (spread / math.sqrt(dim)), persistent=False)
        self.z = torch.nn.Parameter(torch.zeros(dim))

    @torch.no_grad()
    def apply(self) -> None:
        theta = self.theta0 + self.projection @ self.z.detach().float()
        offset = 0
        for _, param in self.targets:
            count = param.numel()
            param.copy_(theta[offset:offset + count].view_as(param).to(param.dtype))
            offset += count


def reparameterise(model: torch.nn.Module, dim: int, seed: int) -> IntrinsicPrompt:
    """Freeze what the adapter trains, make ``z`` the only trainable parameter and project it
    into those tensors before each forward."""
    targets = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not targets:
        raise ValueError("fedbpt: the adapter leaves nothing to tune")
    for _, param in targets:
        param.requires_grad_(False)
    intrinsic = IntrinsicPrompt(targets, dim, seed)
    model.add_module("fedbpt_intrinsic", intrinsic)
    model.register_forward_pre_hook(lambda module, args: intrinsic.apply())
    return intrinsic


class BlackBox:
    """The client's whole view of the model: the loss of a batch for a given ``z``."""

    def __init__(self, ctx: ClientContext) -> None:
        self.ctx = ctx
        self.queries = 0
        self.examples = 0

    def loss(self, z: np.ndarray, rows: list[dict[str, Any]]) -> float:
        from fedfm.efficiency.zeroth_order.common import device_batch, loss_function

        self.ctx.set_state({Z_NAME: torch.as_tensor(z, dtype=torch.float32)})
        self.queries += 1
        self.examples += len(rows)
        return float(loss_function(self.ctx)(device_batch(self.ctx, rows)))


class FedBPTClient:
    def __init__(self, local: LocalTrainingConfig, cfg: BlackBoxConfig) -> None:
        self.local = local
        self.cfg = cfg

    def run(self, ctx: ClientContext, broadcast: Broadcast) -> ClientResult:
        from cmaes import CMA

        if not ctx.train_examples:
            raise ValueError(f"client {ctx.client_id} has no training examples")
        start = broadcast.global_state[Z_NAME].double().numpy()
        sigma = float(broadcast.extras.get(EXTRAS_KEY, {}).get(
            "sigma", torch.tensor([self.cfg.sigma])))
        search = CMA(mean=start.copy(), sigma=sigma, population_size=self.cfg.population,
                     seed=ctx.seed)
        box = BlackBox(ctx)
        ctx.model.eval()
        generator = torch.Generator().manual_seed(ctx.seed)
        examples = ctx.train_examples
        losses = []
        for rows in batch_indices(len(examples), self.local.batch_size, self.cfg.generations,
                                  generator):
            batch = [examples[i] for i in rows]
            told = [(x, box.loss(x, batch)) for x in (search.ask() for _ in
                                                     range(search.population_size))]
            search.tell(told)
            losses.append(sum(value for _, value in told) / len(told))
        found = torch.as_tensor(search.mean, dtype=torch.float32)
        ctx.set_state({Z_NAME: found})
        delta = OrderedDict([(Z_NAME, found - broadcast.global_state[Z_NAME])])
        # cmaes keeps its step size in ``_sigma`` (no public accessor in the pinned 0.12.0)
        step = float(search._sigma)
        update = ClientUpdate(ctx.client_id, delta, len(examples), {
            "train_loss": sum(losses) / len(losses), "queries": float(box.queries),
            "query_examples": float(box.examples), "cma_sigma": step},
            aux={EXTRAS_KEY: OrderedDict(sigma=torch.tensor([step], dtype=torch.float64))})
        return ClientResult(update)


class FedBPTServer(ServerWrapper):
    """FedAvg of the clients' CMA-ES means (any server optimizer), mean of their step sizes."""

    def __init__(self, inner: ServerRule, cfg: BlackBoxConfig) -> None:
        super().__init__(inner)
        self.sigma = cfg.sigma

    def broadcast_extras(self, global_state: State) -> dict[str, State]:
        return {EXTRAS_KEY: OrderedDict(sigma=torch.tensor([self.sigma], dtype=torch.float64))}

    def check_update(self, update: ClientUpdate, global_state: State) -> None:
        step = update.aux.get(EXTRAS_KEY, {}).get("sigma")
        if step is None or step.numel() != 1 or not 0 < float(step) < 1e6:
            raise ValueError("fedbpt: the update lacks a positive, finite CMA-ES step size")

    def aggregate(self, global_state: State, updates: list[ClientUpdate], round: int) -> State:
        self.sigma = sum(float(u.aux[EXTRAS_KEY]["sigma"]) for u in updates) / len(updates)
        return self.inner.aggregate(global_state, updates, round)

    def state_dict(self) -> dict[str, State]:
        return {**self.inner.state_dict(),
                "fedbpt": OrderedDict(sigma=torch.tensor([self.sigma], dtype=torch.float64))}

    def load_state_dict(self, states: Mapping[str, State]) -> None:
        self.inner.load_state_dict({k: v for k, v in states.items() if k != "fedbpt"})
        if "fedbpt" in states:
            self.sigma = float(states["fedbpt"]["sigma"])


class FedBPTAlgorithmServer(FedBPTServer):
    """Binds to the workload: reparameterises its model once (``theta_0 + A z``)."""

    def __init__(self, inner: ServerRule, cfg: BlackBoxConfig) -> None:
        super().__init__(inner, cfg)
        self.dim = cfg.intrinsic_dim

    def bind_workload(self, workload: Any) -> None:
        reparameterise(workload.model, self.dim, int(workload.config.seed))


@ALGORITHMS.register("fedbpt", MethodInfo(
    "trust.ip.black_box",
    "FedBPT: Efficient Federated Black-box Prompt Tuning for Large Language Models (Sun et "
    "al., ICML 2024)",
    "algorithm: {name: fedbpt, bpt: {intrinsic_dim: 500, population: 20, generations: 8}}",
    "CMA-ES on a random subspace of the soft prompt: forward queries only, z averaged"))
def build_fedbpt(cfg: AlgorithmConfig, num_clients: int) -> Algorithm:
    return Algorithm(name="fedbpt", client=FedBPTClient(cfg.local, cfg.bpt),
                     server=FedBPTAlgorithmServer(build_delta_server(cfg), cfg.bpt),
                     info={"intrinsic_dim": cfg.bpt.intrinsic_dim})
