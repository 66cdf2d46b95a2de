"""Update compression against its math: quantization error bounds and unbiasedness, exact
top-k / random-k supports, chains, error feedback's telescoping sum, the bytes on the wire,
hostile encodings, and whole runs."""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch

import fedfm
from fedfm.config import CompressorConfig, ConfigError, config_from_dict
from fedfm.core import state as state_ops
from fedfm.core.algorithm import ClientContext, ClientResult
from fedfm.core.update import Broadcast, ClientUpdate
from fedfm.efficiency.compression import (
    CompressedClient,
    CompressedServer,
    build_chain,
    decode_state,
    encode_state,
    encoded_spec,
)
from fedfm.efficiency.compression.base import pack_codes, unpack_codes
from fedfm.efficiency.compression.error_feedback import RESIDUAL_KEY
from fedfm.efficiency.compression.transform import pack
from tests.conftest import lm_config_dict


def chain_of(*steps: dict[str, Any]):
    return build_chain([CompressorConfig(**step) for step in steps])


def roundtrip(chain, state, seed: int = 0):
    encoded = encode_state(chain, state, torch.Generator().manual_seed(seed))
    return encoded, decode_state(chain, encoded, state)


def lora_like(seed: int = 0) -> OrderedDict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return OrderedDict([("q.lora_A.weight", torch.randn(8, 256, generator=g) * 0.02),
                        ("q.lora_B.weight", torch.randn(256, 8, generator=g) * 1e-3),
                        ("v.lora_A.weight", torch.randn(8, 256, generator=g) * 0.02),
                        ("v.lora_B.weight", torch.randn(256, 8, generator=g) * 1e-3)])


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_bit_packing_roundtrips(bits: int) -> None:
    codes = torch.randint(0, 1 << bits, (1001,))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(1001 * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, 1001), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("block_size", [None, 64])
def test_nearest_rounding_error_is_at_most_half_a_step(bits: int, block_size: int | None) -> None:
    state = lora_like()
    _, decoded = roundtrip(chain_of({"kind": "quantize", "bits": bits, "block_size": block_size}),
                           state)
    levels = (1 << bits) - 1
    for key, tensor in state.items():
        flat = tensor.reshape(-1)
        size = block_size or flat.numel()
        for start in range(0, flat.numel(), size):
            block = flat[start:start + size]
            step = float(block.max() - block.min()) / levels
            error = (decoded[key].reshape(-1)[start:start + size] - block).abs().max()
            assert float(error) <= step / 2 * (1 + 1e-5) + 1e-12


def test_per_block_scales_beat_one_scale_per_tensor() -> None:
    vector = torch.cat([torch.randn(512) * 1e-3, torch.randn(512)])  # two very different ranges
    state = {"w": vector}
    _, one = roundtrip(chain_of({"kind": "quantize", "bits": 4}), state)
    _, blocks = roundtrip(chain_of({"kind": "quantize", "bits": 4, "block_size": 64}), state)
    small = slice(0, 512)
    assert (blocks["w"][small] - vector[small]).norm() < 0.1 * (one["w"][small] -
                                                                vector[small]).norm()


def empirical_mean_and_mse(chain, state, draws: int) -> tuple[torch.Tensor, float]:
    total = torch.zeros_like(state["w"], dtype=torch.float64)
    squared = 0.0
    for seed in range(draws):
        _, decoded = roundtrip(chain, state, seed=seed)
        total += decoded["w"].double()
        squared += float((decoded["w"].double() - state["w"].double()).pow(2).sum())
    return total / draws, squared / draws


@pytest.mark.parametrize("step", [
    {"kind": "quantize", "bits": 2, "rounding": "stochastic"},
    {"kind": "qsgd", "bits": 2},
    {"kind": "qsgd", "bits": 4, "block_size": 16},
    {"kind": "randk", "fraction": 0.25, "unbiased": True},
])
def test_unbiased_compressors_average_to_the_input(step: dict[str, Any]) -> None:
    """Mean of many independent encodings -> the input, within 5 standard errors of the
    per-entry estimate (its variance is bounded by the measured mean squared error)."""
    g = torch.Generator().manual_seed(1)
    state = {"w": torch.randn(64, generator=g)}
    draws = 1500
    mean, mse = empirical_mean_and_mse(chain_of(step), state, draws)
    per_entry_std = math.sqrt(mse / 64 / draws)
    bias = (mean - state["w"].double()).abs()
    assert float(bias.max()) < 5 * per_entry_std * math.sqrt(8)  # max over 64 entries
    assert float(bias.mean()) < 1.5 * per_entry_std


def test_nearest_rounding_is_biased_where_stochastic_is_not() -> None:
    state = {"w": torch.tensor([0.0, 0.3, 1.0])}  # 1 bit of room: levels 0, 1/3, 2/3, 1
    _, decoded = roundtrip(chain_of({"kind": "quantize", "bits": 2}), state)
    assert float(decoded["w"][1]) == pytest.approx(1 / 3)  # always the nearest level
    mean, _ = empirical_mean_and_mse(
        chain_of({"kind": "quantize", "bits": 2, "rounding": "stochastic"}), state, 2000)
    assert float(mean[1]) == pytest.approx(0.3, abs=0.01)


@pytest.mark.parametrize("bits,block", [(2, None), (4, None), (8, 128)])
def test_qsgd_variance_is_within_its_bound(bits: int, block: int | None) -> None:
    """Alistarh et al., Lemma 3.1: E||Q(v) - v||^2 <= min(n / s^2, sqrt(n) / s) ||v||^2 per
    bucket of n values."""
    g = torch.Generator().manual_seed(2)
    state = {"w": torch.randn(512, generator=g)}
    _, mse = empirical_mean_and_mse(chain_of({"kind": "qsgd", "bits": bits,
                                              "block_size": block}), state, 200)
    s = (1 << (bits - 1)) - 1
    n = block or 512
    bound = min(n / s**2, math.sqrt(n) / s) * float(state["w"].pow(2).sum())
    assert mse <= bound


def test_topk_keeps_exactly_the_largest_entries() -> None:
    g = torch.Generator().manual_seed(3)
    vector = torch.randn(1000, generator=g)
    encoded, decoded = roundtrip(chain_of({"kind": "topk", "fraction": 0.05}), {"w": vector})
    largest = set(torch.topk(vector.abs(), 50).indices.tolist())
    assert set(encoded["w::indices"].tolist()) == largest
    assert encoded["w::indices"].dtype == torch.int32
    kept = torch.zeros(1000, dtype=torch.bool)
    kept[list(largest)] = True
    assert torch.equal(decoded["w"][kept], vector[kept])
    assert torch.count_nonzero(decoded["w"][~kept]) == 0


def test_randk_server_regenerates_the_clients_indices() -> None:
    vector = torch.arange(1.0, 401.0)
    chain = chain_of({"kind": "randk", "fraction": 0.1})
    encoded, decoded = roundtrip(chain, {"w": vector}, seed=7)
    assert set(encoded) == {"w::values", "w::seed"}  # no indices on the wire
    support = torch.nonzero(decoded["w"]).reshape(-1)
    assert support.numel() == 40
    assert torch.equal(decoded["w"][support], vector[support])
    _, other = roundtrip(chain, {"w": vector}, seed=8)
    assert not torch.equal(torch.nonzero(other["w"]).reshape(-1), support)


def test_chain_quantizes_the_kept_values() -> None:
    state = lora_like()
    chain = chain_of({"kind": "topk", "fraction": 0.1}, {"kind": "quantize", "bits": 8})
    encoded, decoded = roundtrip(chain, state)
    topk_only, sparse = roundtrip(chain_of({"kind": "topk", "fraction": 0.1}), state)
    assert encoded["q.lora_A.weight::values.codes"].dtype == torch.uint8
    for key in state:
        assert torch.equal(encoded[f"{key}::indices"], topk_only[f"{key}::indices"])
        values = topk_only[f"{key}::values"]
        step = float(values.max() - values.min()) / 255
        assert float((decoded[key] - sparse[key]).abs().max()) <= step / 2 * (1 + 1e-5)
    with pytest.raises(ValueError, match="sparsifiers .* before quantizers"):
        chain_of({"kind": "quantize", "bits": 8}, {"kind": "topk", "fraction": 0.1})


def test_bytes_on_the_wire_are_the_serialized_encoding() -> None:
    state = lora_like()
    dense = state_ops.num_bytes(state)
    for steps, low, high in [
        ([{"kind": "quantize", "bits": 8}], 3.9, 4.0),
        ([{"kind": "quantize", "bits": 4}], 7.6, 8.0),
        ([{"kind": "quantize", "bits": 2}], 14.5, 16.0),
        ([{"kind": "topk", "fraction": 0.01}], 30.0, 50.0),
    ]:
        encoded, _ = roundtrip(chain_of(*steps), state)
        spec = encoded_spec(chain_of(*steps), state)
        wire = state_ops.num_bytes(pack(encoded, spec))
        assert low <= dense / wire <= high, (steps, dense / wire)
        payload_bytes = sum(math.prod(shape) * dtype.itemsize for shape, dtype in spec.values())
        assert payload_bytes < wire < payload_bytes + 200  # the header is counted too


# --------------------------------------------------------------------------- the wrappers


class FixedUpdateClient:
    """A client half that sends a given delta every round."""

    def __init__(self, deltas: list[dict[str, torch.Tensor]]) -> None:
        self.deltas = deltas
        self.calls = 0

    def run(self, ctx: ClientContext, broadcast: Broadcast) -> ClientResult:
        delta = self.deltas[self.calls]
        self.calls += 1
        return ClientResult(ClientUpdate(ctx.client_id, OrderedDict(delta), num_examples=4),
                            client_state=ctx.client_state)


def context(seed: int, client_state: Any = None) -> ClientContext:
    return ClientContext(client_id=0, round=seed, seed=seed, model=torch.nn.Identity(),
                         get_state=dict, set_state=lambda s: None, train_examples=[],
                         collate=lambda rows: {}, device=torch.device("cpu"),
                         client_state=client_state)


def test_error_feedback_delays_but_never_loses_the_update() -> None:
    """sum_t D(C(p_t)) = sum_t delta_t - e_T exactly; without the memory, top-k never sends
    the small coordinates."""
    g = torch.Generator().manual_seed(4)
    rounds = 12
    deltas = [{"w": torch.randn(50, generator=g) * (1 + torch.arange(50.0))} for _ in
              range(rounds)]
    chain = chain_of({"kind": "topk", "fraction": 0.1})
    like = {"w": torch.zeros(50)}
    server = CompressedServer(None, chain)  # type: ignore[arg-type]
    for feedback in (True, False):
        client = CompressedClient(FixedUpdateClient(deltas), chain, feedback)
        received = torch.zeros(50)
        own = {"scaffold": {"c": torch.ones(1)}}  # the inner client's state rides along
        for t in range(rounds):
            result = client.run(context(t, own), Broadcast(like))
            received += server.decode_update(result.update, like).payload["w"]
            own = result.client_state
            assert torch.equal(own["scaffold"]["c"], torch.ones(1))
        sent = sum(d["w"] for d in deltas)
        if feedback:
            residual = own[RESIDUAL_KEY]["w"]
            assert torch.allclose(received + residual, sent, atol=1e-4)
            assert torch.count_nonzero(received) > 5 * 5  # more coordinates than top-k alone
        else:
            assert RESIDUAL_KEY not in own
            assert torch.count_nonzero(received[:20]) < 20


def test_bytes_on_the_wire_of_a_packed_update() -> None:
    state = lora_like()
    dense = state_ops.num_bytes(state)
    chain = chain_of({"kind": "quantize", "bits": 8})
    client = CompressedClient(FixedUpdateClient([state]), chain, False)
    update = client.run(context(0), Broadcast(state)).update
    assert list(update.payload) == ["compressed"]
    assert 3.9 < dense / update.num_bytes() <= 4.0
    assert update.metrics["bytes_dense"] == dense


def corrupted_update(chain, like, corrupt) -> ClientUpdate:
    encoded, _ = roundtrip(chain, like)
    corrupt(encoded)
    spec = encoded_spec(chain, like)
    if set(encoded) != set(spec):  # a part missing or extra: the blob has the wrong length
        blob = torch.cat([v.reshape(-1).view(torch.uint8) for v in encoded.values()])
        return ClientUpdate(0, {"compressed": blob}, num_examples=3)
    return ClientUpdate(0, pack(encoded, spec), num_examples=3)


@pytest.mark.parametrize("corrupt,message", [
    (lambda e: e.pop("w::indices"), "40 bytes, expected 80"),
    (lambda e: e.__setitem__("extra", torch.zeros(1)), "84 bytes, expected 80"),
    (lambda e: e["w::indices"].__setitem__(0, 10_000), "w: part 'indices' points outside"),
    (lambda e: e["w::indices"].__setitem__(1, e["w::indices"][0]), "strictly increasing"),
    (lambda e: e["w::values"].__setitem__(0, float("nan")), "non-finite"),
])
def test_malformed_sparse_encodings_are_refused(corrupt, message: str) -> None:
    chain = chain_of({"kind": "topk", "fraction": 0.1})
    like = {"w": torch.randn(100)}
    update = corrupted_update(chain, like, corrupt)
    with pytest.raises(ValueError, match=message):
        CompressedServer(None, chain).decode_update(update, like)  # type: ignore[arg-type]


def test_payloads_that_are_not_one_blob_are_refused() -> None:
    chain = chain_of({"kind": "quantize", "bits": 8})
    like = {"w": torch.randn(100)}
    server = CompressedServer(None, chain)  # type: ignore[arg-type]
    for payload in ({"w": torch.randn(100)}, {"compressed": torch.zeros(108)},
                    {"compressed": torch.zeros(2, 54, dtype=torch.uint8)}):
        with pytest.raises(ValueError, match="one 1-D uint8 tensor"):
            server.decode_update(ClientUpdate(0, payload, num_examples=1), like)


def test_malformed_quantized_encodings_are_refused() -> None:
    like = {"w": torch.randn(100)}

    def set_code(encoded):
        encoded["w::codes"][0] = 0xFF  # code 15 > 2 * 7

    qsgd = chain_of({"kind": "qsgd", "bits": 4})
    with pytest.raises(ValueError, match="w: part 'codes' holds a code above 14"):
        CompressedServer(None, qsgd).decode_update(  # type: ignore[arg-type]
            corrupted_update(qsgd, like, set_code), like)

    def set_step(encoded):
        encoded["w::step"][3] = -1.0

    affine = chain_of({"kind": "quantize", "bits": 8, "block_size": 10})
    with pytest.raises(ValueError, match="negative"):
        CompressedServer(None, affine).decode_update(  # type: ignore[arg-type]
            corrupted_update(affine, like, set_step), like)


# --------------------------------------------------------------------------- runs


def test_a_compressed_run_sends_a_quarter_of_the_bytes(tmp_path: Path) -> None:
    dense = fedfm.run(config_from_dict(lm_config_dict(tmp_path / "dense")))
    int8 = fedfm.run(config_from_dict(lm_config_dict(tmp_path / "int8", algorithm={
        "compression": {"chain": [{"kind": "quantize", "bits": 8, "rounding": "stochastic"}],
                        "error_feedback": True}})))
    ratio = dense.summary["bytes_up"] / int8.summary["bytes_up"]
    assert 3.9 < ratio < 4.5  # above 4: one header entry instead of one per tensor
    for record in int8.metrics:
        for entry in record["clients"].values():
            assert entry["status"] == "ok"
            assert entry["bytes_dense"] / entry["bytes_up"] == pytest.approx(ratio, rel=0.05)
            assert 0 < entry["compression_error"] < 0.02
    # same seeds, same data: the int8 run ends near the dense one
    drift = state_ops.max_abs_diff(dense.final_state, int8.final_state)
    assert drift < 0.05 * max(float(v.abs().max()) for v in dense.final_state.values())


def test_a_client_sending_a_bad_encoding_is_rejected_and_the_round_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedfm.efficiency.compression import transform

    real = transform.pack

    def sabotage(encoded, spec):  # every other upload is packed by a broken codec
        if sabotage.calls % 2 == 1:
            encoded = dict(encoded)
            first = next(k for k in encoded if k.endswith("::indices"))
            encoded[first] = encoded[first].flip(0)
        sabotage.calls += 1
        return real(encoded, spec)

    sabotage.calls = 0
    monkeypatch.setattr(transform, "pack", sabotage)
    result = fedfm.run(config_from_dict(lm_config_dict(tmp_path, algorithm={
        "compression": {"chain": [{"kind": "topk", "fraction": 0.2}]}})))
    statuses = [entry["status"] for r in result.metrics for entry in r["clients"].values()]
    assert statuses.count("rejected") == 3 and statuses.count("ok") == 3
    errors = [e.get("error", "") for r in result.metrics for e in r["clients"].values()]
    assert any("strictly increasing" in error for error in errors)


@pytest.mark.parametrize("changes,message", [
    ({"privacy": {"client_dp": {"noise_multiplier": 1.0, "clip_norm": 1.0}}},
     "privacy.client_dp"),
    ({"privacy": {"secure_aggregation": {}}}, "secure_aggregation"),
])
def test_invalid_combinations_are_refused_at_config_time(tmp_path: Path, changes: dict,
                                                         message: str) -> None:
    from fedfm.api import check_components

    raw = lm_config_dict(tmp_path, algorithm={"compression": {"chain": [
        {"kind": "quantize", "bits": 8}]}}, **changes)
    with pytest.raises(ConfigError, match=message):
        check_components(config_from_dict(raw))


def test_config_names_the_bad_compressor_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="topk needs fraction"):
        config_from_dict(lm_config_dict(tmp_path, algorithm={"compression": {"chain": [
            {"kind": "topk"}]}}))
    with pytest.raises(ConfigError, match="bits"):
        config_from_dict(lm_config_dict(tmp_path, algorithm={"compression": {"chain": [
            {"kind": "quantize", "bits": 3}]}}))
    from fedfm.api import check_components

    with pytest.raises(ConfigError, match="put sparsifiers"):
        check_components(config_from_dict(lm_config_dict(tmp_path, algorithm={
            "compression": {"chain": [{"kind": "qsgd"}, {"kind": "randk", "fraction": 0.5}]}})))
