"""Core contracts: State arithmetic and serialization, registry errors, client stores,
checkpoints, seeded sampling, and the loop's rejection of malformed updates."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from fedfm.core import client_store as store_ops
from fedfm.core import state as S
from fedfm.core.checkpoint import CheckpointManager, latest_checkpoint, load_checkpoint
from fedfm.core.loop import (
    ClientOutcome,
    EvalReport,
    LoopSettings,
    LoopSnapshot,
    RoundLoop,
    sample_clients,
    simulate_dropouts,
)
from fedfm.core.registry import Registry, UnknownComponentError
from fedfm.core.update import ClientUpdate


def _state(*values: float) -> S.State:
    return OrderedDict(a=torch.tensor(values[:2], dtype=torch.float32),
                       b=torch.tensor([[values[2]]], dtype=torch.float32))


def test_weighted_mean_is_exact_example_weighting() -> None:
    s1, s2 = _state(1.0, 2.0, 3.0), _state(3.0, 6.0, -1.0)
    mean = S.weighted_mean([s1, s2], [1, 3])
    assert torch.allclose(mean["a"], torch.tensor([2.5, 5.0]))
    assert torch.allclose(mean["b"], torch.tensor([[0.0]]))
    assert mean["a"].dtype == torch.float32


def test_state_serialization_round_trip_keeps_order_and_bits() -> None:
    state = OrderedDict(z=torch.randn(3, 2), a=torch.randn(4).to(torch.bfloat16))
    back = S.from_bytes(S.to_bytes(state))
    assert list(back) == ["z", "a"]
    assert S.equal(state, back)
    assert S.num_bytes(state) == len(S.to_bytes(state))


def test_check_compatible_names_the_key() -> None:
    with pytest.raises(S.StateMismatchError, match="b has shape"):
        S.check_compatible(_state(1, 2, 3), OrderedDict(a=torch.zeros(2), b=torch.zeros(2)))
    with pytest.raises(S.StateMismatchError, match="missing"):
        S.check_compatible(_state(1, 2, 3), OrderedDict(a=torch.zeros(2)))


def test_registry_lists_known_names_on_unknown() -> None:
    registry: Registry[int] = Registry("widget")
    registry.register("alpha")(1)
    with pytest.raises(UnknownComponentError, match="unknown widget 'beta'; available: alpha"):
        registry.get("beta")
    with pytest.raises(ValueError, match="twice"):
        registry.register("alpha")(2)


def _make_store(kind: str, directory) -> store_ops.ClientStore:
    if kind == "memory":
        return store_ops.MemoryClientStore()
    if kind == "disk":
        return store_ops.DiskClientStore(directory)
    return store_ops.TieredClientStore(directory, memory_bytes=30)  # room for two 12-byte states


@pytest.mark.parametrize("kind", ["memory", "disk", "tiered"])
def test_client_store_round_trip(kind: str, tmp_path) -> None:
    store = _make_store(kind, tmp_path / "clients")
    store.put(3, {"control": _state(1, 2, 3)})
    store.put(1, {"control": _state(4, 5, 6), "residual": _state(7, 8, 9)})
    saved = store_ops.save_store(store, tmp_path / "saved")
    other = _make_store(kind, tmp_path / "other")
    store_ops.load_store(other, tmp_path / "saved")
    assert saved == 2 and other.client_ids() == [1, 3]
    assert S.equal(other.get(1)["residual"], _state(7, 8, 9))
    assert S.equal(other.get(3)["control"], _state(1, 2, 3))
    assert store.get(0) is None


def test_tiered_store_keeps_recent_states_in_memory_within_its_budget(tmp_path) -> None:
    store = store_ops.TieredClientStore(tmp_path / "clients", memory_bytes=30)
    for client_id in range(5):  # 12 bytes each: two fit
        store.put(client_id, {"control": _state(client_id, 0, 0)})
    assert store.in_memory() == [3, 4] and store.bytes_in_memory == 24
    assert store.disk.client_ids() == [0, 1, 2]
    assert store.client_ids() == [0, 1, 2, 3, 4]
    store.get(3)  # most recently used now
    store.put(1, {"control": _state(10, 0, 0)})  # back from disk: evicts client 4
    assert store.in_memory() == [3, 1] and store.disk.client_ids() == [0, 2, 4]
    for client_id, first in ((0, 0), (1, 10), (2, 2), (4, 4)):
        assert S.equal(store.get(client_id)["control"], _state(first, 0, 0))
    big = {"control": _state(1, 2, 3), "residual": _state(4, 5, 6), "more": _state(7, 8, 9)}
    store.put(7, big)  # larger than the whole budget: straight to disk
    assert 7 not in store.in_memory() and store.disk.path_of(7) is not None


def test_checkpoints_hard_link_states_already_on_disk(tmp_path) -> None:
    store = store_ops.TieredClientStore(tmp_path / "clients", memory_bytes=0)
    store.put(5, {"control": _state(1, 2, 3)})
    manager = CheckpointManager(tmp_path / "ckpt", client_store=store)
    path = manager.save(LoopSnapshot(1, _state(0, 0, 0), {}, {}))
    saved = path / "client_states" / "client_5.safetensors"
    assert saved.stat().st_ino == store.path_of(5).stat().st_ino
    store.put(5, {"control": _state(9, 9, 9)})  # replaced atomically: the checkpoint keeps 1,2,3
    restored = store_ops.MemoryClientStore()
    store_ops.load_store(restored, load_checkpoint(path).client_states_dir)
    assert S.equal(restored.get(5)["control"], _state(1, 2, 3))


def test_checkpoint_round_trip_and_latest(tmp_path) -> None:
    store = store_ops.MemoryClientStore()
    store.put(2, {"control": _state(1, 1, 1)})
    manager = CheckpointManager(tmp_path, every=2, keep=2, client_store=store)
    for round_index in (1, 2, 3, 4, 5):
        snapshot = LoopSnapshot(round_index, _state(round_index, 0, 0),
                                {"optimizer.m": _state(0, 1, 2)}, {"bytes_up": 10.0})
        if manager.should_save(round_index, last_round=5):
            manager.save(snapshot)
    saved = sorted(p.name for p in tmp_path.glob("round_*"))
    assert saved == ["round_0004", "round_0005"]  # 2 and 4 and 5 saved, keep=2
    checkpoint = load_checkpoint(latest_checkpoint(tmp_path))
    assert checkpoint.snapshot.round == 5
    assert S.equal(checkpoint.snapshot.global_state, _state(5, 0, 0))
    assert S.equal(checkpoint.snapshot.server_state["optimizer.m"], _state(0, 1, 2))
    restored = store_ops.MemoryClientStore()
    store_ops.load_store(restored, checkpoint.client_states_dir)
    assert restored.get(2)["control"]["a"].tolist() == [1.0, 1.0]


def test_sampling_and_dropouts_are_seeded_and_sized() -> None:
    first = sample_clients(7, 3, 100, 10)
    assert first == sample_clients(7, 3, 100, 10)
    assert len(set(first)) == 10 and first == sorted(first)
    assert first != sample_clients(7, 4, 100, 10)
    assert sample_clients(0, 1, 5, 9) == [0, 1, 2, 3, 4]
    clients = list(range(2000))
    dropped = simulate_dropouts(1, 1, clients, 0.25)
    assert 0.2 < len(dropped) / 2000 < 0.3
    assert simulate_dropouts(1, 1, clients, 0.0) == set()


class _EchoRuntime:
    """Returns scripted updates; lets the loop be tested without a model."""

    def __init__(self, payloads: dict[int, S.State]) -> None:
        self.payloads = payloads

    def run_clients(self, client_ids, broadcast, round):
        for cid in client_ids:
            update = ClientUpdate(cid, self.payloads[cid], num_examples=cid + 1)
            yield ClientOutcome(cid, update, bytes_up=update.num_bytes())

    def evaluate(self, global_state, *, round, per_client):
        return EvalReport({"norm": S.global_norm(global_state)}, {})

    def close(self) -> None:
        return None


class _MeanServer:
    def broadcast_extras(self, global_state):
        return {}

    def aggregate(self, global_state, updates, round):
        mean = S.weighted_mean([u.payload for u in updates], [u.num_examples for u in updates])
        return S.add(global_state, mean)

    def state_dict(self):
        return {}

    def load_state_dict(self, states) -> None:
        return None


def test_loop_rejects_malformed_updates_without_crashing() -> None:
    good = _state(1, 1, 1)
    payloads = {0: good, 1: OrderedDict(a=torch.zeros(5), b=torch.zeros(1, 1)),
                2: _state(float("nan"), 0, 0)}
    records: list[dict] = []

    class Recorder:
        def on_round_start(self, round, selected): ...
        def on_client_done(self, round, outcome): ...
        def on_round_end(self, record): records.append(record)

    loop = RoundLoop(settings=LoopSettings(seed=0, num_clients=3, sample_size=3, rounds=1),
                     server=_MeanServer(), runtime=_EchoRuntime(payloads),
                     observers=[Recorder()])
    final = loop.run(LoopSnapshot(0, S.zeros_like(good), {}, {}))
    assert S.equal(final.global_state, good)  # only client 0 was aggregated
    statuses = {cid: c["status"] for cid, c in records[0]["clients"].items()}
    assert statuses == {"0": "ok", "1": "rejected", "2": "rejected"}
    assert "shape" in records[0]["clients"]["1"]["error"]
    assert records[0]["bytes_up"] > 0 and "eval" in records[0]


def _bad_update_round(update: ClientUpdate, store=None, client_state=None):
    class OneShot:
        def run_clients(self, client_ids, broadcast, round):
            yield ClientOutcome(0, update, client_state=client_state)

        def evaluate(self, global_state, *, round, per_client):
            return EvalReport()

        def close(self) -> None: ...

    records: list[dict] = []

    class Recorder:
        def on_round_start(self, round, selected): ...
        def on_client_done(self, round, outcome): ...
        def on_round_end(self, record): records.append(record)

    loop = RoundLoop(settings=LoopSettings(seed=0, num_clients=1, sample_size=1, rounds=1,
                                           eval_enabled=False),
                     server=_MeanServer(), runtime=OneShot(), observers=[Recorder()],
                     client_store=store)
    final = loop.run(LoopSnapshot(0, _state(0.0, 0.0, 0.0), {}, {}))
    return final, records[0]["clients"]["0"]


@pytest.mark.parametrize("update", [
    ClientUpdate(0, _state(1.0, 1.0, 1.0), num_examples=float("nan")),
    ClientUpdate(0, _state(1.0, 1.0, 1.0), num_examples=True),
    ClientUpdate(0, _state(1.0, 1.0, 1.0), num_examples=3,
                 aux={"control_delta": _state(float("inf"), 0.0, 0.0)}),
    ClientUpdate(0, _state(1.0, 1.0, 1.0), num_examples=3, metrics={"train_loss": "low"}),
    ClientUpdate(0, _state(1.0, 1.0, 1.0), num_examples=3, metrics={"x": float("nan")}),
])
def test_poisoned_updates_are_rejected_and_leave_the_global_state(update) -> None:
    final, record = _bad_update_round(update)
    assert record["status"] == "rejected"
    assert S.equal(final.global_state, _state(0.0, 0.0, 0.0))


def test_client_state_is_committed_only_for_accepted_updates() -> None:
    store = store_ops.MemoryClientStore()
    rejected = ClientUpdate(0, _state(float("nan"), 0.0, 0.0), num_examples=1)
    _bad_update_round(rejected, store, client_state={"control": _state(1.0, 1.0, 1.0)})
    assert store.get(0) is None
    accepted = ClientUpdate(0, _state(1.0, 0.0, 0.0), num_examples=1)
    _, record = _bad_update_round(accepted, store, client_state={"control": _state(2.0, 2, 2)})
    assert record["status"] == "ok" and S.equal(store.get(0)["control"], _state(2.0, 2, 2))


def test_client_metrics_cannot_overwrite_the_record() -> None:
    update = ClientUpdate(0, _state(1.0, 0.0, 0.0), num_examples=1, metrics={"status": 1.0})
    _, record = _bad_update_round(update)
    assert record["status"] == "ok"


def test_a_thousand_registered_clients_materialize_only_the_sampled_ones(tmp_path) -> None:
    """1,000 clients, 20 a round: a client's state exists only once it was sampled, at most
    the budget's worth stays in memory, and each checkpoint streams the store to files."""
    seen: list[set[int]] = []

    class Stateful:
        def run_clients(self, client_ids, broadcast, round):
            seen.append(set(client_ids))
            for cid in client_ids:
                update = ClientUpdate(cid, _state(1, 1, 1), num_examples=1)
                yield ClientOutcome(cid, update, client_state={"control": _state(cid, 0, 0)})

        def evaluate(self, global_state, *, round, per_client):
            return EvalReport()

        def close(self) -> None: ...

    store = store_ops.TieredClientStore(tmp_path / "clients", memory_bytes=5 * 12)
    manager = CheckpointManager(tmp_path / "ckpt", client_store=store, keep=1)
    loop = RoundLoop(settings=LoopSettings(seed=3, num_clients=1000, sample_size=20, rounds=4,
                                           eval_enabled=False),
                     server=_MeanServer(), runtime=Stateful(), client_store=store,
                     checkpointer=manager)
    loop.run(LoopSnapshot(0, _state(0, 0, 0), {}, {}))
    sampled = set().union(*seen)
    assert all(len(ids) == 20 for ids in seen) and len(sampled) > 20
    assert store.client_ids() == sorted(sampled)
    assert len(store.in_memory()) == 5 and store.bytes_in_memory <= 5 * 12
    files = list((latest_checkpoint(tmp_path / "ckpt") / "client_states").iterdir())
    assert len(files) == len(sampled)
    restored = store_ops.TieredClientStore(tmp_path / "restored", memory_bytes=5 * 12)
    store_ops.load_store(restored, latest_checkpoint(tmp_path / "ckpt") / "client_states")
    for cid in sampled:
        assert S.equal(restored.get(cid)["control"], _state(cid, 0, 0))


def test_checkpoints_from_before_per_client_files_still_restore(tmp_path) -> None:
    from safetensors.torch import save_file

    from fedfm.core.checkpoint import restore_client_states

    path = tmp_path / "round_0002"
    path.mkdir()
    save_file({"4/control::a": torch.tensor([1.0, 2.0]), "4/control::b": torch.tensor([[3.0]])},
              str(path / "client_states.safetensors"))
    store = store_ops.MemoryClientStore()
    store.put(9, {"control": _state(0, 0, 0)})  # replaced, not merged
    restore_client_states(store, path)
    assert store.client_ids() == [4]
    assert S.equal(store.get(4)["control"], _state(1, 2, 3))
