"""Secure aggregation over the deployment's HTTPS transport: SecAgg+ (Bell et al., "Secure
Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020) between the coordinator
and its client agents, with the same ``SecAggClient`` / ``SecAggServer`` objects the simulator
drives in one process (:mod:`fedfm.trust.secagg.protocol`).

A round with ``privacy.secure_aggregation`` runs, after local training, four barrier steps; each
closes when every client still in the protocol has answered or its step deadline passes, and a
client missing a step is a dropout the protocol recovers from (or aborts on, naming why):

1. ``advertise``: each client posts its two public keys and its update's scalars (example
   count, metrics) -- never its update;
2. ``share``: it fetches its neighbours' keys and posts its encrypted Shamir shares, which the
   coordinator only routes;
3. ``mask``: it fetches the shares addressed to it and uploads its masked input, the fixed-point
   encoding of ``w * delta`` and ``w`` plus masks that cancel in the sum;
4. ``unmask``: it answers which of its neighbours' secrets to reveal.

The coordinator ends with the sum of the survivors' inputs and nothing else; the round's server
rule (``secure_mean``) gets it through ``NetworkSecureSum``. The protocol's state lives in the
coordinator's memory: a coordinator restart in the middle of such a round aborts that round
(the masks cannot be removed without it) and the run goes on with the next one.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedfm.core.state import State
from fedfm.deploy.faults import crash_point
from fedfm.trust.secagg.aggregation import SecureSum, _unflatten
from fedfm.trust.secagg.protocol import (
    SecAggAbort,
    SecAggClient,
    SecAggServer,
    neighbourhood_graph,
)

PHASES = ("advertise", "share", "mask", "unmask", "done")
KEY_BYTES = 32


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: Any, what: str, size: int | None = None) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"{what}: expected a base64 string")
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        raise ValueError(f"{what}: not valid base64") from None
    if size is not None and len(raw) != size:
        raise ValueError(f"{what}: {len(raw)} bytes, expected {size}")
    return raw


@dataclass
class SecureRound:
    """The coordinator's side of one round's protocol (guarded by the coordinator's lock)."""

    round: int
    participants: list[int]
    summer: SecureSum
    length: int  # ring elements per input: the State's size plus the extra scalars
    seed: int
    phase: str = "advertise"
    keys: dict[int, dict[str, bytes]] = field(default_factory=dict)
    facts: dict[int, dict[str, Any]] = field(default_factory=dict)
    outgoing: dict[int, dict[int, bytes]] = field(default_factory=dict)
    inbox: dict[int, dict[int, bytes]] = field(default_factory=dict)
    responses: dict[int, dict[int, tuple[str, bytes]]] = field(default_factory=dict)
    server: SecAggServer | None = None
    threshold: int = 0
    up: dict[int, int] = field(default_factory=dict)
    down: dict[int, int] = field(default_factory=dict)
    total: np.ndarray | None = None
    failure: str | None = None
    started: float = field(default_factory=time.perf_counter)

    def expect(self, phase: str, client_id: int) -> None:
        if client_id not in self.participants:
            raise PermissionError(f"client {client_id} is not in round {self.round}'s secure "
                                  f"aggregation")
        if self.phase != phase:
            raise LookupError(f"secure aggregation of round {self.round} is in step "
                              f"{self.phase!r}, not {phase!r}")

    def count(self, client_id: int, sent: int = 0, received: int = 0) -> None:
        self.up[client_id] = self.up.get(client_id, 0) + sent
        self.down[client_id] = self.down.get(client_id, 0) + received

    # ------------------------------------------------------------------ steps

    def advertise(self, client_id: int, c_pk: bytes, s_pk: bytes, facts: dict[str, Any]) -> None:
        self.expect("advertise", client_id)
        if client_id in self.keys:
            raise FileExistsError(f"client {client_id} already advertised its keys")
        self.keys[client_id] = {"c_pk": c_pk, "s_pk": s_pk}
        self.facts[client_id] = facts
        self.count(client_id, sent=2 * KEY_BYTES)

    def close_advertise(self) -> None:
        ids = sorted(self.keys)
        if ids:
            degree, self.threshold = self.summer.graph_parameters(len(ids))
            self.server = SecAggServer(threshold=self.threshold,
                                       graph=neighbourhood_graph(ids, degree, self.seed))
            self.server.public_keys = dict(self.keys)
        self.phase = "share"

    def neighbour_keys(self, client_id: int) -> dict[int, dict[str, bytes]]:
        self.expect("share", client_id)
        if self.server is None or client_id not in self.keys:
            raise PermissionError(f"client {client_id} did not advertise keys in time")
        found = self.server.keys_for(client_id)
        self.count(client_id, received=2 * KEY_BYTES * len(found))
        return found

    def share(self, client_id: int, shares: dict[int, bytes]) -> None:
        self.expect("share", client_id)
        assert self.server is not None
        allowed = set(self.server.graph.get(client_id, []))
        if not set(shares) <= allowed:
            raise ValueError(f"shares addressed to {sorted(set(shares) - allowed)}, which are "
                             f"not client {client_id}'s neighbours")
        if client_id in self.outgoing:
            raise FileExistsError(f"client {client_id} already sent its shares")
        self.outgoing[client_id] = shares
        self.count(client_id, sent=sum(len(v) for v in shares.values()))

    def close_share(self) -> None:
        if self.server is not None:
            self.inbox = self.server.route_shares(self.outgoing)
        self.phase = "mask"

    def shares_for(self, client_id: int) -> dict[int, bytes]:
        self.expect("mask", client_id)
        if client_id not in self.outgoing:
            raise PermissionError(f"client {client_id} did not share its keys in time")
        found = self.inbox.get(client_id, {})
        self.count(client_id, received=sum(len(v) for v in found.values()))
        return found

    def mask(self, client_id: int, vector: np.ndarray) -> None:
        self.expect("mask", client_id)
        assert self.server is not None
        if client_id not in self.outgoing:
            raise PermissionError(f"client {client_id} did not share its keys in time")
        if vector.size != self.length:
            raise ValueError(f"masked input has {vector.size} elements, expected {self.length}")
        if client_id in self.server.masked:
            raise FileExistsError(f"client {client_id} already sent its masked input")
        self.server.masked[client_id] = vector
        self.count(client_id, sent=vector.nbytes)

    def close_mask(self) -> None:
        self.phase = "unmask"

    def unmask_request(self, client_id: int) -> tuple[list[int], list[int]]:
        self.expect("unmask", client_id)
        assert self.server is not None
        if client_id not in self.server.masked:
            raise PermissionError(f"client {client_id}'s masked input did not arrive in time")
        return self.server.unmask_request()

    def unmask(self, client_id: int, answer: dict[int, tuple[str, bytes]]) -> None:
        self.expect("unmask", client_id)
        if client_id in self.responses:
            raise FileExistsError(f"client {client_id} already answered")
        self.responses[client_id] = answer
        self.count(client_id, sent=sum(len(s) + 1 for _, s in answer.values()))

    def close_unmask(self) -> None:
        """Remove the masks: the sum of the survivors' inputs, or the reason it failed."""
        self.phase = "done"
        try:
            if self.server is None or not self.server.masked:
                raise SecAggAbort("no masked input arrived")
            self.total = self.server.aggregate(self.responses, self.length)
        except SecAggAbort as exc:
            self.failure = str(exc)

    # ------------------------------------------------------------------ progress

    def waiting_for(self) -> set[int]:
        """Clients the current step still waits for."""
        if self.phase == "advertise":
            return set(self.participants) - set(self.keys)
        if self.phase == "share":
            return set(self.keys) - set(self.outgoing)
        if self.phase == "mask":
            masked = set(self.server.masked) if self.server else set()
            return set(self.outgoing) - masked
        if self.phase == "unmask":
            masked = set(self.server.masked) if self.server else set()
            return masked - set(self.responses)
        return set()

    def survivors(self) -> list[int]:
        return sorted(self.server.masked) if self.server is not None else []


class NetworkSecureSum(SecureSum):
    """``SecureSum`` whose sums come from the protocol the coordinator ran with the clients
    this round (the States handed to ``sum`` are placeholders: the server never had them)."""

    def __init__(self, inner: SecureSum) -> None:
        super().__init__(inner.cfg, inner.seed)
        self.results: dict[int, SecureRound] = {}

    def sum(self, states: dict[int, State], extras: dict[int, list[float]], like: State,
            round_index: int) -> tuple[State, np.ndarray, list[int]]:
        found = self.results.pop(round_index, None)
        if found is None:
            raise SecAggAbort(f"round {round_index}: the secure aggregation protocol did not "
                              f"run (the coordinator restarted during it)")
        if found.failure is not None or found.total is None:
            raise SecAggAbort(found.failure or "secure aggregation failed")
        keys = sorted(like)
        decoded = self.encoding.decode(found.total)
        width = found.length - sum(like[k].numel() for k in keys)
        survived = found.survivors()
        self.wire = {u: (found.up.get(u, 0), found.down.get(u, 0)) for u in found.participants}
        self.last = {"clients": float(len(found.keys)), "survived": float(len(survived)),
                     "dropped_in_protocol": float(len(found.outgoing) - len(survived)),
                     "threshold": float(found.threshold), "transport": 1.0,
                     "seconds": time.perf_counter() - found.started}
        size = decoded.size - width
        return _unflatten(decoded[:size], like, keys), decoded[size:], survived


# --------------------------------------------------------------------------- client side


def client_secure_steps(agent: Any, task: dict[str, Any], update: Any) -> bool:
    """Run the four steps for ``update`` as ``agent``; True if our masked input was used."""
    from fedfm.trust.secagg.aggregation import SecureMean

    config = agent.run_config
    cfg = config.privacy.secure_aggregation
    summer = SecureSum(cfg, config.seed)
    state, extras = SecureMean(summer, config.algorithm.weighting).contribution(update)
    encoded, _ = summer.encode(state, extras)
    client = SecAggClient(int(task["client_id"]), threshold=1)
    base = f"/secagg/{task['round']}"
    keys = client.advertise_keys()
    facts = {"num_examples": update.num_examples, "metrics": update.metrics,
             "metadata": update.metadata}
    if not agent.secure_call("POST", f"{base}/advertise", json={
            "c_pk": b64(keys["c_pk"]), "s_pk": b64(keys["s_pk"]), "facts": facts}):
        return False
    found = agent.secure_wait(f"{base}/neighbours")
    if found is None:
        return False
    client.threshold = int(found["threshold"])
    neighbour_keys = {int(v): {"c_pk": unb64(k["c_pk"], "c_pk"), "s_pk": unb64(k["s_pk"], "s_pk")}
                      for v, k in found["keys"].items()}
    ciphertexts = client.share_keys(neighbour_keys)
    if not agent.secure_call("POST", f"{base}/shares", json={
            "shares": {str(v): b64(ct) for v, ct in ciphertexts.items()}}):
        return False
    crash_point("secagg_shared", int(task["round"]))
    found = agent.secure_wait(f"{base}/inbox")
    if found is None:
        return False
    client.receive_shares({int(u): unb64(ct, "share") for u, ct in found["shares"].items()})
    masked = client.masked_input(encoded).astype("<u8").tobytes()
    if not agent.secure_call("PUT", f"{base}/masked", content=masked, binary=True):
        return False
    found = agent.secure_wait(f"{base}/unmask")
    if found is None:
        return True
    answer = client.unmask([int(u) for u in found["survived"]],
                           [int(u) for u in found["dropped"]])
    agent.secure_call("POST", f"{base}/unmask", json={
        "shares": {str(u): [label, b64(share)] for u, (label, share) in answer.items()}})
    return True
