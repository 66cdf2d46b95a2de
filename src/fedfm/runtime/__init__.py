"""Runtimes: where the client halves run. Importing this package registers them."""

from fedfm.runtime import batched, local, ray_actors, remote
from fedfm.runtime.batched import BatchedRuntime
from fedfm.runtime.local import LocalRuntime

__all__ = ["BatchedRuntime", "LocalRuntime", "batched", "local", "ray_actors", "remote"]
