"""The registries every named component is found in. Adding a method = one ``register`` line."""

from __future__ import annotations

from typing import Any

from fedfm.core.registry import Registry

ALGORITHMS: Registry[Any] = Registry("algorithm")
"""name -> factory ``(AlgorithmConfig, num_clients) -> core.algorithm.Algorithm``."""

SERVER_OPTIMIZERS: Registry[Any] = Registry("server optimizer")
"""name -> factory ``(ServerOptimizerConfig) -> ServerOptimizer``."""

AGGREGATORS: Registry[Any] = Registry("aggregator")
"""name -> factory ``(**options) -> Aggregator``."""

ADAPTERS: Registry[Any] = Registry("adapter")
"""name -> ``(bundle, AdapterConfig, seed) -> torch.nn.Module`` (the adapted model)."""

PRIVACY: Registry[Any] = Registry("privacy mechanism")
"""name -> ``(Algorithm, RunConfig) -> Algorithm`` wrapping both halves with the mechanism."""

ATTACKS: Registry[Any] = Registry("attack")
"""name -> the function that runs the attack (evaluation tools: ``fedfm attack ...``)."""

POISONING: Registry[Any] = Registry("poisoning attack")
"""name -> ``trust.robust.attacks.PoisoningAttack`` subclass: simulated Byzantine clients."""

RUNTIMES: Registry[Any] = Registry("runtime")
"""name -> factory ``(workload, config, client_store) -> core.loop.Runtime``."""

COMPRESSORS: Registry[Any] = Registry("compressor")
"""name -> factory ``(CompressorConfig) -> efficiency.compression.Compressor``."""

SKEW: Registry[Any] = Registry("skew method")
"""name -> factory ``(SkewConfig, RunConfig) -> SkewMethod`` layered on the algorithm
(``fedfm.adaptability.heterogeneity``)."""
