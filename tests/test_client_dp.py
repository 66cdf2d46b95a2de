"""Client-level DP (issue 5, item 1): the accountant against dp-accounting's own computation,
clipping and noise scales measured, adaptive clipping's quantile, and an end-to-end run."""

from __future__ import annotations

import math
import statistics
from collections import OrderedDict

import dp_accounting
import pytest
import torch
from dp_accounting import pld, rdp

from fedfm import api
from fedfm.algorithms.server_opt import ServerSGD
from fedfm.config import ClientDPConfig, ConfigError, ServerOptimizerConfig
from fedfm.core import state as S
from fedfm.core.loop import sample_clients_poisson
from fedfm.core.update import Broadcast, ClientUpdate
from fedfm.trust.privacy.accountant import (
    ClientLevelAccountant,
    SamplingModel,
    calibrate_noise_multiplier,
    epsilon_for,
)
from fedfm.trust.privacy.client_dp import (
    EXTRAS_KEY,
    DPClient,
    DPServer,
    clip_to_norm,
    update_noise_multiplier,
)

SETTINGS = [(0.01, 1.1, 1000, 1e-5), (0.1, 1.0, 100, 1e-5), (0.05, 2.0, 500, 1e-6),
            (0.3, 0.8, 20, 1e-3)]


@pytest.mark.parametrize(("q", "sigma", "rounds", "delta"), SETTINGS)
def test_poisson_epsilon_matches_dp_accounting(q, sigma, rounds, delta) -> None:
    sampling = SamplingModel("poisson", 1000, round(q * 1000))
    for kind, fresh in (("rdp", rdp.RdpAccountant), ("pld", pld.PLDAccountant)):
        library = fresh()
        library.compose(dp_accounting.PoissonSampledDpEvent(
            q, dp_accounting.GaussianDpEvent(sigma)), rounds)
        expected = library.get_epsilon(delta)
        ours = epsilon_for(sampling, sigma, rounds, delta, kind)
        tolerance = 1e-9 if kind == "pld" else 0.02  # our RDP grid has more orders: tighter
        assert ours <= expected * (1 + 1e-9)
        assert ours == pytest.approx(expected, rel=tolerance)


def test_per_round_composition_equals_self_composition() -> None:
    sampling = SamplingModel("poisson", 500, 25)
    accountant = ClientLevelAccountant(sampling, 1e-5)
    for _ in range(40):
        accountant.record_round(1.3)
    assert accountant.epsilon() == pytest.approx(epsilon_for(sampling, 1.3, 40, 1e-5),
                                                 rel=1e-12)
    mixed = ClientLevelAccountant(sampling, 1e-5, noise_history=[1.3] * 20 + [0.9] * 20)
    library = rdp.RdpAccountant(orders=mixed_orders())
    library.compose(dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.3)),
                    20)
    library.compose(dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(0.9)),
                    20)
    assert mixed.epsilon() == pytest.approx(library.get_epsilon(1e-5), rel=1e-12)


def mixed_orders() -> list[float]:
    from fedfm.trust.privacy.accountant import RDP_ORDERS

    return RDP_ORDERS


def test_fixed_size_sampling_uses_replace_one_with_doubled_sensitivity() -> None:
    sampling = SamplingModel("fixed", 200, 20)
    library = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE,
                                orders=mixed_orders())
    library.compose(dp_accounting.SampledWithoutReplacementDpEvent(
        200, 20, dp_accounting.GaussianDpEvent(2.0 / 2)), 50)
    assert epsilon_for(sampling, 2.0, 50, 1e-5) == pytest.approx(library.get_epsilon(1e-5),
                                                                 rel=1e-12)


@pytest.mark.parametrize("target", [1.0, 4.0, 8.0])
def test_target_epsilon_calibration(target: float) -> None:
    sampling = SamplingModel("poisson", 1000, 50)
    noise = calibrate_noise_multiplier(sampling, target, 200, 1e-5)
    spent = epsilon_for(sampling, noise, 200, 1e-5)
    assert spent <= target and spent > 0.99 * target
    assert epsilon_for(sampling, noise * 0.97, 200, 1e-5) > target  # the smallest such noise


def test_clipping_bounds_the_norm_and_keeps_small_updates() -> None:
    big = OrderedDict(a=torch.full((10,), 3.0), b=torch.full((5, 2), -4.0))
    clipped, norm = clip_to_norm(big, 2.5)
    assert norm == pytest.approx(math.sqrt(10 * 9 + 10 * 16))
    assert S.global_norm(clipped) == pytest.approx(2.5, rel=1e-6)
    assert torch.allclose(clipped["a"] / clipped["a"].norm(), big["a"] / big["a"].norm())
    small, _ = clip_to_norm(big, 100.0)
    assert S.equal(small, big)


def test_adaptive_clipping_splits_the_noise_exactly() -> None:
    for z, count_noise in ((1.0, 5.0), (0.7, 1.0), (2.0, 10.0)):
        z_update = update_noise_multiplier(z, count_noise)
        assert z_update > z
        combined = (z_update ** -2 + (2 * count_noise) ** -2) ** -0.5
        assert combined == pytest.approx(z, rel=1e-12)
    with pytest.raises(ValueError, match="too large"):
        update_noise_multiplier(3.0, 1.0)


def dp_server(cfg: ClientDPConfig, clients: int = 100, sample: int = 10) -> DPServer:
    sampling = SamplingModel(cfg.sampling, clients, sample)
    return DPServer(ServerSGD(ServerOptimizerConfig()), cfg, sampling,
                    cfg.noise_multiplier or 0.0, 1e-5, seed=0)


def test_central_noise_scale_is_z_c_over_m() -> None:
    cfg = ClientDPConfig(noise_multiplier=1.5, clip_norm=0.4)
    server = dp_server(cfg)
    zero = OrderedDict(w=torch.zeros(40_000, dtype=torch.float64))
    released = server.aggregate(zero, [], round=1)["w"]
    expected = 1.5 * 0.4 / 10  # sum noise z C, divided by m = 10 expected clients
    assert float(released.std()) == pytest.approx(expected, rel=0.02)
    assert abs(float(released.mean())) < 4 * expected / math.sqrt(40_000)


def test_distributed_noise_shares_add_up_to_z_c() -> None:
    cfg = ClientDPConfig(noise_multiplier=1.2, clip_norm=1.0, noise="distributed",
                         sampling="fixed")
    server = dp_server(cfg)
    extras = server.broadcast_extras(OrderedDict())
    share = float(extras[EXTRAS_KEY]["noise_std"])
    assert share == pytest.approx(1.2 * 1.0 / math.sqrt(10))

    class Zero:
        def run(self, ctx, broadcast):
            from fedfm.core.algorithm import ClientResult
            return ClientResult(ClientUpdate(ctx.client_id, OrderedDict(
                w=torch.zeros(20_000, dtype=torch.float64)), 1))

    client = DPClient(Zero(), cfg)
    broadcast = Broadcast(OrderedDict(), extras=extras, round=1)
    updates = [client.run(FakeContext(i), broadcast).update for i in range(10)]
    total = sum(u.payload["w"] for u in updates)
    assert float(total.std()) == pytest.approx(1.2, rel=0.03)
    released = server.aggregate(OrderedDict(w=torch.zeros(20_000, dtype=torch.float64)),
                                updates, round=1)
    assert server.round_metrics()["privacy"]["noise_multiplier"] == pytest.approx(1.2)
    assert torch.allclose(released["w"], total / 10)
    server.aggregate(OrderedDict(w=torch.zeros(20_000, dtype=torch.float64)), updates[:6], 2)
    # 4 of 10 dropped: the sum carried only 6 shares, and the accountant is told so
    assert server.round_metrics()["privacy"]["noise_multiplier"] == pytest.approx(
        1.2 * math.sqrt(0.6))


class FakeContext:
    def __init__(self, client_id: int) -> None:
        self.client_id = client_id
        self.seed = 1000 + client_id


def test_dp_client_clips_and_reports_the_bit() -> None:
    cfg = ClientDPConfig(noise_multiplier=1.0, clip_norm=1.0)

    class Big:
        def run(self, ctx, broadcast):
            from fedfm.core.algorithm import ClientResult
            return ClientResult(ClientUpdate(0, OrderedDict(w=torch.full((4,), 5.0)), 3))

    extras = dp_server(cfg).broadcast_extras(OrderedDict())
    update = DPClient(Big(), cfg).run(FakeContext(0), Broadcast(OrderedDict(), extras)).update
    assert S.global_norm(update.payload) == pytest.approx(1.0, rel=1e-6)
    assert float(update.aux["client_dp"]["unclipped"]) == 0.0
    assert update.metrics["update_norm_before_clip"] == pytest.approx(10.0)


def test_adaptive_clip_tracks_the_target_quantile() -> None:
    cfg = ClientDPConfig(noise_multiplier=0.0, clip_norm=0.5,
                         adaptive_clip={"target_quantile": 0.5, "learning_rate": 0.2,
                                        "count_noise_multiplier": 0.01})
    server = dp_server(cfg, clients=1000, sample=100)
    norms = torch.linspace(1.0, 10.0, 100)  # median 5.5
    zero = OrderedDict(w=torch.zeros(1))
    for round_index in range(1, 200):
        bits = (norms <= server.clip_norm).double()
        updates = [ClientUpdate(i, OrderedDict(w=torch.zeros(1)), 1,
                                aux={"client_dp": OrderedDict(unclipped=bits[i:i + 1])})
                   for i in range(100)]
        server.aggregate(zero, updates, round_index)
    assert server.clip_norm == pytest.approx(5.5, rel=0.1)


def test_poisson_sampling_rate() -> None:
    counts = [len(sample_clients_poisson(7, r, 200, 0.1)) for r in range(400)]
    assert statistics.mean(counts) == pytest.approx(20, rel=0.05)
    assert len(set(counts)) > 5  # the number of clients really varies


def test_config_rules(cls_config) -> None:
    with pytest.raises(ConfigError, match="exactly one of noise_multiplier and target_epsilon"):
        cls_config(privacy={"client_dp": {"clip_norm": 1.0}})
    with pytest.raises(ConfigError, match="cannot be combined with algorithm scaffold"):
        cls_config(algorithm={"name": "scaffold", "local": {"optimizer": "sgd"}},
                   privacy={"client_dp": {"noise_multiplier": 1.0}})
    with pytest.raises(ConfigError, match="'distributed' needs sampling: 'fixed'"):
        cls_config(privacy={"client_dp": {"noise_multiplier": 1.0, "noise": "distributed"}})
    with pytest.raises(ConfigError, match="pld accountant supports poisson"):
        cls_config(privacy={"client_dp": {"noise_multiplier": 1.0, "sampling": "fixed",
                                          "accountant": "pld"}})


def test_end_to_end_budget_in_metrics_summary_card_and_resume(cls_config) -> None:
    from fedfm.export import export_run

    dp = {"client_dp": {"clip_norm": 0.5, "target_epsilon": 6.0, "delta": 1e-3,
                        "adaptive_clip": {"target_quantile": 0.5}}}
    fed = {"num_clients": 10, "clients_per_round": 4, "rounds": 3}
    result = api.run(cls_config(privacy=dp, federation=fed))
    spent = [r["privacy"]["epsilon"] for r in result.metrics]
    assert spent == sorted(spent) and spent[-1] <= 6.0 and spent[-1] > 5.9
    noise = result.metrics[0]["privacy"]["noise_multiplier"]
    sampling = SamplingModel("poisson", 10, 4)
    assert spent[-1] == pytest.approx(epsilon_for(sampling, noise, 3, 1e-3), rel=1e-9)
    assert result.summary["privacy"]["client_dp"]["epsilon"] == spent[-1]
    assert result.summary["privacy"]["client_dp"]["rounds_accounted"] == 3
    card = export_run(result.run_dir, "peft").provenance
    assert card["privacy"]["budget_at_round"]["epsilon"] == spent[-1]
    assert card["privacy"]["client_dp"]["target_epsilon"] == 6.0


def test_resume_rebuilds_the_accountant_and_clip_norm(cls_config) -> None:
    dp = {"client_dp": {"clip_norm": 0.5, "noise_multiplier": 0.8, "delta": 1e-3,
                        "adaptive_clip": {"target_quantile": 0.5}}}
    fed = {"num_clients": 10, "clients_per_round": 4, "rounds": 3}
    whole = api.run(cls_config(privacy=dp, federation=fed))
    shorter = api.run(cls_config(privacy=dp, federation={**fed, "rounds": 2}))
    resumed = api.run(resume=shorter.run_dir, overrides=["federation.rounds=3"])
    assert [r["privacy"] for r in resumed.metrics] == [r["privacy"] for r in whole.metrics]
    assert S.max_abs_diff(resumed.final_state, whole.final_state) == 0.0
