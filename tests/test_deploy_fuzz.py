"""Fuzzing the coordinator's HTTP API and its upload parser.

* schemathesis generates requests for every operation of the real OpenAPI spec of an in-process
  coordinator -- schema-valid and schema-violating parameters and bodies, random task ids and
  long-poll ``wait``/``since`` values -- without a token, with a client token, and against a
  real open task with a matching checksum; no response is a 5xx, every refusal is JSON with a
  ``detail``, and the coordinator serves on afterwards.
* Garbage uploaded to real open tasks (random bytes, truncated or inconsistent safetensors,
  wrong shapes or dtypes, NaN, lying header lengths, a list as header, a huge declared shape,
  foreign tensors, bad facts) gets a 4xx whose ``detail`` names the problem, and the round goes
  on with the one valid update.
* Byte-level mutations of a valid update fail only with the validation errors the coordinator
  turns into a 422.

"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as safetensors_save

from fedfm.core import state as state_ops
from fedfm.core.update import validate_update
from fedfm.deploy import wire
from fedfm.deploy.store import StateStore
from tests.deploy_util import bearer, coordinator_app, fake_update_bytes, poll_task, upload

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402

API = "/api/v1"
UPDATE_PATH = f"{API}/tasks/{{task_id}}/update"
_QUIET = [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large]
FUZZ = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                phases=[Phase.explicit, Phase.generate], suppress_health_check=_QUIET)
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)


# --------------------------------------------------------------------------- schemathesis


def fuzz_operations(app: Any, headers: dict[str, str], seen: dict[str, set[int]], *,
                    only: str | None = None, task_id: str | None = None) -> None:
    """Every operation of the app's spec (or the one at path ``only``), both generation modes:
    no 5xx, JSON refusals; ``task_id`` pins the ``{task_id}`` path parameter."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {f"{API}/tasks/next", UPDATE_PATH, f"{API}/status",
                                              f"{API}/tasks/{{task_id}}/state", f"{API}/metrics"}
    for operation in operations:
        if only is not None and operation.path != only:
            continue
        negatable = len(operation.body) > 0 or any(
            parameter.name != "Authorization" for parameter in operation.iter_parameters())
        for mode in MODES if negatable else MODES[:1]:
            fuzz_operation(operation, mode, headers, seen, task_id)


def fuzz_operation(operation: Any, mode: GenerationMode, headers: dict[str, str],
                   seen: dict[str, set[int]], task_id: str | None) -> None:
    label = f"{operation.method.upper()} {operation.path}"
    pinned = {"task_id": task_id} if task_id and "{task_id}" in operation.path else None

    @FUZZ
    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=pinned))
    def check(case: Any) -> None:
        sent = dict(headers)
        body = getattr(case.body, "data", case.body)  # schemathesis wraps binary bodies
        if operation.path == UPDATE_PATH and task_id and isinstance(body, bytes):
            # a matching checksum, so the body reaches the validator
            sent["X-Content-SHA256"] = hashlib.sha256(body).hexdigest()
        started = time.monotonic()
        response = case.call(headers=sent)
        seen.setdefault(label, set()).add(response.status_code)
        assert response.status_code < 500, (
            f"{case.method} {case.formatted_path} -> {response.status_code}: "
            f"{response.text[:500]}")
        assert time.monotonic() - started < 10, f"{label} hung"
        if response.status_code >= 400:
            assert response.json()["detail"], response.text[:500]  # JSON with a detail

    check()


def test_fuzzed_requests_never_cause_a_server_error(tmp_path: Path) -> None:
    deploy = {"long_poll_s": 0.2, "round_timeout_s": 600}  # round 1 stays open throughout
    with coordinator_app(tmp_path, clients=2, deploy=deploy) as (coordinator, http, tokens):
        try:
            fuzz_the_api(coordinator, http, tokens)
        finally:  # schemathesis keeps an app's lifespan (and so the coordinator) until exit
            asgi = sys.modules.get("schemathesis.python.asgi")
            if asgi is not None:
                asgi.shutdown_lifespans()


def fuzz_the_api(coordinator: Any, http: Any, tokens: list[str]) -> None:
    app = http.app
    anonymous: dict[str, set[int]] = {}
    fuzz_operations(app, {}, anonymous)
    assert anonymous.pop(f"GET {API}/health") == {200}
    for label, codes in anonymous.items():  # a body is parsed before the token is checked
        assert 401 in codes and codes <= {400, 401, 422}, (label, codes)

    authed: dict[str, set[int]] = {}
    fuzz_operations(app, bearer(tokens[0]), authed)
    assert 200 in authed[f"GET {API}/tasks/next"], authed  # the long poll was reached
    assert 404 in authed[f"GET {API}/tasks/{{task_id}}/state"], authed
    assert 404 in authed[f"PUT {UPDATE_PATH}"], authed
    assert 200 in authed[f"GET {API}/metrics"] and 200 in authed[f"GET {API}/status"]

    task = poll_task(http, tokens[1])  # client 1's real open task, random bodies for it
    pinned: dict[str, set[int]] = {}
    fuzz_operations(app, bearer(tokens[1]), pinned, only=UPDATE_PATH,
                    task_id=task["task_id"])
    fuzz_operations(app, bearer(tokens[1]), pinned, only=f"{API}/tasks/{{task_id}}/state",
                    task_id=task["task_id"])
    assert {409, 422} <= pinned[f"PUT {UPDATE_PATH}"], pinned  # rejected, then closed
    assert 200 in pinned[f"GET {API}/tasks/{{task_id}}/state"], pinned
    assert_still_serving(coordinator, http, tokens)


def assert_still_serving(coordinator: Any, http: Any, tokens: list[str]) -> None:
    assert coordinator.run_state == "running", coordinator.error
    store = StateStore(coordinator.store.path)
    try:
        _, viewer = store.add_client("fuzz-viewer", role="viewer")
    finally:
        store.close()
    for token in (viewer, tokens[0]):
        response = http.get(f"{API}/status", headers=bearer(token))
        assert response.status_code == 200, response.text
        assert response.json()["run"]["state"] == "running"


# --------------------------------------------------------------------------- garbage bodies

Facts = dict[str, Any]
Reference = dict[str, torch.Tensor]


def good_facts(task: dict[str, Any], **changes: Any) -> Facts:
    return {"client_id": task["client_id"], "round": task["round"], "task_id": task["task_id"],
            "num_examples": 10, "metrics": {"train_loss": 1.0}, "metadata": {}, **changes}


def update_body(reference: Reference, facts: Facts, *, metadata: dict[str, str] | None = None,
                tensors: dict[str, torch.Tensor] | None = None, drop: str | None = None) -> bytes:
    """A safetensors update: the payload filled with 0.01 unless ``tensors`` replace entries
    (file keys), ``drop`` removes one; ``metadata`` adds to or overrides the file's metadata."""
    entries = {f"payload{wire.SEP}{k}": torch.full_like(v, 0.01) for k, v in reference.items()}
    entries.update(tensors or {})
    entries.pop(drop or "", None)
    meta = {wire.UPDATE_META: json.dumps(facts), "fedfm.key_order": json.dumps(list(entries)),
            **(metadata or {})}
    return safetensors_save({k: v.contiguous() for k, v in entries.items()}, metadata=meta)


def rewrite_header(body: bytes, change: Callable[[dict[str, Any]], Any]) -> bytes:
    """``body`` with its JSON header replaced by ``change(header)`` (the data kept)."""
    length = struct.unpack("<Q", body[:8])[0]
    header = change(json.loads(body[8:8 + length]))
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + body[8 + length:]


def first_key(reference: Reference) -> str:
    return f"payload{wire.SEP}{next(iter(reference))}"


def _reshape_first(header: dict[str, Any], shape: list[int]) -> dict[str, Any]:
    key = next(k for k in header if k.startswith(f"payload{wire.SEP}"))
    header[key]["shape"] = shape
    return header


def _add_aux(header: dict[str, Any]) -> dict[str, Any]:
    header[f"aux{wire.SEP}state{wire.SEP}w"] = {"dtype": "F32", "shape": [2**40, 2**40],
                                                "data_offsets": [0, 4]}
    return header


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


Garbage = Callable[[Reference, Facts], bytes]
# name -> (body from (reference State, good facts), words the refusal must contain)
GARBAGE: dict[str, tuple[Garbage, str]] = {
    "random_bytes": (lambda r, f: random.Random(0).randbytes(4096), "safetensors"),
    "shorter_than_8_bytes": (lambda r, f: b"\x01\x02\x03", "shorter than 8 bytes"),
    "truncated": (lambda r, f: update_body(r, f)[:-64], "outside the file"),
    "header_longer_than_file": (lambda r, f: struct.pack("<Q", 10**6) + b"{}",
                                "larger than the file"),
    "header_not_json": (lambda r, f: struct.pack("<Q", 9) + b"{not json", "not JSON"),
    "header_is_a_list": (lambda r, f: struct.pack("<Q", 9) + b"[1, 2, 3]",
                         "not a JSON object"),
    "wrong_shape": (lambda r, f: update_body(r, f, tensors={
        first_key(r): torch.zeros(3, 3)}), "has shape (3, 3)"),
    "wrong_dtype": (lambda r, f: update_body(r, f, tensors={
        first_key(r): torch.zeros_like(next(iter(r.values())), dtype=torch.float64)}),
        "has dtype F64"),
    "nan_values": (lambda r, f: update_body(r, f, tensors={
        first_key(r): torch.full_like(next(iter(r.values())), float("nan"))}), "non-finite"),
    "huge_declared_shape": (lambda r, f: rewrite_header(
        update_body(r, f), lambda h: _reshape_first(h, [2**40, 2**40])),
        "has shape (1099511627776, 1099511627776)"),
    "huge_declared_aux_shape": (lambda r, f: rewrite_header(update_body(r, f), _add_aux),
                                "could not be read"),
    "negative_dimension": (lambda r, f: rewrite_header(
        update_body(r, f), lambda h: _reshape_first(h, [-1, 4])), "malformed shape"),
    "missing_tensor": (lambda r, f: update_body(r, f, drop=first_key(r)),
                       "differ from the global State"),
    "foreign_tensor": (lambda r, f: update_body(r, f, tensors={"evil": torch.zeros(2)}),
                       "unexpected tensor 'evil'"),
    "no_facts": (lambda r, f: rewrite_header(update_body(r, f), lambda h: {
        **h, "__metadata__": {}}), "'fedfm.update' is missing"),
    "facts_not_json": (lambda r, f: update_body(r, f, metadata={wire.UPDATE_META: "{oops"}),
                       "is not JSON"),
    "zero_examples": (lambda r, f: update_body(r, {**f, "num_examples": 0}),
                      "num_examples must be in 1.."),
    "nan_metric": (lambda r, f: update_body(r, {**f, "metrics": {"train_loss": float("nan")}}),
                   "must be a finite number"),
    "someone_elses_task": (lambda r, f: update_body(r, {**f, "task_id": "r1-c9-forged"}),
                           "task_id is 'r1-c9-forged'"),
}

# Uploads that once got a 500 or crashed the round loop (found by this file's fuzzing): json's
# RecursionError on deep nesting; a non-string fedfm.key_order entry; integers too large for a
# float in metrics, num_examples or metadata.eval; a wall_time that is not a finite number.
HOSTILE: dict[str, Garbage] = {
    "deeply_nested_header": lambda r, f: struct.pack("<Q", 200_000) + _nested(100_000).encode(),
    "deeply_nested_facts": lambda r, f: update_body(r, f, metadata={
        wire.UPDATE_META: json.dumps(f)[:-1] + ', "metadata": ' + _nested(100_000) + "}"}),
    "key_order_not_strings": lambda r, f: update_body(r, f, metadata={
        "fedfm.key_order": "[1, 2]"}),
    "metric_too_large_for_a_float": lambda r, f: update_body(r, f, metadata={
        wire.UPDATE_META: json.dumps(f).replace('"train_loss": 1.0', '"train_loss": 1' +
                                                "0" * 400)}),
    "wall_time_not_a_number": lambda r, f: update_body(r, {**f, "metadata": {
        "wall_time": "abc"}}),
    "wall_time_nan": lambda r, f: update_body(r, {**f, "metadata": {"wall_time": float("nan")}}),
    "num_examples_too_large_for_a_float": lambda r, f: update_body(r, {
        **f, "num_examples": 10**400}),
    "eval_too_large_for_a_float": lambda r, f: update_body(r, {**f, "metadata": {
        "eval": {"accuracy": 10**400}}}),
}
WIRE_LEVEL_KINDS = ("deeply_nested_header", "deeply_nested_facts", "key_order_not_strings",
                    "metric_too_large_for_a_float")

SMALL: Reference = {"layer.weight": torch.zeros(3, 4), "layer.bias": torch.zeros(4)}
SMALL_TASK = {"client_id": 0, "round": 1, "task_id": "r1-c0-test"}


def coordinator_checks(path: Path, reference: Reference, task: dict[str, Any]) -> None:
    """What ``Coordinator.receive_update`` runs on an upload before accepting it."""
    facts = wire.check_header(path, reference)
    for name in ("client_id", "round", "task_id"):
        if facts.get(name) != task[name]:
            raise ValueError(f"upload: {name} is {facts.get(name)!r}")
    validate_update(wire.load_update(path), reference)


@pytest.mark.parametrize("kind", [k for k in GARBAGE if k != "someone_elses_task"]
                         + list(WIRE_LEVEL_KINDS))
def test_the_parser_refuses_garbage_with_a_wire_error(tmp_path: Path, kind: str) -> None:
    build, words = GARBAGE[kind] if kind in GARBAGE else (HOSTILE[kind], "upload:")
    path = tmp_path / "update.safetensors"
    path.write_bytes(build(SMALL, good_facts(SMALL_TASK)))
    with pytest.raises(wire.WireError) as refused:
        coordinator_checks(path, SMALL, SMALL_TASK)
    assert words in str(refused.value)


def test_garbage_uploads_to_real_tasks_get_a_4xx_naming_the_problem(tmp_path: Path) -> None:
    """One client per kind of garbage, each on its own open task, then one valid update: every
    refusal is a 4xx whose detail names the problem; the round aggregates the valid one."""
    kinds = list(GARBAGE)
    with coordinator_app(tmp_path, clients=len(kinds) + 1) as (coordinator, http, tokens):
        reference = coordinator.global_state
        for kind, token in zip(kinds, tokens, strict=False):
            task = poll_task(http, token)
            build, words = GARBAGE[kind]
            response = upload(http, token, task["task_id"], build(reference, good_facts(task)))
            assert 400 <= response.status_code < 500, (kind, response.status_code, response.text)
            assert words in response.json()["detail"], (kind, response.json())
            again = upload(http, token, task["task_id"], fake_update_bytes(coordinator, task))
            assert again.status_code == 409, (kind, again.text)  # the client is out
        task = poll_task(http, tokens[-1])
        body = fake_update_bytes(coordinator, task)
        mismatch = upload(http, tokens[-1], task["task_id"], body, sha="0" * 64)
        assert mismatch.status_code == 400 and "SHA256" in mismatch.json()["detail"]
        assert upload(http, tokens[-1], task["task_id"], body).status_code == 200
        record = wait_for_round(coordinator, 1)
        assert record["completed"] == [task["client_id"]]
        assert_still_serving(coordinator, http, tokens)


def test_hostile_update_metadata_is_refused_and_the_run_survives(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    kinds = list(HOSTILE)
    with coordinator_app(tmp_path, clients=len(kinds),
                         deploy={"round_timeout_s": 4.0, "long_poll_s": 0.2}) as (
            coordinator, http, tokens):
        raw = TestClient(http.app, raise_server_exceptions=False)  # 500s as responses
        reference = coordinator.global_state
        problems = []
        for kind, token in zip(kinds, tokens, strict=True):
            task = poll_task(http, token)
            response = upload(raw, token, task["task_id"],
                              HOSTILE[kind](reference, good_facts(task)))
            if not 400 <= response.status_code < 500:
                problems.append(f"{kind}: HTTP {response.status_code} {response.text[:120]}")
        until = time.monotonic() + 30
        while not coordinator.run_dir.read_metrics() and not coordinator.finished.is_set():
            assert time.monotonic() < until, "round 1 did not end"
            time.sleep(0.2)
        if coordinator.run_state == "failed":
            problems.append(f"the round loop failed: {coordinator.error}")
        assert not problems, "\n".join(problems)


def wait_for_round(coordinator: Any, round_index: int, timeout: float = 60.0) -> dict[str, Any]:
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        for record in coordinator.run_dir.read_metrics():
            if record.get("round") == round_index:
                return record
        assert coordinator.run_state != "failed", coordinator.error
        time.sleep(0.1)
    raise AssertionError(f"round {round_index} did not end")


# --------------------------------------------------------------------------- mutations

_VALID = update_body(SMALL, good_facts(SMALL_TASK))
_HEADER_END = 8 + struct.unpack("<Q", _VALID[:8])[0]


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=_QUIET)
@given(flips=st.lists(st.tuples(st.integers(0, _HEADER_END + 8), st.integers(0, 255)),
                      min_size=1, max_size=6),
       cut=st.none() | st.integers(0, len(_VALID)))
def test_mutated_uploads_fail_only_with_validation_errors(
        flips: list[tuple[int, int]], cut: int | None) -> None:
    """Corrupted header bytes (lengths, JSON, names, shapes, offsets, metadata) or a cut
    anywhere: the checks either pass or raise what ``receive_update`` answers with a 422."""
    body = bytearray(_VALID)
    for index, value in flips:
        body[index] = value
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "update.safetensors"
        path.write_bytes(bytes(body[:cut]))
        with contextlib.suppress(ValueError, TypeError, KeyError):
            coordinator_checks(path, SMALL, SMALL_TASK)


def test_a_valid_small_update_passes_the_checks(tmp_path: Path) -> None:
    path = tmp_path / "update.safetensors"
    path.write_bytes(_VALID)
    coordinator_checks(path, SMALL, SMALL_TASK)
    assert state_ops.equal(wire.load_update(path).payload,
                           {k: torch.full_like(v, 0.01) for k, v in SMALL.items()})
