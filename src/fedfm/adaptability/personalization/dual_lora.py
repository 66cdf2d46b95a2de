"""Dual LoRA: a federated LoRA adapter and a local one, both active in the forward pass.

The form shared by Qi et al., "FDLoRA: Personalized Federated Learning of Large Language Model
via Dual LoRA Tuning" (arXiv:2406.07925, 2024) and Yang et al., "Dual-Personalizing Adapter
for Federated Foundation Models" (FedDPA, NeurIPS 2024): beside the run's adapter (peft's
``default``, uploaded and averaged as in FedAvg) every client holds a second LoRA adapter
(``personal``, rank ``algorithm.personal.personal_r``, default ``adapter.r``, same targets and
scaling ``alpha / r``) that never leaves it. Both adapters add to the frozen weights (peft
with several active adapters: ``W x + s B_g A_g x + s B_p A_p x``) and train jointly each
round. This module keeps the plain sum: FDLoRA's adaptive fusion weights and FedDPA's
instance-wise gate are not implemented.

The personal adapter's tensors are in the communicated State (the model's trainable
parameters), but each client keeps its own in the client store (``dual_lora_personal``) and
uploads the federated adapter (and a trained classifier head) only; the server fills zero
deltas for the personal adapter, so its global copy stays at its initialisation (``B = 0``:
the global model is the federated adapter alone). ``personal_state`` is the global State with
the client's own personal adapter.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from peft import LoraConfig, PeftModel

from fedfm.adaptability.personalization.common import (
    LocalPartClient,
    LocalPartServer,
    split_keys,
)
from fedfm.algorithms.fedavg import DeltaClient, build_delta_server
from fedfm.config import AlgorithmConfig, ConfigError, RunConfig
from fedfm.core.algorithm import Algorithm
from fedfm.core.loop import derive_seed
from fedfm.core.registries import ALGORITHMS
from fedfm.core.registry import MethodInfo
from fedfm.models.adapters import LORA_A, LORA_B
from fedfm.models.loader import seeded

FEDERATED, PERSONAL = "default", "personal"  # peft adapter names
STATE_KEY = "dual_lora_personal"
_MARKERS = (f"{LORA_A}{PERSONAL}.", f"{LORA_B}{PERSONAL}.")
_INIT_STREAM = 3  # the personal adapter's initialisation seed


def personal_adapter_keys(keys: Iterable[str]) -> list[str]:
    """The personal adapter's LoRA factors among ``keys``."""
    return split_keys(keys, lambda key: any(m in key for m in _MARKERS), "dual_lora",
                      "a factor of the personal LoRA adapter (adapter.kind must be lora)")


def add_personal_adapter(model: PeftModel, r: int, seed: int) -> None:
    """Add the ``personal`` LoRA adapter beside ``default`` (same targets, dropout and scaling)
    and make both active; the trainable flags of the existing parameters are kept."""
    federated = model.peft_config[FEDERATED]
    assert isinstance(federated, LoraConfig)
    config = LoraConfig(r=r, lora_alpha=federated.lora_alpha * r / federated.r,
                        lora_dropout=federated.lora_dropout,
                        target_modules=federated.target_modules,
                        fan_in_fan_out=federated.fan_in_fan_out)
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    with seeded(seed):
        # PeftModel's own add_adapter: the sequence-classification subclass would give the new
        # adapter its own copy of the head, and a head can serve one adapter at a time
        PeftModel.add_adapter(model, PERSONAL, config)
    model.base_model.set_adapter([FEDERATED, PERSONAL])
    for name, param in model.named_parameters():
        if name in trainable:
            param.requires_grad_(trainable[name])


class DualLoRAClient(LocalPartClient):
    def __init__(self, inner: DeltaClient, personal_r: int | None) -> None:
        super().__init__(inner, personal_adapter_keys, STATE_KEY)
        self.personal_r = personal_r

    def prepare_model(self, bundle: Any, config: RunConfig) -> Any:
        """The run's LoRA adapter plus the personal one, both active."""
        model = bundle.model
        if config.adapter.kind != "lora" or not isinstance(model, PeftModel):
            raise ConfigError(f"invalid config: algorithm 'dual_lora' adds a second LoRA "
                              f"adapter beside the run's; adapter.kind is "
                              f"{config.adapter.kind!r} (use lora)")
        add_personal_adapter(model, self.personal_r or config.adapter.r,
                             derive_seed(config.seed, _INIT_STREAM))
        return bundle


@ALGORITHMS.register("dual_lora", MethodInfo(
    "adaptability.personalization",
    "FDLoRA: Personalized Federated Learning of Large Language Model via Dual LoRA Tuning "
    "(Qi et al., arXiv:2406.07925, 2024); Dual-Personalizing Adapter for Federated "
    "Foundation Models (Yang et al., NeurIPS 2024)",
    "algorithm: {name: dual_lora, personal: {personal_r: 4}}",
    "federated LoRA adapter averaged, a second local LoRA adapter kept on each client"))
def build_dual_lora(cfg: AlgorithmConfig, num_clients: int) -> Algorithm:
    client = DualLoRAClient(DeltaClient(cfg.local), cfg.personal.personal_r)
    server = LocalPartServer(build_delta_server(cfg), personal_adapter_keys, "dual_lora")
    return Algorithm(name="dual_lora", client=client, server=server,
                     info={"server_optimizer": cfg.server_optimizer.name,
                           "personal_r": cfg.personal.personal_r})
