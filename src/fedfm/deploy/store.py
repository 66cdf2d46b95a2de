"""The coordinator's durable state: one SQLite database in WAL mode, plus payload files.

The database holds the run (its config), the client registry (token hashes, roles, last seen),
rounds (selection, target, deadline, state), tasks (one per selected client and round) and the
metadata of every accepted update; the update payloads themselves are safetensors files written
atomically (temp file, fsync, rename, fsync of the directory) *before* the row that accepts them
is committed. An update whose row is committed is therefore on disk, and a ``kill -9`` at any
moment leaves either no trace of an upload or a complete one.

Tokens are 256-bit random strings; only their SHA-256 is stored (a fast hash is enough for
high-entropy secrets: there is nothing to brute-force), and lookups compare hashes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
OPEN, ACCEPTED, REJECTED, EXPIRED, CANCELLED = "assigned", "accepted", "rejected", "expired", \
    "cancelled"
FINAL_STATUSES = (ACCEPTED, REJECTED, EXPIRED, CANCELLED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS clients (
    name TEXT PRIMARY KEY,
    client_id INTEGER UNIQUE,
    role TEXT NOT NULL,
    token_hash TEXT UNIQUE NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    last_seen REAL,
    info TEXT
);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    state TEXT NOT NULL,
    selected TEXT NOT NULL,
    target INTEGER NOT NULL,
    deadline REAL,
    opened_at REAL NOT NULL,
    closed_at REAL
);
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY,
    round INTEGER NOT NULL,
    client_id INTEGER NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    error TEXT,
    UNIQUE (round, client_id, kind)
);
CREATE TABLE IF NOT EXISTS updates (
    task_id TEXT PRIMARY KEY REFERENCES tasks(task_id),
    round INTEGER NOT NULL,
    client_id INTEGER NOT NULL,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    num_bytes INTEGER NOT NULL,
    received_at REAL NOT NULL,
    wall_time REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS client_metrics (
    client_id INTEGER NOT NULL,
    round INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    PRIMARY KEY (client_id, round)
);
"""


class StoreError(ValueError):
    """A registry operation the user asked for cannot be done (the message says why)."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class ClientRecord:
    name: str
    client_id: int | None  # None for viewers (they read status, never train)
    role: str  # client | viewer
    revoked: bool
    created_at: float
    last_seen: float | None


@dataclass(frozen=True)
class RoundRecord:
    round: int
    state: str
    selected: list[int]
    target: int
    deadline: float | None
    opened_at: float


@dataclass(frozen=True)
class TaskRecord:
    task_id: str
    round: int
    client_id: int
    kind: str
    status: str
    created_at: float
    error: str | None


@dataclass(frozen=True)
class UpdateRecord:
    task_id: str
    round: int
    client_id: int
    path: str
    sha256: str
    num_bytes: int
    wall_time: float


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write, fsync, rename into place, fsync the directory: all of it or nothing survives."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class StateStore:
    """Thread-safe access to the coordinator database (one connection, one lock; every write
    is an IMMEDIATE transaction, so other processes such as ``fedfm server add-client`` can
    write to the same file concurrently)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                   timeout=30.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                self._db.execute(statement)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._db.execute(sql, params))

    # ------------------------------------------------------------------ run metadata

    def get_meta(self, key: str) -> str | None:
        rows = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0]["value"] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        with self._write() as db:
            db.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE "
                       "SET value = excluded.value", (key, value))

    # ------------------------------------------------------------------ registry

    def add_client(self, name: str, *, role: str = "client", client_id: int | None = None
                   ) -> tuple[ClientRecord, str]:
        """Register ``name``; returns the record and its token (shown once, stored hashed)."""
        if not NAME_PATTERN.match(name):
            raise StoreError(f"client name {name!r}: use 1-64 letters, digits, '_', '.' or '-'")
        if role not in ("client", "viewer"):
            raise StoreError(f"role {role!r}: expected 'client' or 'viewer'")
        if client_id is not None and (role != "client" or client_id < 0):
            raise StoreError("--id: a non-negative integer, for clients only")
        token = secrets.token_urlsafe(32)
        now = time.time()
        with self._write() as db:
            if db.execute("SELECT 1 FROM clients WHERE name = ?", (name,)).fetchone():
                raise StoreError(f"client {name!r} already exists (revoke-client it first, or "
                                 f"pick another name)")
            if role == "client":
                if client_id is None:
                    row = db.execute("SELECT MAX(client_id) AS top FROM clients").fetchone()
                    client_id = 0 if row["top"] is None else int(row["top"]) + 1
                elif db.execute("SELECT 1 FROM clients WHERE client_id = ?",
                                (client_id,)).fetchone():
                    raise StoreError(f"client id {client_id} is already taken")
            db.execute("INSERT INTO clients(name, client_id, role, token_hash, created_at) "
                       "VALUES(?, ?, ?, ?, ?)", (name, client_id, role, hash_token(token), now))
        return ClientRecord(name, client_id, role, False, now, None), token

    def revoke_client(self, name: str) -> ClientRecord:
        with self._write() as db:
            done = db.execute("UPDATE clients SET revoked = 1 WHERE name = ?", (name,))
            if done.rowcount == 0:
                raise StoreError(f"no client named {name!r}")
        record = self.client_by_name(name)
        assert record is not None
        return record

    def authenticate(self, token: str) -> ClientRecord | None:
        """The non-revoked registration holding ``token``, or None."""
        rows = self._read("SELECT * FROM clients WHERE token_hash = ? AND revoked = 0",
                          (hash_token(token),))
        return _client(rows[0]) if rows else None

    def touch(self, name: str, info: dict[str, Any] | None = None) -> None:
        with self._write() as db:
            if info is None:
                db.execute("UPDATE clients SET last_seen = ? WHERE name = ?", (time.time(), name))
            else:
                db.execute("UPDATE clients SET last_seen = ?, info = ? WHERE name = ?",
                           (time.time(), json.dumps(info), name))

    def client_by_name(self, name: str) -> ClientRecord | None:
        rows = self._read("SELECT * FROM clients WHERE name = ?", (name,))
        return _client(rows[0]) if rows else None

    def clients(self) -> list[ClientRecord]:
        return [_client(r) for r in self._read("SELECT * FROM clients ORDER BY client_id, name")]

    def training_clients(self, online_within: float | None = None) -> list[int]:
        """Ids of non-revoked clients, optionally only those seen in the last seconds."""
        rows = self._read("SELECT client_id, last_seen FROM clients WHERE role = 'client' AND "
                          "revoked = 0 ORDER BY client_id")
        now = time.time()
        return [int(r["client_id"]) for r in rows if online_within is None or (
            r["last_seen"] is not None and now - r["last_seen"] <= online_within)]

    # ------------------------------------------------------------------ rounds and tasks

    def open_round(self, round_index: int, selected: list[int], target: int,
                   deadline: float | None) -> RoundRecord:
        """Create the round and one training task per selected client; if the round exists
        (a restart), keep its selection and tasks and only move the deadline."""
        now = time.time()
        with self._write() as db:
            row = db.execute("SELECT * FROM rounds WHERE round = ?", (round_index,)).fetchone()
            if row is None:
                db.execute("INSERT INTO rounds(round, state, selected, target, deadline, "
                           "opened_at) VALUES(?, 'training', ?, ?, ?, ?)",
                           (round_index, json.dumps(selected), target, deadline, now))
                for client_id in selected:
                    db.execute("INSERT INTO tasks(task_id, round, client_id, kind, status, "
                               "created_at, updated_at) VALUES(?, ?, ?, 'train', ?, ?, ?)",
                               (f"r{round_index}-c{client_id}-{secrets.token_hex(6)}",
                                round_index, client_id, OPEN, now, now))
            else:
                db.execute("UPDATE rounds SET deadline = ?, state = 'training' WHERE round = ?",
                           (deadline, round_index))
        found = self.get_round(round_index)
        assert found is not None
        return found

    def get_round(self, round_index: int) -> RoundRecord | None:
        rows = self._read("SELECT * FROM rounds WHERE round = ?", (round_index,))
        return _round(rows[0]) if rows else None

    def latest_round(self) -> RoundRecord | None:
        rows = self._read("SELECT * FROM rounds ORDER BY round DESC LIMIT 1")
        return _round(rows[0]) if rows else None

    def set_round_state(self, round_index: int, state: str) -> None:
        with self._write() as db:
            closed = time.time() if state == "done" else None
            db.execute("UPDATE rounds SET state = ?, closed_at = COALESCE(?, closed_at) "
                       "WHERE round = ?", (state, closed, round_index))

    def round_tasks(self, round_index: int) -> list[TaskRecord]:
        return [_task(r) for r in self._read(
            "SELECT * FROM tasks WHERE round = ? ORDER BY client_id", (round_index,))]

    def get_task(self, task_id: str) -> TaskRecord | None:
        rows = self._read("SELECT * FROM tasks WHERE task_id = ?", (task_id,))
        return _task(rows[0]) if rows else None

    def open_task_for(self, client_id: int) -> TaskRecord | None:
        rows = self._read("SELECT * FROM tasks WHERE client_id = ? AND status = ? ORDER BY "
                          "round DESC LIMIT 1", (client_id, OPEN))
        return _task(rows[0]) if rows else None

    def accept_update(self, task_id: str, path: Path, sha256: str, num_bytes: int,
                      wall_time: float, metrics: dict[str, Any]) -> bool:
        """Record an update whose file is already on disk; False if the task was no longer
        open (a concurrent duplicate, or the round closed meanwhile)."""
        now = time.time()
        with self._write() as db:
            task = db.execute("SELECT * FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
            if task is None or task["status"] != OPEN:
                return False
            db.execute("UPDATE tasks SET status = ?, updated_at = ? WHERE task_id = ?",
                       (ACCEPTED, now, task_id))
            db.execute("INSERT INTO updates(task_id, round, client_id, path, sha256, num_bytes, "
                       "received_at, wall_time) VALUES(?, ?, ?, ?, ?, ?, ?, ?)",
                       (task_id, task["round"], task["client_id"], str(path), sha256, num_bytes,
                        now, wall_time))
            db.execute("INSERT OR REPLACE INTO client_metrics(client_id, round, metrics) "
                       "VALUES(?, ?, ?)", (task["client_id"], task["round"], json.dumps(metrics)))
        return True

    def close_task(self, task_id: str, status: str, error: str) -> bool:
        with self._write() as db:
            done = db.execute("UPDATE tasks SET status = ?, error = ?, updated_at = ? "
                              "WHERE task_id = ? AND status = ?",
                              (status, error, time.time(), task_id, OPEN))
            return done.rowcount == 1

    def update_for(self, task_id: str) -> UpdateRecord | None:
        rows = self._read("SELECT * FROM updates WHERE task_id = ?", (task_id,))
        if not rows:
            return None
        r = rows[0]
        return UpdateRecord(r["task_id"], r["round"], r["client_id"], r["path"], r["sha256"],
                            r["num_bytes"], r["wall_time"])

    def latest_client_metrics(self) -> dict[int, tuple[int, dict[str, Any]]]:
        """client id -> (round, metrics) of its latest accepted update."""
        rows = self._read("SELECT client_id, round, metrics FROM client_metrics AS m WHERE "
                          "round = (SELECT MAX(round) FROM client_metrics WHERE client_id = "
                          "m.client_id)")
        return {int(r["client_id"]): (int(r["round"]), json.loads(r["metrics"])) for r in rows}

    def rounds_completed(self) -> dict[int, int]:
        rows = self._read("SELECT client_id, COUNT(*) AS n FROM tasks WHERE status = ? "
                          "GROUP BY client_id", (ACCEPTED,))
        return {int(r["client_id"]): int(r["n"]) for r in rows}


def _client(row: sqlite3.Row) -> ClientRecord:
    client_id = row["client_id"]
    return ClientRecord(row["name"], None if client_id is None else int(client_id), row["role"],
                        bool(row["revoked"]), float(row["created_at"]),
                        None if row["last_seen"] is None else float(row["last_seen"]))


def _round(row: sqlite3.Row) -> RoundRecord:
    return RoundRecord(int(row["round"]), row["state"], [int(c) for c in json.loads(
        row["selected"])], int(row["target"]), row["deadline"], float(row["opened_at"]))


def _task(row: sqlite3.Row) -> TaskRecord:
    return TaskRecord(row["task_id"], int(row["round"]), int(row["client_id"]), row["kind"],
                      row["status"], float(row["created_at"]), row["error"])
