"""Registered privacy mechanisms: each wraps an algorithm's two halves."""

from __future__ import annotations

import dataclasses
from typing import Any

from fedfm.config import ConfigError, RunConfig
from fedfm.core.algorithm import Algorithm
from fedfm.core.registries import PRIVACY
from fedfm.core.registry import MethodInfo
from fedfm.trust.privacy.accountant import SamplingModel, default_delta
from fedfm.trust.privacy.client_dp import DPClient, DPServer, resolve_noise_multiplier


@PRIVACY.register("client_dp", MethodInfo(
    "trust.privacy.dp",
    "Learning Differentially Private Recurrent Language Models (McMahan et al., ICLR 2018); "
    "adaptive clipping: Differentially Private Learning with Adaptive Clipping (Andrew et al., "
    "NeurIPS 2021)",
    "privacy: {client_dp: {clip_norm: 0.1, target_epsilon: 8.0, adaptive_clip: "
    "{target_quantile: 0.5}}}",
    "DP-FedAvg: per-client clipping, Gaussian noise (central or distributed), dp-accounting"))
def apply_client_dp(algorithm: Algorithm, config: RunConfig) -> Algorithm:
    cfg = config.privacy.client_dp
    assert cfg is not None
    server: Any = algorithm.server
    optimizer = getattr(server, "optimizer", None)
    if optimizer is None or getattr(server, "aggregator", None) is None:
        raise ConfigError(f"invalid config: privacy.client_dp needs an algorithm that averages "
                          f"deltas and applies a server optimizer; {algorithm.name!r} does not")
    federation = config.federation
    sampling = SamplingModel(cfg.sampling, federation.num_clients, federation.sample_size())
    delta = cfg.delta if cfg.delta is not None else default_delta(federation.num_clients)
    noise = resolve_noise_multiplier(cfg, sampling, federation.rounds, delta)
    secure = None
    if config.privacy.secure_aggregation is not None:
        from fedfm.trust.secagg.aggregation import SecureSum

        secure = SecureSum(config.privacy.secure_aggregation, config.seed)
    try:
        dp_server = DPServer(optimizer, cfg, sampling, noise, delta, config.seed, secure)
    except ValueError as exc:
        raise ConfigError(f"invalid config: {exc}") from exc
    info = {**algorithm.info, "client_dp": {"noise_multiplier": noise, "delta": delta,
                                            "sampling": cfg.sampling}}
    return dataclasses.replace(algorithm, client=DPClient(algorithm.client, cfg),
                               server=dp_server, info=info)


@PRIVACY.register("dp_sgd", MethodInfo(
    "trust.privacy.dp",
    "Deep Learning with Differential Privacy (Abadi et al., CCS 2016)",
    "privacy: {dp_sgd: {noise_multiplier: 1.0, max_grad_norm: 1.0}}",
    "sample-level DP-SGD on each client: per-example clipping of adapter gradients, noise, "
    "per-client accounting"))
def apply_dp_sgd(algorithm: Algorithm, config: RunConfig) -> Algorithm:
    from fedfm.trust.privacy.dp_sgd import DPSGDClient

    cfg = config.privacy.dp_sgd
    assert cfg is not None
    client: Any = algorithm.client
    if not all(hasattr(client, name) for name in ("local", "grad_hook", "finish")):
        raise ConfigError(f"invalid config: privacy.dp_sgd needs a delta-based client half "
                          f"(fedavg, fedprox, scaffold, FedOpt); {algorithm.name!r} is not one")
    delta = cfg.delta if cfg.delta is not None else 1e-5
    info = {**algorithm.info, "dp_sgd": {"noise_multiplier": cfg.noise_multiplier,
                                         "delta": delta}}
    return dataclasses.replace(algorithm, client=DPSGDClient(client, cfg, delta), info=info)


@PRIVACY.register("secure_aggregation", MethodInfo(
    "trust.privacy.secure_aggregation",
    "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead (Bell et al., CCS 2020); "
    "Practical Secure Aggregation for Privacy-Preserving Machine Learning (Bonawitz et al., "
    "CCS 2017)",
    "privacy: {secure_aggregation: {degree: 20, threshold: 13}}",
    "SecAgg+ with dropout recovery: the server learns only sums (with client_dp: only the "
    "noisy sum)"))
def apply_secure_aggregation(algorithm: Algorithm, config: RunConfig) -> Algorithm:
    from fedfm.trust.secagg.aggregation import SecureMean, SecureSum

    cfg = config.privacy.secure_aggregation
    assert cfg is not None
    server: Any = algorithm.server
    if config.privacy.client_dp is not None:
        return algorithm  # DP-FedAvg's server sums through SecAgg itself (apply_client_dp)
    if getattr(server, "aggregator", None) is None:
        raise ConfigError(f"invalid config: privacy.secure_aggregation needs an algorithm that "
                          f"aggregates by a mean of updates; {algorithm.name!r} does not")
    server.aggregator = SecureMean(SecureSum(cfg, config.seed), config.algorithm.weighting)
    return algorithm
