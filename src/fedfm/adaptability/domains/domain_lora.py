"""Multi-domain adaptation: a shared LoRA adapter plus one LoRA adapter per domain.

Clients are grouped by a domain key (``data.group_by``; a client's domain is the most common
value of its training rows). Every client trains the shared adapter and its own domain's
adapter; the shared adapter (and the classifier head) is averaged over all clients, each domain
adapter over that domain's clients only. This is the shared + specific adapter pair of FedDAT
(Chen, Zhang, Krompass, Gu & Tresp, "FedDAT: An Approach for Foundation Model Finetuning in
Multi-Modal Heterogeneous Federated Learning", AAAI 2024), with the specific adapter shared
within a domain rather than kept on one client (and without FedDAT's mutual distillation).

Where the adapters live: the global State holds the shared adapter and a slot for every domain
adapter at its initialisation (``B = 0``, so it adds nothing); the server keeps the trained
domain adapters (checkpointed in its ``state_dict``) and sends them as broadcast and evaluation
extras. So the *global model* is the shared adapter alone (what a client of an unknown domain
gets), and a client's *personal model* is the global State with its domain's adapter filled in.
A client uploads the delta of the shared tensors and of its own domain's tensors, nothing of the
other domains: the server fills those with zeros for the shared aggregation (they never count as
zero updates of a domain adapter) and averages each domain over its own uploads.

``algorithm.domains.router: true`` drops the domain labels at training and inference: a learned
softmax gate over the mean-pooled input embeddings mixes all domain adapters per input (a
Mixture of LoRA Experts, Wu, Huang & Wei, ICLR 2024, with a shared expert, federated as in
Reisser, Louizos, Gavves & Welling, "Federated Mixture of Experts", arXiv:2107.06724, 2021).
Everything (shared adapter, domain adapters, gate, head) is trained by every client and averaged
by FedAvg; the global model routes each input itself.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedfm.adaptability.domains.adapters import (
    SHARED,
    active_adapters,
    adapter_index,
    adapter_name,
    add_domain_adapters,
    attach_router,
    domain_of_key,
    split_keys,
    with_adapter,
)
from fedfm.algorithms.fedavg import DeltaClient, DeltaServer, build_delta_server, with_prefix
from fedfm.algorithms.local_train import train_locally
from fedfm.config import AlgorithmConfig, ConfigError, LocalTrainingConfig, RunConfig
from fedfm.core import state as state_ops
from fedfm.core.algorithm import Algorithm, ClientContext, ClientResult, ClientState, ServerWrapper
from fedfm.core.registries import ALGORITHMS
from fedfm.core.registry import MethodInfo
from fedfm.core.state import State
from fedfm.core.update import Broadcast, ClientUpdate

NAME = "domain_lora"
STATE_KEY = "domain_lora"  # client store: {"adapter": tensor(index of the client's domain)}
METADATA_KEY = "domain_adapter"  # ClientUpdate.metadata: the domain adapter the upload trains


# --------------------------------------------------------------------------- config


def check_domains(config: RunConfig) -> None:
    """Refuse what domain_lora cannot run, before the data is built."""
    name = config.algorithm.name
    if name != NAME:
        if config.algorithm.domains.router:
            raise ConfigError(f"invalid config: algorithm.domains.router is read by algorithm "
                              f"{NAME!r}; algorithm {name!r} would ignore it")
        return
    if config.data.group_by is None:
        raise ConfigError(f"invalid config: algorithm {NAME!r} keeps one adapter per domain "
                          f"and needs data.group_by (the column naming each row's domain)")
    if config.adapter.kind != "lora":
        raise ConfigError(f"invalid config: algorithm {NAME!r} adds LoRA domain adapters "
                          f"beside the shared one; adapter.kind is {config.adapter.kind!r} "
                          f"(use lora)")
    for enabled, option, why in _refusals(config):
        if enabled:
            raise ConfigError(f"invalid config: algorithm {NAME!r} cannot be combined with "
                              f"{option}: {why}")


def _refusals(config: RunConfig) -> list[tuple[bool, str, str]]:
    partial = "a client uploads the shared tensors and its own domain's only"
    router = config.algorithm.domains.router
    return [
        (config.algorithm.compression is not None, "algorithm.compression",
         f"{partial}, and the compressed layout follows the global State's shapes"),
        (config.privacy.client_dp is not None, "privacy.client_dp",
         f"{partial}; clipping and noise apply to dense updates of the global State's shape"),
        (config.privacy.secure_aggregation is not None, "privacy.secure_aggregation",
         f"{partial}; the server must see which domain an upload trains"),
        (config.privacy.dp_sgd is not None, "privacy.dp_sgd",
         "its local training does not choose the active adapters"),
        (config.robustness.attack is not None, "robustness.attack",
         "the simulated attackers forge updates in the global State's shape"),
        (config.algorithm.aggregator == "fltrust", "algorithm.aggregator 'fltrust'",
         "its server update trains on root rows of no single domain"),
        (config.runtime.kind == "batched", "runtime.kind 'batched'",
         "its stacked per-client LoRA layers hold one adapter per layer"),
        (router and config.runtime.compile, "runtime.compile",
         "the router's hooks keep the batch's gate weights between modules"),
        (router and config.algorithm.local.packing, "algorithm.local.packing",
         "the router gates whole rows, and a packed row holds several examples"),
        (config.runtime.kind == "remote" and declared_names(config) is None,
         "runtime.kind 'remote' without declared domain names",
         "the coordinator and every client must build the same domain adapters, and none of "
         "them sees all the data"),
    ]


def declared_names(config: RunConfig) -> list[str] | None:
    """``algorithm.domains.names`` when the config declares the domains (a deployment, whose
    coordinator and clients must build the same adapters without each other's data)."""
    names = getattr(config.algorithm.domains, "names", None)
    return list(names) if names else None


def domain_names(config: RunConfig) -> list[str]:
    """The declared domain names, else the sorted ``data.group_by`` values of the training
    (and validation) rows; domain adapter ``domain_i`` belongs to the i-th."""
    from fedfm.data.formats import load_records

    declared = declared_names(config)
    if declared is not None:
        return declared
    data = config.data
    column = data.group_by
    assert column is not None
    sources = [(data.path, data.max_rows), (data.validation_path, None)]
    values: set[str] = set()
    for path, max_rows in sources:
        if path is not None:
            records = load_records(path, data, columns=(column,), max_rows=max_rows)
            values.update(str(row[column]) for row in records.rows)
    if not values:
        raise ConfigError(f"invalid config: data.group_by {column!r}: no domain found in "
                          f"{data.path}")
    return sorted(values)


def majority_group(examples: Sequence[Mapping[str, Any]]) -> str:
    """The most common ``group`` of ``examples`` (ties: the smallest value), as the data layer
    assigns each client's group."""
    counts = Counter(str(e["group"]) for e in examples if "group" in e)
    if not counts:
        raise ValueError(f"{NAME}: the client's examples carry no domain (set data.group_by)")
    return min(counts, key=lambda g: (-counts[g], g))


# --------------------------------------------------------------------------- clients


class DomainClient:
    """Train the shared adapter and the client's own domain adapter; upload both deltas."""

    def __init__(self, local: LocalTrainingConfig) -> None:
        self.local = local
        self.domains: list[str] = []

    def prepare_model(self, bundle: Any, config: RunConfig) -> Any:
        check_domains(config)
        self.domains = domain_names(config)
        add_domain_adapters(bundle.model, len(self.domains), seed=config.seed)
        return bundle

    def adapter_for(self, examples: Sequence[Mapping[str, Any]]) -> str:
        domain = majority_group(examples)
        if domain not in self.domains:
            raise ValueError(f"{NAME}: domain {domain!r} has no adapter (known: "
                             f"{', '.join(self.domains)})")
        return adapter_name(self.domains.index(domain))

    def run(self, ctx: ClientContext, broadcast: Broadcast) -> ClientResult:
        name = self.adapter_for(ctx.train_examples)
        start = own_model(broadcast.global_state, broadcast.extras, name)
        ctx.set_state(start)
        with active_adapters(ctx.model, [SHARED, name]):
            result = train_locally(ctx, self.local)
        trained = ctx.get_state()
        shared, domains = split_keys(start)
        delta = OrderedDict((k, trained[k] - start[k]) for k in [*shared, *domains[name]])
        update = ClientUpdate(ctx.client_id, delta, len(ctx.train_examples), result.metrics(),
                              metadata={METADATA_KEY: name})
        marker: State = OrderedDict(adapter=torch.tensor(adapter_index(name)))
        return ClientResult(update, {**(ctx.client_state or {}), STATE_KEY: marker})

    def routed_metrics(self, workload: Any, global_state: State,
                       extras: Mapping[str, State]) -> dict[str, float]:
        """Global validation metrics with each row routed to its domain's adapter."""
        return routed_metrics(workload, global_state, extras)

    def personal_state(self, global_state: State, client_state: ClientState | None,
                       extras: Mapping[str, State] | None = None) -> State:
        """The global State with the client's domain adapter (the model it really uses); the
        global State itself for a client that has not trained yet."""
        marker = (client_state or {}).get(STATE_KEY)
        if marker is None:
            return global_state
        return own_model(global_state, extras or {}, adapter_name(int(marker["adapter"])))


def own_model(global_state: State, adapters: Mapping[str, State], name: str) -> State:
    adapter = adapters.get(name)
    if adapter is None:
        raise ValueError(f"{NAME}: the server sent no adapter {name!r}")
    return with_adapter(global_state, adapter)


def routed_metrics(workload: Any, global_state: State, adapters: Mapping[str, State]
                   ) -> dict[str, float]:
    """The global validation metrics with every example routed to its own domain's adapter
    (its ``group``): each group's rows are evaluated with that domain's model and the groups
    combined weighted by their examples (tokens for language models), so accuracy and loss are
    exactly the routed model's; macro-F1 is the weighted mean of the groups' F1.
    ``adapters``: the server's ``evaluation_extras``."""
    client: DomainClient = workload.client
    examples = workload.data.global_validation
    if workload.config.eval.max_examples is not None:
        examples = examples[: workload.config.eval.max_examples]
    groups: dict[str, list[dict[str, Any]]] = {}
    for example in examples:
        groups.setdefault(str(example["group"]), []).append(example)
    parts = [workload.evaluate_examples(
        own_model(global_state, adapters, client.adapter_for(rows)), rows)
        for _, rows in sorted(groups.items())]
    workload.set_state(global_state)
    return combine_metrics(parts)


_COUNTS = ("examples", "tokens")


def combine_metrics(parts: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Metrics of disjoint example sets, combined weighted by each set's count."""
    from fedfm.eval.metrics import perplexity

    if not parts:
        return {}
    count = next((key for key in _COUNTS if key in parts[0]), None)
    weights = [float(part[count]) if count else 1.0 for part in parts]
    total = sum(weights)
    out = {key: sum(w * float(part[key]) for w, part in zip(weights, parts, strict=True)) / total
           for key in parts[0] if key not in _COUNTS}
    if count is not None:
        out[count] = total
    if "perplexity" in out and "loss" in out:
        out["perplexity"] = perplexity(out["loss"])
    return out


class RouterClient(DeltaClient):
    """FedAvg's client on a model whose domain adapters are mixed by a learned gate."""

    def prepare_model(self, bundle: Any, config: RunConfig) -> Any:
        check_domains(config)
        names = add_domain_adapters(bundle.model, len(domain_names(config)), seed=config.seed)
        attach_router(bundle.model, names, bundle.tokenizer.pad_token_id)
        return bundle


# --------------------------------------------------------------------------- server


class DomainServer(ServerWrapper):
    """The inner server averages the shared tensors over every upload; one ``DeltaServer`` per
    domain (same aggregator and server optimizer, state of its own) averages that domain's
    adapter over its uploads. The global State's domain slots keep their initialisation."""

    def __init__(self, inner: DeltaServer, cfg: AlgorithmConfig) -> None:
        super().__init__(inner)
        self.cfg = cfg
        self.adapters: dict[str, State] = {}
        self.servers: dict[str, DeltaServer] = {}

    def _ensure(self, global_state: State) -> None:
        for name, keys in split_keys(global_state)[1].items():
            if name not in self.adapters:
                self.adapters[name] = state_ops.clone(state_ops.select(global_state, keys))
            if name not in self.servers:
                self.servers[name] = build_delta_server(self.cfg)

    def broadcast_extras(self, global_state: State) -> dict[str, State]:
        self._ensure(global_state)
        return {**self.inner.broadcast_extras(global_state), **self.adapters}

    def evaluation_extras(self, global_state: State) -> dict[str, State]:
        self._ensure(global_state)
        return dict(self.adapters)

    def decode_update(self, update: ClientUpdate, global_state: State) -> ClientUpdate:
        """The upload with zeros for the other domains' tensors (never uploaded); refused when
        it does not hold exactly the shared tensors and one domain's."""
        shared, domains = split_keys(global_state)
        name = update.metadata.get(METADATA_KEY)
        if name not in domains:
            raise ValueError(f"{NAME} upload: unknown domain adapter {name!r}")
        expected = {*shared, *domains[name]}
        unexpected = [k for k in update.payload if k not in expected]
        missing = [k for k in expected if k not in update.payload]
        if unexpected or missing:
            raise ValueError(f"{NAME} upload: expected the shared tensors and {name}'s "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        payload = OrderedDict((k, update.payload[k] if k in expected else torch.zeros_like(v))
                              for k, v in global_state.items())
        return dataclasses.replace(update, payload=payload)

    def aggregate(self, global_state: State, updates: list[ClientUpdate], round: int) -> State:
        self._ensure(global_state)
        shared_next = self.inner.aggregate(global_state, updates, round)
        for name, group in _by_adapter(updates).items():
            keys = list(self.adapters[name])
            part = [dataclasses.replace(u, payload=state_ops.select(u.payload, keys))
                    for u in group]
            self.adapters[name] = self.servers[name].aggregate(self.adapters[name], part, round)
        return OrderedDict((k, v if domain_of_key(k) is not None else shared_next[k])
                           for k, v in global_state.items())

    def state_dict(self) -> dict[str, State]:
        states = {f"shared.{k}": v for k, v in self.inner.state_dict().items()}
        for name, adapter in self.adapters.items():
            states[f"adapter.{name}"] = adapter
            states.update({f"server.{name}.{k}": v
                           for k, v in self.servers[name].state_dict().items()})
        return states

    def load_state_dict(self, states: Mapping[str, State]) -> None:
        self.inner.load_state_dict(with_prefix(states, "shared."))
        self.adapters = {k: OrderedDict(v) for k, v in with_prefix(states, "adapter.").items()}
        self.servers = {}
        for name in self.adapters:
            self.servers[name] = build_delta_server(self.cfg)
            self.servers[name].load_state_dict(with_prefix(states, f"server.{name}."))


def _by_adapter(updates: list[ClientUpdate]) -> dict[str, list[ClientUpdate]]:
    groups: dict[str, list[ClientUpdate]] = {}
    for update in updates:
        groups.setdefault(str(update.metadata[METADATA_KEY]), []).append(update)
    return groups


# --------------------------------------------------------------------------- registration


@ALGORITHMS.register(NAME, MethodInfo(
    "adaptability.multi_domain",
    "FedDAT: An Approach for Foundation Model Finetuning in Multi-Modal Heterogeneous "
    "Federated Learning (Chen et al., AAAI 2024); router: Federated Mixture of Experts "
    "(Reisser et al., arXiv 2021) over Mixture of LoRA Experts (Wu et al., ICLR 2024)",
    "data: {group_by: domain}\nalgorithm: {name: domain_lora, domains: {router: false}}",
    "shared LoRA averaged over all clients + one LoRA per domain averaged within its domain; "
    "router: a learned gate mixes the domain adapters per input"))
def build_domain_lora(cfg: AlgorithmConfig, num_clients: int) -> Algorithm:
    if cfg.domains.router:
        return Algorithm(name=NAME, client=RouterClient(cfg.local),
                         server=build_delta_server(cfg),
                         info={"domains": "router", "server_optimizer": cfg.server_optimizer.name})
    return Algorithm(name=NAME, client=DomainClient(cfg.local),
                     server=DomainServer(build_delta_server(cfg), cfg),
                     info={"domains": "per-domain adapters",
                           "server_optimizer": cfg.server_optimizer.name})
