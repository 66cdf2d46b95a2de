"""Secure aggregation with dropouts: SecAgg+ (Bell, Bonawitz, Gascón, Lepoint & Raykova, "Secure
Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020), itself built on SecAgg
(Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017).

The server learns the sum of the surviving clients' vectors and nothing else about any one of them.
Each client ``u`` is connected to ``k`` neighbours (a random k-regular graph, SecAgg+'s change that
makes the cost logarithmic in the number of clients rather than linear):

1. **Advertise keys.** ``u`` makes two X25519 key pairs, ``c`` (to encrypt shares for its
   neighbours) and ``s`` (to agree pairwise masks), and sends both public keys.
2. **Share keys.** ``u`` draws a self-mask seed ``b_u``, splits ``b_u`` and its mask secret key
   ``s_sk_u`` into Shamir shares with threshold ``t`` over its neighbours, and sends each neighbour
   its shares encrypted with ChaCha20-Poly1305 under a key derived (HKDF-SHA256) from the X25519
   agreement of ``c`` keys; the server only routes ciphertexts.
3. **Masked input.** ``u`` sends ``y_u = x_u + PRG(b_u) + sum_v ±PRG(s_uv) mod 2^64`` over its
   neighbours ``v`` that reached step 2 (``+`` if ``u < v``), with ``s_uv`` the X25519 agreement
   of ``s`` keys and the PRG a ChaCha20 keystream.
4. **Unmask.** The server names the clients whose masked input arrived. Each surviving client
   returns, for every neighbour, the share of ``b`` (neighbour survived) or of ``s_sk`` (neighbour
   dropped), never both. With ``t`` shares per client the server removes the self masks of the
   survivors and the dropped clients' pairwise masks; with fewer it aborts, naming who lacks
   shares, instead of returning a wrong sum.

Vectors are fixed-point encoded in the ring of integers mod 2^64 (``FixedPoint``): the caller
checks that ``n`` clients' values cannot overflow it. Messages are plain dicts of bytes and
arrays, so the local runtime drives the same objects in one process that a deployment runs over
the network. Written here rather than taken from a library because no maintained Python package
implements SecAgg+; every primitive (X25519, HKDF, ChaCha20-Poly1305, ChaCha20, Shamir) comes
from ``cryptography`` or ``pycryptodome``.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass, field

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedfm.core.loop import RoundAborted

RING_BITS = 64
SEED_BYTES = 32


class SecAggAbort(RoundAborted):
    """The round cannot be unmasked correctly; the message says why."""


# --------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class FixedPoint:
    """Reals in ``[-bound, bound]`` as integers mod 2^64 with ``frac_bits`` fractional bits."""

    bound: float
    frac_bits: int = 24

    def capacity_ok(self, num_clients: int) -> bool:
        """Whether the sum of ``num_clients`` values in range stays inside the signed ring."""
        return num_clients * self.bound * 2 ** self.frac_bits < 2 ** (RING_BITS - 1)

    def encode(self, values: np.ndarray) -> tuple[np.ndarray, int]:
        """Encoded vector and how many entries had to be clipped into ``[-bound, bound]``."""
        clipped = int(np.count_nonzero(np.abs(values) > self.bound))
        scaled = np.rint(np.clip(values, -self.bound, self.bound) * 2.0 ** self.frac_bits)
        return scaled.astype(np.int64).view(np.uint64), clipped

    def decode(self, ring: np.ndarray) -> np.ndarray:
        return ring.view(np.int64).astype(np.float64) / 2.0 ** self.frac_bits


# --------------------------------------------------------------------------- primitives


def prg(seed: bytes, length: int) -> np.ndarray:
    """``length`` uniform 64-bit words from a ChaCha20 keystream keyed by ``seed``."""
    key = hashlib.sha256(b"fedfm-secagg-prg" + seed).digest()
    encryptor = Cipher(algorithms.ChaCha20(key, b"\x00" * 16), mode=None).encryptor()
    return np.frombuffer(encryptor.update(b"\x00" * (8 * length)), dtype=np.uint64).copy()


def _raw(public: X25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _derive(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def _split(secret: bytes, threshold: int, holders: list[int]) -> dict[int, bytes]:
    """Shamir shares of a 32-byte secret (two 16-byte halves) for each holder id."""
    halves = [Shamir.split(threshold, len(holders), secret[i:i + 16]) for i in (0, 16)]
    return {holder: halves[0][i][1] + halves[1][i][1] for i, holder in enumerate(holders)}


def _combine(shares: dict[int, bytes], holders: list[int]) -> bytes:
    """Rebuild a secret from ``{holder: share}``; ``holders`` fixes each holder's index."""
    index = {holder: i + 1 for i, holder in enumerate(holders)}
    parts = [Shamir.combine([(index[h], s[i:i + 16]) for h, s in shares.items()])
             for i in (0, 16)]
    return parts[0] + parts[1]


def neighbourhood_graph(client_ids: list[int], degree: int, seed: int) -> dict[int, list[int]]:
    """A random ``degree``-regular graph (a circulant graph on a seeded permutation; the complete
    graph when ``degree >= n - 1``). Each client is its own neighbour too, as in SecAgg+,
    so it holds a share of its own secrets."""
    ids = sorted(client_ids)
    n = len(ids)
    if degree >= n - 1:
        return {u: list(ids) for u in ids}
    order = ids[:]
    random.Random(seed).shuffle(order)
    position = {u: i for i, u in enumerate(order)}
    half = degree // 2
    graph: dict[int, list[int]] = {}
    for u in ids:
        i = position[u]
        near = {order[(i + j) % n] for j in range(-half, half + 1)}
        if degree % 2:  # odd degree (even n): also the opposite node
            near.add(order[(i + n // 2) % n])
        graph[u] = sorted(near)
    return graph


# --------------------------------------------------------------------------- client


@dataclass
class SecAggClient:
    """One client's side of the protocol (its secrets never leave except as shares)."""

    client_id: int
    threshold: int
    _c: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    _s: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    _b: bytes = field(default_factory=lambda: os.urandom(SEED_BYTES))
    _neighbours: list[int] = field(default_factory=list)
    _keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    _received: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    _answered: bool = False

    def advertise_keys(self) -> dict[str, bytes]:
        return {"c_pk": _raw(self._c.public_key()), "s_pk": _raw(self._s.public_key())}

    def share_keys(self, neighbour_keys: dict[int, dict[str, bytes]]) -> dict[int, bytes]:
        """Encrypted ``(s_sk share, b share)`` for each neighbour that advertised keys."""
        self._neighbours = sorted(neighbour_keys)
        if len(self._neighbours) < self.threshold:
            raise SecAggAbort(f"client {self.client_id}: only {len(self._neighbours)} "
                              f"neighbours advertised keys, below the threshold {self.threshold}")
        self._keys = {v: (k["c_pk"], k["s_pk"]) for v, k in neighbour_keys.items()}
        s_raw = self._s.private_bytes(serialization.Encoding.Raw,
                                      serialization.PrivateFormat.Raw,
                                      serialization.NoEncryption())
        s_shares = _split(s_raw, self.threshold, self._neighbours)
        b_shares = _split(self._b, self.threshold, self._neighbours)
        return {v: self._encrypt(v, s_shares[v] + b_shares[v]) for v in self._neighbours}

    def _channel(self, other: int) -> ChaCha20Poly1305:
        secret = self._c.exchange(X25519PublicKey.from_public_bytes(self._keys[other][0]))
        return ChaCha20Poly1305(_derive(secret, b"fedfm-secagg-channel"))

    def _encrypt(self, to: int, plaintext: bytes) -> bytes:
        nonce = os.urandom(12)
        header = f"{self.client_id}->{to}".encode()
        return nonce + self._channel(to).encrypt(nonce, plaintext, header)

    def receive_shares(self, ciphertexts: dict[int, bytes]) -> None:
        """Decrypt and keep the shares neighbours sent (the header binds sender and receiver)."""
        for sender, blob in ciphertexts.items():
            header = f"{sender}->{self.client_id}".encode()
            plain = self._channel(sender).decrypt(blob[:12], blob[12:], header)
            self._received[sender] = (plain[:32], plain[32:])

    def masked_input(self, encoded: np.ndarray) -> np.ndarray:
        """``x + PRG(b) + sum ±PRG(s_uv)`` over the neighbours whose shares arrived (they
        completed key sharing, so the server can remove their masks if they drop later)."""
        masked = encoded + prg(self._b, encoded.size)
        for v in sorted(self._received):
            if v == self.client_id:
                continue
            secret = self._s.exchange(X25519PublicKey.from_public_bytes(self._keys[v][1]))
            mask = prg(_derive(secret, b"fedfm-secagg-mask"), encoded.size)
            masked = masked + mask if self.client_id < v else masked - mask
        return masked

    def unmask(self, survived: list[int], dropped: list[int]) -> dict[int, tuple[str, bytes]]:
        """Per neighbour: the share of ``b`` (survived) or of ``s_sk`` (dropped). Asked twice,
        or asked to reveal both for one client, an honest client refuses."""
        if self._answered:
            raise SecAggAbort(f"client {self.client_id}: unmasking was already answered")
        overlap = set(survived) & set(dropped)
        if overlap:
            raise SecAggAbort(f"client {self.client_id}: clients {sorted(overlap)} are listed as "
                              f"both survived and dropped; refusing to reveal both secrets")
        self._answered = True
        found: dict[int, tuple[str, bytes]] = {}
        for u, (s_share, b_share) in self._received.items():
            if u in survived:
                found[u] = ("b", b_share)
            elif u in dropped:
                found[u] = ("s", s_share)
        return found


# --------------------------------------------------------------------------- server


@dataclass
class SecAggServer:
    """The server's side: routes messages, then removes the masks from the sum."""

    threshold: int
    graph: dict[int, list[int]]
    public_keys: dict[int, dict[str, bytes]] = field(default_factory=dict)
    shared: set[int] = field(default_factory=set)  # clients whose shares were routed
    masked: dict[int, np.ndarray] = field(default_factory=dict)

    def keys_for(self, client_id: int) -> dict[int, dict[str, bytes]]:
        return {v: self.public_keys[v] for v in self.graph[client_id] if v in self.public_keys}

    def route_shares(self, outgoing: dict[int, dict[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """``{sender: {receiver: ct}}`` -> ``{receiver: {sender: ct}}``."""
        self.shared = set(outgoing)
        inbox: dict[int, dict[int, bytes]] = {}
        for sender, blobs in outgoing.items():
            for receiver, blob in blobs.items():
                inbox.setdefault(receiver, {})[sender] = blob
        return inbox

    def unmask_request(self) -> tuple[list[int], list[int]]:
        survived = sorted(self.masked)
        dropped = sorted(self.shared - set(self.masked))
        return survived, dropped

    def aggregate(self, responses: dict[int, dict[int, tuple[str, bytes]]],
                  length: int) -> np.ndarray:
        """The sum of the survivors' encoded inputs, or ``SecAggAbort``."""
        survived, dropped = self.unmask_request()
        if len(survived) < self.threshold:
            raise SecAggAbort(f"only {len(survived)} masked inputs arrived, below the "
                              f"threshold {self.threshold}")
        total = np.zeros(length, dtype=np.uint64)
        for y in self.masked.values():
            total = total + y
        for u in survived:
            total = total - prg(self._reconstruct(u, "b", responses), length)
        for u in dropped:
            s_sk = X25519PrivateKey.from_private_bytes(self._reconstruct(u, "s", responses))
            for v in self.graph[u]:
                if v == u or v not in self.masked:
                    continue
                pk = X25519PublicKey.from_public_bytes(self.public_keys[v]["s_pk"])
                mask = prg(_derive(s_sk.exchange(pk), b"fedfm-secagg-mask"), length)
                # v added +mask if v < u, else subtracted it
                total = total - mask if v < u else total + mask
        return total

    def _reconstruct(self, u: int, kind: str, responses: dict[int, dict[int, tuple[str, bytes]]]
                     ) -> bytes:
        holders = sorted(v for v in self.graph[u] if v in self.public_keys)
        shares = {v: share for v, answer in responses.items() if u in answer
                  for label, share in [answer[u]] if label == kind and v in holders}
        if len(shares) < self.threshold:
            what = "self-mask seed" if kind == "b" else "mask key"
            raise SecAggAbort(f"cannot recover client {u}'s {what}: {len(shares)} of its "
                              f"neighbours answered, the threshold is {self.threshold} (too "
                              f"many dropouts); aborting rather than returning a wrong sum")
        chosen = dict(sorted(shares.items())[: self.threshold])
        return _combine(chosen, holders)
