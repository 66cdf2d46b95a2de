"""SecAgg+ (issue 5, item 3): exact sums with dropouts, masked inputs look uniform, too many
dropouts abort, honest clients never reveal both secrets, authenticated share channels."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.exceptions import InvalidTag
from scipy import stats

from fedfm.trust.secagg.protocol import (
    FixedPoint,
    SecAggAbort,
    SecAggClient,
    neighbourhood_graph,
)
from fedfm.trust.secagg.simulate import secure_sum

FP = FixedPoint(bound=8.0, frac_bits=24)


def encoded_inputs(n: int, length: int = 500, seed: int = 0) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    raw = {u: rng.normal(scale=2.0, size=length) for u in range(n)}
    return raw, {u: FP.encode(x)[0] for u, x in raw.items()}


@pytest.mark.parametrize(("n", "degree", "threshold"), [(10, 9, 6), (30, 20, 11)])
def test_sum_is_exact_with_30_percent_dropping_after_masked_input(n, degree, threshold) -> None:
    raw, enc = encoded_inputs(n)
    dropping = set(range(0, n, 3))  # a third of the clients vanish before unmasking
    assert len(dropping) / n >= 0.3
    result = secure_sum(enc, threshold=threshold, degree=degree, seed=1,
                        drop_after_masking=dropping)
    assert result.survived == list(range(n))  # their inputs arrived: they count
    plain = sum(enc.values())
    assert np.array_equal(result.total, plain)
    clipped = sum(np.clip(x, -FP.bound, FP.bound) for x in raw.values())
    assert np.abs(FP.decode(result.total) - clipped).max() < n * 2.0 ** -24


def test_sum_is_exact_when_clients_drop_before_sending_their_input() -> None:
    _, enc = encoded_inputs(30)
    gone = {1, 4, 9, 16, 25, 27, 28, 29, 2}
    result = secure_sum(enc, threshold=11, degree=20, seed=3, drop_after_shares=gone)
    assert result.dropped == sorted(gone)
    assert np.array_equal(result.total, sum(enc[u] for u in result.survived))


def test_too_many_dropouts_abort_with_a_reason() -> None:
    _, enc = encoded_inputs(12)
    with pytest.raises(SecAggAbort, match="too many dropouts"):
        secure_sum(enc, threshold=9, degree=11, seed=0, drop_after_masking={0, 1, 2, 3, 4})
    with pytest.raises(SecAggAbort, match="below the threshold"):
        secure_sum(enc, threshold=9, degree=11, seed=0, drop_before_shares=set(range(5)))


def test_a_masked_input_is_indistinguishable_from_uniform() -> None:
    _, enc = encoded_inputs(5, length=20_000)
    zeros = {u: np.zeros(20_000, dtype=np.uint64) for u in range(5)}
    for inputs in (enc, zeros):
        clients = {u: SecAggClient(u, 3) for u in inputs}
        keys = {u: c.advertise_keys() for u, c in clients.items()}
        outgoing = {u: c.share_keys(keys) for u, c in clients.items()}
        for u, client in clients.items():
            client.receive_shares({v: outgoing[v][u] for v in clients})
        masked = clients[0].masked_input(inputs[0])
        top_bytes = (masked >> np.uint64(56)).astype(np.int64)
        counts = np.bincount(top_bytes, minlength=256)
        assert stats.chisquare(counts).pvalue > 1e-3
        bits = np.unpackbits(masked.view(np.uint8))
        assert abs(bits.mean() - 0.5) < 0.01
        low = (masked & np.uint64(0xFFFF)).astype(np.float64) / 65536
        assert stats.kstest(low, "uniform").pvalue > 1e-3


def test_honest_client_never_reveals_both_secrets_of_one_client() -> None:
    clients = {u: SecAggClient(u, 2) for u in range(3)}
    keys = {u: c.advertise_keys() for u, c in clients.items()}
    outgoing = {u: c.share_keys(keys) for u, c in clients.items()}
    clients[0].receive_shares({v: outgoing[v][0] for v in clients})
    with pytest.raises(SecAggAbort, match="both survived and dropped"):
        clients[0].unmask([0, 1], [1, 2])
    clients[0].unmask([0, 1], [2])
    with pytest.raises(SecAggAbort, match="already answered"):
        clients[0].unmask([0], [1, 2])


def test_share_channel_is_authenticated() -> None:
    clients = {u: SecAggClient(u, 2) for u in range(3)}
    keys = {u: c.advertise_keys() for u, c in clients.items()}
    outgoing = {u: c.share_keys(keys) for u, c in clients.items()}
    blob = bytearray(outgoing[1][0])
    blob[-1] ^= 1
    with pytest.raises(InvalidTag):
        clients[0].receive_shares({1: bytes(blob)})
    with pytest.raises(InvalidTag):  # a share replayed as if from another sender
        clients[0].receive_shares({2: outgoing[1][0]})


def test_fixed_point_encoding_and_capacity() -> None:
    values = np.array([0.0, 1.5, -2.25, 7.999, 9.0, -100.0])
    encoded, clipped = FP.encode(values)
    assert clipped == 2
    assert np.allclose(FP.decode(encoded), np.clip(values, -8, 8), atol=2.0 ** -24)
    assert FP.capacity_ok(10_000) and not FixedPoint(bound=1e9, frac_bits=32).capacity_ok(10)


def test_graph_is_regular_and_includes_self() -> None:
    graph = neighbourhood_graph(list(range(50)), 10, seed=4)
    assert all(len(nbrs) == 11 and u in nbrs for u, nbrs in graph.items())
    assert all(u in graph[v] for u, nbrs in graph.items() for v in nbrs)  # symmetric


# --------------------------------------------------------------------------- in a federated run


def test_secure_fedavg_equals_plain_fedavg_up_to_fixed_point(cls_config) -> None:
    from fedfm import api
    from fedfm.core import state as S

    fed = {"num_clients": 8, "clients_per_round": 5, "rounds": 2}
    plain = api.run(cls_config(federation=fed))
    secure = api.run(cls_config(federation=fed, privacy={"secure_aggregation": {}}))
    assert S.max_abs_diff(plain.final_state, secure.final_state) < 1e-5
    report = secure.metrics[-1]["secure_aggregation"]
    assert report["survived"] == 5 and report["bytes_up_per_client"] > 0
    # the round's bytes are the protocol's: the masked 64-bit ring words, the keys and shares
    # replace the plain fp32 payload up, and the protocol's messages add to the broadcast down
    for plain_round, secure_round in zip(plain.metrics, secure.metrics, strict=True):
        assert secure_round["bytes_up"] > 1.5 * plain_round["bytes_up"]
        assert secure_round["bytes_down"] > plain_round["bytes_down"]
        sent = [c["bytes_up"] for c in secure_round["clients"].values()]
        assert sum(sent) == secure_round["bytes_up"]
        assert secure_round["bytes_up"] / 5 == pytest.approx(
            secure_round["secure_aggregation"]["bytes_up_per_client"])
        assert "wire_bytes" not in secure_round
    assert secure.summary["bytes_up"] == sum(r["bytes_up"] for r in secure.metrics)


def test_distributed_dp_with_secure_aggregation_end_to_end(cls_config) -> None:
    from fedfm import api
    from fedfm.core import state as S

    fed = {"num_clients": 10, "clients_per_round": 6, "rounds": 3}
    dp = {"noise_multiplier": 0.0, "clip_norm": 0.5, "noise": "distributed",
          "sampling": "fixed"}
    clear = api.run(cls_config(federation=fed, privacy={"client_dp": dp}))
    hidden = api.run(cls_config(federation=fed, privacy={
        "client_dp": dp, "secure_aggregation": {"degree": 5, "threshold": 4}}))
    # without noise, the secure sum is the clear sum up to the fixed-point grid
    assert S.max_abs_diff(clear.final_state, hidden.final_state) < 1e-5
    noisy = api.run(cls_config(federation=fed, privacy={
        "client_dp": {**dp, "noise_multiplier": 0.8},
        "secure_aggregation": {"degree": 5, "threshold": 4, "simulate_dropout_prob": 0.2}}))
    for record in noisy.metrics:
        arrived = record["secure_aggregation"]["survived"]
        assert record["privacy"]["clients_aggregated"] == arrived
        # the accountant is told the noise the surviving shares really carried
        assert record["privacy"]["noise_multiplier"] == pytest.approx(0.8 * (arrived / 6) ** 0.5)
    assert any(r["secure_aggregation"]["dropped_in_protocol"] > 0 for r in noisy.metrics)


def test_a_round_with_too_many_protocol_dropouts_is_aborted_not_wrong(cls_config) -> None:
    from fedfm import api

    result = api.run(cls_config(
        federation={"num_clients": 6, "clients_per_round": 6, "rounds": 2},
        privacy={"secure_aggregation": {"degree": 5, "threshold": 5,
                                        "simulate_dropout_prob": 0.6}}))
    aborted = [r for r in result.metrics if "aborted" in r]
    assert aborted
    assert ("too many dropouts" in aborted[0]["aborted"]
            or "below the threshold" in aborted[0]["aborted"])
    assert "secure_aggregation" not in aborted[0]


def test_secure_aggregation_compatibility_rules(cls_config) -> None:
    from fedfm.config import ConfigError

    with pytest.raises(ConfigError, match="cannot be combined with algorithm scaffold"):
        cls_config(algorithm={"name": "scaffold", "local": {"optimizer": "sgd"}},
                   privacy={"secure_aggregation": {}})
    with pytest.raises(ConfigError, match="must be a majority"):
        cls_config(privacy={"secure_aggregation": {"degree": 10, "threshold": 5}})


def test_secure_aggregation_refuses_an_aggregator_that_needs_individual_updates(
        cls_config) -> None:
    from fedfm import api
    from fedfm.config import ConfigError
    from fedfm.core.registries import AGGREGATORS

    class CoordinateMedian:  # stands in for the robust aggregators (a median needs them all)
        sum_compatible = False

        def aggregate(self, updates):
            raise AssertionError("never built")

    AGGREGATORS.register("test_median")(CoordinateMedian)
    try:
        with pytest.raises(ConfigError, match="cannot be combined with algorithm.aggregator "
                                              "'test_median'.*reveals only the sum"):
            api.check_components(cls_config(algorithm={"aggregator": "test_median"},
                                            privacy={"secure_aggregation": {}}))
        api.check_components(cls_config(algorithm={"aggregator": "test_median"}))  # alone: ok
    finally:
        AGGREGATORS._items.pop("test_median")
    with pytest.raises(ConfigError, match="unknown aggregator 'kurm'"):
        api.check_components(cls_config(algorithm={"aggregator": "kurm"}))
