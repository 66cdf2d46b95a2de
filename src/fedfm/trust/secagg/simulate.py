"""Run the SecAgg+ protocol in one process: the local runtime's secure aggregation, and the
reference for the networked deployment (same client and server objects, same messages)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from fedfm.trust.secagg.protocol import (
    SecAggClient,
    SecAggServer,
    neighbourhood_graph,
)


@dataclass
class SecAggCost:
    """Bytes each client sends and receives, and seconds spent, per protocol step."""

    bytes_up_per_client: float = 0.0
    bytes_down_per_client: float = 0.0
    client_seconds: float = 0.0
    server_seconds: float = 0.0
    steps: dict[str, float] = field(default_factory=dict)
    # client id -> (bytes sent, bytes received) over the whole protocol
    per_client: dict[int, tuple[int, int]] = field(default_factory=dict)


@dataclass
class SecAggResult:
    total: np.ndarray  # sum of the survivors' encoded vectors (mod 2^64)
    survived: list[int]
    dropped: list[int]
    cost: SecAggCost


def _nbytes(value: object) -> int:
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, tuple):
        return sum(_nbytes(v) for v in value)
    return 0


def secure_sum(inputs: dict[int, np.ndarray], *, threshold: int, degree: int, seed: int,
               drop_before_shares: set[int] | frozenset[int] = frozenset(),
               drop_after_shares: set[int] | frozenset[int] = frozenset(),
               drop_after_masking: set[int] | frozenset[int] = frozenset()) -> SecAggResult:
    """The sum of ``inputs`` (encoded uint64 vectors) through SecAgg+, with clients dropping at
    the given steps. Raises ``SecAggAbort`` when the survivors cannot unmask correctly."""
    ids = sorted(inputs)
    length = next(iter(inputs.values())).size
    graph = neighbourhood_graph(ids, degree, seed)
    server = SecAggServer(threshold=threshold, graph=graph)
    clients = {u: SecAggClient(u, threshold) for u in ids}
    up: dict[int, int] = dict.fromkeys(ids, 0)
    down: dict[int, int] = dict.fromkeys(ids, 0)
    client_time = 0.0

    start = time.perf_counter()
    for u, client in clients.items():  # 1. advertise keys
        server.public_keys[u] = client.advertise_keys()
        up[u] += _nbytes(server.public_keys[u])
    alive = [u for u in ids if u not in drop_before_shares]
    outgoing = {}
    for u in alive:  # 2. share keys
        keys = server.keys_for(u)
        down[u] += _nbytes(keys)
        outgoing[u] = clients[u].share_keys(keys)
        up[u] += _nbytes(outgoing[u])
    inbox = server.route_shares(outgoing)
    alive = [u for u in alive if u not in drop_after_shares]
    for u in alive:  # 3. masked input
        clients[u].receive_shares(inbox.get(u, {}))
        down[u] += _nbytes(inbox.get(u, {}))
        server.masked[u] = clients[u].masked_input(inputs[u])
        up[u] += server.masked[u].nbytes
    survived, dropped = server.unmask_request()
    responders = [u for u in survived if u not in drop_after_masking]
    responses = {}
    for u in responders:  # 4. unmask
        responses[u] = clients[u].unmask(survived, dropped)
        up[u] += _nbytes(responses[u])
    client_time = time.perf_counter() - start
    server_start = time.perf_counter()
    total = server.aggregate(responses, length)
    server_seconds = time.perf_counter() - server_start
    cost = SecAggCost(bytes_up_per_client=float(np.mean(list(up.values()))),
                      bytes_down_per_client=float(np.mean(list(down.values()))),
                      client_seconds=client_time / len(ids), server_seconds=server_seconds,
                      per_client={u: (up[u], down[u]) for u in ids})
    return SecAggResult(total, survived, dropped, cost)
