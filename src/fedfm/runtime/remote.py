"""The ``remote`` runtime: client halves run in client agents next to the data, driven over
HTTPS by the coordinator (``fedfm server``; the code lives in :mod:`fedfm.deploy`)."""

from __future__ import annotations

from typing import Any

from fedfm.config import ConfigError
from fedfm.core.registries import RUNTIMES
from fedfm.core.registry import MethodInfo


@RUNTIMES.register("remote", MethodInfo(
    "efficiency.systems.runtime",
    "Towards Federated Learning at Scale: System Design (Bonawitz et al., MLSys 2019)",
    "runtime: {kind: remote, num_threads: 1}  # fedfm server CONFIG; sites: fedfm client",
    "real clients over HTTPS: token auth, TLS, deadlines, over-selection, crash-safe SQLite"))
def remote_runtime(workload: Any, client_store: Any) -> Any:
    raise ConfigError("runtime.kind 'remote' runs under the coordinator: start it with "
                      "`fedfm server CONFIG --state-dir DIR` and connect client agents with "
                      "`fedfm client --server URL --token TOKEN --config CLIENT.yaml`")
