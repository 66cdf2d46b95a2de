"""What the "keep part of the model at home" personalization methods share.

FedPer and FedRep keep a head, the dual adapters a second LoRA adapter: some tensors of the
communicated State are *local*. Each client stores its own copy of them in the client store
(``ClientResult.client_state``, persisted across rounds and checkpoints by the loop), starts
every round from the global shared tensors plus its own local ones, and uploads the shared
delta only. The server fills zero deltas for the local tensors, so their global values never
move; the global model is the shared part with the local tensors at their initialisation, and
each client's own model (``personal_state``) is what the personalized evaluation measures.
This is the pattern of FedSA-LoRA (``fedfm.efficiency.lora.fedsa_lora``) with the choice of
local tensors left to the method.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping

import torch

from fedfm.algorithms.fedavg import DeltaClient, DeltaServer
from fedfm.algorithms.local_train import LocalTrainingResult
from fedfm.core.algorithm import ClientContext, ClientResult, ClientState
from fedfm.core.state import State
from fedfm.core.update import Broadcast, ClientUpdate, expand_shared_upload

LocalKeys = Callable[[Iterable[str]], list[str]]
"""The local (never uploaded) keys among a State's keys, in order; raises ValueError when the
split leaves nothing local or nothing shared."""


def split_keys(keys: Iterable[str], is_local: Callable[[str], bool], method: str,
               what: str) -> list[str]:
    """The keys ``is_local`` picks, after checking that both halves are non-empty."""
    keys = list(keys)
    local = [key for key in keys if is_local(key)]
    if not local:
        raise ValueError(f"{method}: no tensor of the communicated State is {what}; "
                         f"found {keys[:3]}...")
    if len(local) == len(keys):
        raise ValueError(f"{method}: every tensor of the communicated State is {what}, so "
                         f"nothing would be shared")
    return local


def merged(global_state: State, own: Mapping[str, torch.Tensor] | None) -> State:
    """``global_state`` with the tensors of ``own`` in place of its own values."""
    if own is None:
        return global_state
    return OrderedDict((k, own.get(k, v)) for k, v in global_state.items())


class LocalPartClient:
    """Train from (global shared + own local) tensors, keep the local ones, upload the rest.

    Subclasses change how a round trains (``train_round``); the result is the same
    ``DeltaClient`` result with the local tensors taken out of the upload."""

    def __init__(self, inner: DeltaClient, local_keys: LocalKeys, store_key: str) -> None:
        self.inner = inner
        self.local_keys = local_keys
        self.store_key = store_key

    def personal_state(self, global_state: State, client_state: ClientState | None,
                       extras: Mapping[str, State] | None = None) -> State:
        """The global State with this client's own local tensors (the model it uses)."""
        return merged(global_state, (client_state or {}).get(self.store_key))

    def train_round(self, ctx: ClientContext, broadcast: Broadcast) -> LocalTrainingResult:
        """One round's local training from ``broadcast.global_state`` (already loaded)."""
        return self.inner.train(ctx, broadcast)

    def run(self, ctx: ClientContext, broadcast: Broadcast) -> ClientResult:
        local_keys = self.local_keys(broadcast.global_state)
        start = self.personal_state(broadcast.global_state, ctx.client_state)
        ctx.set_state(start)
        own_start = Broadcast(start, broadcast.extras, broadcast.round)
        result = self.inner.finish(ctx, own_start, self.train_round(ctx, own_start))
        trained = ctx.get_state()  # the local tensors exactly as trained (not start + delta)
        kept = OrderedDict((k, trained[k]) for k in local_keys)
        local = set(local_keys)
        result.update.payload = OrderedDict((k, v) for k, v in result.update.payload.items()
                                            if k not in local)
        result.client_state = {**(ctx.client_state or {}), self.store_key: kept}
        return result


class LocalPartServer(DeltaServer):
    """FedAvg over the shared tensors; zero deltas for the local ones (never uploaded)."""

    def __init__(self, inner: DeltaServer, local_keys: LocalKeys, method: str) -> None:
        super().__init__(inner.aggregator, inner.optimizer)
        self.local_keys = local_keys
        self.method = method

    def decode_update(self, update: ClientUpdate, global_state: State) -> ClientUpdate:
        return expand_shared_upload(update, global_state, self.local_keys(global_state),
                                    self.method)
