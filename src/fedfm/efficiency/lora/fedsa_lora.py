"""FedSA-LoRA: share A, keep B local.

Guo, Zeng, Xu, Chen, Zhang & Wang, "Selective Aggregation for Low-Rank Adaptation in Federated
Learning", ICLR 2025. Their analysis finds that ``A`` learns what is general across clients and
``B`` what is client-specific, so only ``A`` (and any non-LoRA tensor, e.g. a classifier head) is
uploaded and averaged; each client keeps its own ``B`` in the client store and starts every
round from the global ``A`` and its own ``B``. The global ``B`` stays at its initialisation: the
per-client evaluation uses each client's own ``B`` (``personal_state``), the global evaluation
the shared part alone.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

from fedfm.algorithms.fedavg import DeltaClient, DeltaServer, build_delta_server
from fedfm.config import AlgorithmConfig
from fedfm.core.algorithm import Algorithm, ClientContext, ClientResult, ClientState
from fedfm.core.registries import ALGORITHMS
from fedfm.core.registry import MethodInfo
from fedfm.core.state import State
from fedfm.core.update import Broadcast, ClientUpdate, expand_shared_upload
from fedfm.efficiency.lora.common import require_lora

STATE_KEY = "fedsa_local_b"


def _local_keys(state: State) -> list[str]:
    return [key_b for _, key_b in require_lora(state, "fedsa_lora")]


class FedSAClient:
    def __init__(self, inner: DeltaClient) -> None:
        self.inner = inner

    def personal_state(self, global_state: State, client_state: ClientState | None,
                       extras: Mapping[str, State] | None = None) -> State:
        """The global State with this client's own B (the model it really uses)."""
        own = (client_state or {}).get(STATE_KEY)
        if own is None:
            return global_state
        return OrderedDict((k, own.get(k, v)) for k, v in global_state.items())

    def run(self, ctx: ClientContext, broadcast: Broadcast) -> ClientResult:
        local_keys = _local_keys(broadcast.global_state)
        start = self.personal_state(broadcast.global_state, ctx.client_state)
        ctx.set_state(start)
        result = self.inner.run(ctx, Broadcast(start, broadcast.extras, broadcast.round))
        delta = result.update.payload
        kept = OrderedDict((k, (start[k] + delta[k]).detach().clone()) for k in local_keys)
        result.update.payload = OrderedDict((k, v) for k, v in delta.items()
                                            if k not in set(local_keys))
        result.client_state = {**(ctx.client_state or {}), STATE_KEY: kept}
        return result


class FedSAServer(DeltaServer):
    def __init__(self, inner: DeltaServer) -> None:
        super().__init__(inner.aggregator, inner.optimizer)

    def decode_update(self, update: ClientUpdate, global_state: State) -> ClientUpdate:
        """The shared tensors as uploaded, zero deltas for the local B (never uploaded)."""
        return expand_shared_upload(update, global_state, _local_keys(global_state),
                                    "fedsa_lora")


@ALGORITHMS.register("fedsa_lora", MethodInfo(
    "efficiency.communication.lora_aggregation",
    "Selective Aggregation for Low-Rank Adaptation in Federated Learning (Guo et al., "
    "ICLR 2025)",
    "algorithm: {name: fedsa_lora}",
    "A uploaded and averaged, B kept on each client"))
def build_fedsa_lora(cfg: AlgorithmConfig, num_clients: int) -> Algorithm:
    return Algorithm(name="fedsa_lora", client=FedSAClient(DeltaClient(cfg.local)),
                     server=FedSAServer(build_delta_server(cfg)),
                     info={"server_optimizer": cfg.server_optimizer.name})
