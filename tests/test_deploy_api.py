"""The coordinator's API with the test playing the clients: identity and tokens, replayed and
stale uploads, validation of what arrives, round control (deadline, dropout tolerance,
over-selection, minimum clients), and O(model) aggregation of updates left on disk."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from fedfm.core import state as state_ops
from fedfm.core.update import ClientUpdate, UpdateBatch
from fedfm.deploy import wire
from fedfm.deploy.store import StateStore
from tests.deploy_util import bearer, coordinator_app, fake_update_bytes, poll_task, upload


def round_record(coordinator: Any, round_index: int, timeout: float = 60.0) -> dict[str, Any]:
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        for record in coordinator.run_dir.read_metrics():
            if record.get("round") == round_index:
                return record
        time.sleep(0.1)
    raise AssertionError(f"round {round_index} did not end")


def test_every_request_is_authenticated(tmp_path: Path) -> None:
    with coordinator_app(tmp_path, clients=2) as (coordinator, http, tokens):
        assert http.get("/api/v1/health").status_code == 200
        assert http.get("/api/v1/status").status_code == 401
        assert http.get("/api/v1/tasks/next", headers=bearer("forged")).status_code == 401
        store = StateStore(coordinator.store.path)  # as `fedfm server add-client` would
        _, viewer = store.add_client("dashboard", role="viewer")
        assert http.get("/api/v1/status", headers=bearer(viewer)).status_code == 200
        refused = http.get("/api/v1/tasks/next", headers=bearer(viewer))
        assert refused.status_code == 403 and "viewer" in refused.json()["detail"]
        assert http.get("/api/v1/metrics", headers=bearer(tokens[0])).status_code == 200
        store.revoke_client("site1")  # on the live server
        revoked = http.get("/api/v1/tasks/next", headers=bearer(tokens[1]))
        assert revoked.status_code == 401 and "revoked" in revoked.json()["detail"]
        hashes = [row[0] for row in store._db.execute("SELECT token_hash FROM clients")]
        assert not any(token in hashes for token in tokens)  # stored hashed


def test_clients_only_touch_their_own_tasks_and_replays_are_refused(tmp_path: Path) -> None:
    with coordinator_app(tmp_path, clients=2) as (coordinator, http, tokens):
        task0 = poll_task(http, tokens[0])
        task1 = poll_task(http, tokens[1])
        foreign = http.get(f"/api/v1/tasks/{task0['task_id']}/state", headers=bearer(tokens[1]))
        assert foreign.status_code == 403
        body0 = fake_update_bytes(coordinator, task0)
        assert upload(http, tokens[1], task0["task_id"], body0).status_code == 403
        own = http.get(f"/api/v1/tasks/{task0['task_id']}/state", headers=bearer(tokens[0]))
        assert own.status_code == 200
        broadcast = wire.broadcast_from_bytes(own.content)
        assert state_ops.equal(broadcast.global_state, coordinator.global_state)
        assert upload(http, tokens[0], task0["task_id"], body0).status_code == 200
        replay = upload(http, tokens[0], task0["task_id"], body0)
        assert replay.status_code == 409 and "already received" in replay.json()["detail"]
        assert upload(http, tokens[1], task1["task_id"],
                      fake_update_bytes(coordinator, task1)).status_code == 200
        round_record(coordinator, 1)
        stale = upload(http, tokens[1], task1["task_id"], fake_update_bytes(coordinator, task1))
        assert stale.status_code == 409
        task1_next = poll_task(http, tokens[1])
        assert task1_next["round"] == 2
        wrong_round = fake_update_bytes(coordinator, task1_next, round=1)
        refused = upload(http, tokens[1], task1_next["task_id"], wrong_round)
        assert refused.status_code == 422 and "round" in refused.json()["detail"]


@pytest.mark.parametrize("kind", ["garbage", "shape", "nan", "checksum", "too_large"])
def test_bad_uploads_are_refused_and_the_round_goes_on(tmp_path: Path, kind: str) -> None:
    """A 4xx naming the problem; the sender is excluded from the round, the others'
    updates are aggregated; the coordinator keeps serving."""
    with coordinator_app(tmp_path, clients=3,
                         deploy={"max_upload_mb": 0.05}) as (coordinator, http, tokens):
        tasks = [poll_task(http, token) for token in tokens]
        good = fake_update_bytes(coordinator, tasks[1])
        bad_task = tasks[0]
        expected_status, expected_words = {
            "garbage": (422, "safetensors"), "shape": (422, "shape"), "nan": (422, "non-finite"),
            "checksum": (400, "SHA256"), "too_large": (413, "limit")}[kind]
        if kind == "garbage":
            response = upload(http, tokens[0], bad_task["task_id"], b"\x00not a tensor" * 10)
        elif kind == "shape":
            key = next(iter(coordinator.global_state))
            update = ClientUpdate(0, {**{k: torch.zeros_like(v) for k, v in
                                         coordinator.global_state.items()},
                                      key: torch.zeros(3, 3)}, 5)
            response = upload(http, tokens[0], bad_task["task_id"], wire.update_to_bytes(
                update, round_index=1, task_id=bad_task["task_id"]))
        elif kind == "nan":
            update = ClientUpdate(0, {k: torch.full_like(v, float("nan")) for k, v in
                                      coordinator.global_state.items()}, 5)
            response = upload(http, tokens[0], bad_task["task_id"], wire.update_to_bytes(
                update, round_index=1, task_id=bad_task["task_id"]))
        elif kind == "checksum":
            response = upload(http, tokens[0], bad_task["task_id"], good, sha="0" * 64)
        else:
            response = upload(http, tokens[0], bad_task["task_id"], b"x" * 60_000)
        assert response.status_code == expected_status, response.text
        assert expected_words in response.json()["detail"]
        if kind in ("checksum", "too_large"):  # transport problems: the client may resend
            assert upload(http, tokens[0], bad_task["task_id"],
                          fake_update_bytes(coordinator, bad_task)).status_code == 200
        assert upload(http, tokens[1], tasks[1]["task_id"], good).status_code == 200
        assert upload(http, tokens[2], tasks[2]["task_id"],
                      fake_update_bytes(coordinator, tasks[2])).status_code == 200
        record = round_record(coordinator, 1)
        if kind in ("garbage", "shape", "nan"):
            assert record["clients"]["0"]["status"] == "rejected"
            assert record["completed"] == [1, 2]
        else:
            assert record["completed"] == [0, 1, 2]
        assert http.get("/api/v1/status", headers=bearer(tokens[1])).status_code == 200


def test_deadline_and_dropout_tolerance(tmp_path: Path) -> None:
    """A straggler misses the deadline and the round aggregates without it; with fewer than
    min_updates the round is aborted and keeps the global State."""
    with coordinator_app(tmp_path, clients=3, deploy={"round_timeout_s": 3.0, "min_updates": 2}
                         ) as (coordinator, http, tokens):
        tasks = [poll_task(http, token) for token in tokens]
        before = state_ops.clone(coordinator.global_state)
        for index in (0, 1):
            assert upload(http, tokens[index], tasks[index]["task_id"],
                          fake_update_bytes(coordinator, tasks[index])).status_code == 200
        record = round_record(coordinator, 1)
        assert record["completed"] == [0, 1]
        assert record["clients"]["2"]["status"] == "dropped"
        assert "deadline" in record["clients"]["2"]["error"]
        assert "aborted" not in record
        late = upload(http, tokens[2], tasks[2]["task_id"], fake_update_bytes(coordinator,
                                                                             tasks[2]))
        assert late.status_code == 409
        expected = {k: v + 0.01 for k, v in before.items()}
        assert state_ops.max_abs_diff(coordinator.global_state, expected) < 1e-6
        tasks = [poll_task(http, token) for token in tokens]
        after_round_1 = state_ops.clone(coordinator.global_state)
        assert upload(http, tokens[0], tasks[0]["task_id"],
                      fake_update_bytes(coordinator, tasks[0])).status_code == 200
        record = round_record(coordinator, 2)
        assert "min_updates" in record["aborted"]
        assert state_ops.equal(coordinator.global_state, after_round_1)


def test_over_selection_closes_the_round_at_the_target(tmp_path: Path) -> None:
    with coordinator_app(tmp_path, clients=4, federation={"clients_per_round": 2},
                         deploy={"over_selection": 0.5, "min_clients": 4}
                         ) as (coordinator, http, tokens):
        offered = {}
        for index, token in enumerate(tokens):
            found = http.get("/api/v1/tasks/next", params={"wait": 1.0}, headers=bearer(token))
            if found.json()["task"] is not None:
                offered[index] = found.json()["task"]
        assert len(offered) == 3  # 2 + ceil(2 * 0.5)
        first, second, third = sorted(offered)
        for index in (first, second):
            assert upload(http, tokens[index], offered[index]["task_id"],
                          fake_update_bytes(coordinator, offered[index])).status_code == 200
        record = round_record(coordinator, 1)
        assert record["completed"] == [first, second]
        assert "over-selected" in record["clients"][str(third)]["error"]


def test_round_waits_for_min_clients(tmp_path: Path) -> None:
    with coordinator_app(tmp_path, clients=3, online=False, deploy={"min_clients": 3}
                         ) as (coordinator, http, tokens):
        for token in tokens[:2]:
            assert http.get("/api/v1/tasks/next", params={"wait": 1.5},
                            headers=bearer(token)).json()["task"] is None
        assert coordinator.status()["round"]["state"] == "waiting_for_clients"
        assert poll_task(http, tokens[2])["round"] == 1


def test_mean_of_spilled_updates_reads_each_file_once(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Folding as updates arrive gives FedAvg's mean; the aggregator then reads no payload,
    and a robust rule reads the files from disk (nothing held between)."""
    from fedfm.algorithms.aggregation import WeightedMean
    from fedfm.trust.robust.aggregators import CoordinateMedian

    like = {"a": torch.zeros(64, 8), "b": torch.zeros(8)}
    generator = torch.Generator().manual_seed(0)
    updates = []
    for client in range(6):
        payload = {k: torch.randn(v.shape, generator=generator) for k, v in like.items()}
        update = ClientUpdate(client, payload, num_examples=client + 3)
        path = tmp_path / f"u{client}.safetensors"
        path.write_bytes(wire.update_to_bytes(update, round_index=1, task_id=f"t{client}"))
        updates.append((update, wire.SpilledUpdate(path, wire.update_facts(path))))
    loads = []
    real_load = wire.load_update
    monkeypatch.setattr(wire, "load_update", lambda p: loads.append(p) or real_load(p))
    batch = UpdateBatch(fold=True)
    for _, spilled in updates:
        batch.append(spilled)
    assert len(loads) == 6  # one read per update as it arrived
    expected = state_ops.weighted_mean([u.payload for u, _ in updates],
                                       [u.num_examples for u, _ in updates])
    folded = WeightedMean("examples").aggregate(batch)
    assert len(loads) == 6  # the mean came from the running sum
    assert state_ops.max_abs_diff(folded, expected) < 1e-6
    held = vars(batch[0])
    assert "payload" not in held and "aux" not in held  # nothing of the tensors is kept
    plain = list(batch)  # not the folded batch: streamed from disk, one file at a time
    assert state_ops.max_abs_diff(WeightedMean("examples").aggregate(plain), expected) < 1e-6
    assert len(loads) == 12
    median = CoordinateMedian().aggregate_robust(None, plain, 1)
    in_memory = CoordinateMedian().aggregate_robust(None, [u for u, _ in updates], 1)
    assert state_ops.max_abs_diff(median, in_memory) == 0.0


def test_agent_skips_a_task_whose_round_closed_and_stops_on_a_revoked_token(
        tmp_path: Path) -> None:
    """A 409 on the State download (round closed) or a State that twice fails its SHA-256
    skips that task only; a 401 ends the agent with a clear error."""
    import hashlib

    import httpx

    from fedfm.deploy.agent import AgentError, ClientAgent
    from tests.deploy_util import agent_config

    seen: list[str] = []

    def reply(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path.endswith("/t-closed/state"):
            return httpx.Response(409, json={"detail": "round 3 is closed"})
        if request.url.path.endswith("/t-corrupt/state"):
            return httpx.Response(200, content=b"not the promised bytes")
        return httpx.Response(401, json={"detail": "token revoked"})

    agent = ClientAgent("http://coordinator", "token", agent_config(tmp_path, 0, 1),
                        transport=httpx.MockTransport(reply))
    task = {"task_id": "t-closed", "client_id": 0, "round": 3, "protocol": "plain",
            "state_sha256": hashlib.sha256(b"x").hexdigest()}
    agent._do_task(task)
    agent._do_task({**task, "task_id": "t-corrupt"})
    assert (agent.skipped, agent.tasks_done) == (2, 0)
    assert seen.count("/api/v1/tasks/t-corrupt/state") == 2
    with pytest.raises(AgentError, match="token revoked"):
        agent._do_task({**task, "task_id": "t-gone"})
