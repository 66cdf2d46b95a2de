"""MOON: model-contrastive federated learning.

Li, He & Song, "Model-Contrastive Federated Learning", CVPR 2021. Each local step adds
``mu * l_con`` to the loss, with, for every row's representation ``z`` under the model being
trained, ``z_glob`` under the round's global model and ``z_prev`` under this client's model
from the end of its previous round:

    l_con = -log( exp(cos(z, z_glob)/T) / (exp(cos(z, z_glob)/T) + exp(cos(z, z_prev)/T)) )

so local training is pulled toward the global representation and away from the drifted local
one. ``z_glob`` and ``z_prev`` are computed without gradients, in eval mode, by loading the
two States into the same model for a moment (no model copy: only the trainable tensors
differ). A client's first round uses the global model as its previous one. The
representation is the last hidden layer averaged over each row's tokens (the paper uses its
projection head's output; a pretrained transformer's pooled features play that role here).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from fedfm.adaptability.heterogeneity.base import (
    LossOnly,
    Regularizer,
    RegularizerStep,
    pooled_representation,
)
from fedfm.config import RunConfig, SkewConfig
from fedfm.core.algorithm import ClientContext, ClientState
from fedfm.core.registries import SKEW
from fedfm.core.registry import MethodInfo
from fedfm.core.state import State

STATE_KEY = "moon_previous"


def contrastive_loss(z: torch.Tensor, z_glob: torch.Tensor, z_prev: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """MOON's ``l_con`` averaged over the rows."""
    positive = torch.nn.functional.cosine_similarity(z, z_glob, dim=-1) / temperature
    negative = torch.nn.functional.cosine_similarity(z, z_prev, dim=-1) / temperature
    logits = torch.stack([positive, negative], dim=-1)
    return -torch.log_softmax(logits, dim=-1)[:, 0].mean()


def representation_under(ctx: ClientContext, state: State,
                         batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The pooled representation of ``batch`` with ``state`` loaded (no gradient, eval mode)."""
    model = ctx.model
    was_training = model.training
    ctx.set_state(state)
    model.eval()
    try:
        with torch.no_grad():
            outputs = model(**batch, output_hidden_states=True)
        return pooled_representation(outputs.hidden_states, batch).float()
    finally:
        model.train(was_training)


class ModelContrast:
    name = "moon"

    def __init__(self, mu: float, temperature: float) -> None:
        self.mu = mu
        self.temperature = temperature

    def term(self, step: RegularizerStep) -> torch.Tensor:
        if self.mu == 0.0:
            return step.hidden.new_zeros(())
        ctx = step.ctx
        current = ctx.get_state()
        global_state = step.broadcast.global_state
        previous = (ctx.client_state or {}).get(STATE_KEY) or global_state
        z_glob = representation_under(ctx, global_state, step.batch)
        z_prev = representation_under(ctx, previous, step.batch)
        ctx.set_state(current)
        return self.mu * contrastive_loss(step.hidden.float(), z_glob, z_prev, self.temperature)

    def client_state(self, ctx: ClientContext) -> ClientState:
        return {STATE_KEY: OrderedDict(ctx.get_state())}


@SKEW.register("moon", MethodInfo(
    "adaptability.heterogeneity",
    "Model-Contrastive Federated Learning (Li et al., CVPR 2021)",
    "algorithm: {skew: [{name: moon, mu: 1.0, temperature: 0.5}]}",
    "contrastive term pulls local representations to the global model's, away from the "
    "previous local model's"))
class Moon(LossOnly):
    name = "moon"

    def __init__(self, cfg: SkewConfig, config: RunConfig) -> None:
        self.mu = cfg.mu
        self.temperature = cfg.temperature

    @staticmethod
    def check(cfg: SkewConfig, config: RunConfig) -> None:
        return None

    def regularizer(self) -> Regularizer | None:
        return ModelContrast(self.mu, self.temperature)
