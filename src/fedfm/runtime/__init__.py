"""Runtimes: where the client halves run. Importing this package registers them."""

from fedfm.runtime import local
from fedfm.runtime.local import LocalRuntime

__all__ = ["LocalRuntime", "local"]
