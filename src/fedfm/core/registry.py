"""Named registries: every component (algorithm, runtime, partitioner, ...) is found by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class MethodInfo:
    """What ``fedfm methods`` shows for a registered component.

    ``taxonomy`` is a leaf id of the survey taxonomy in ``fedfm.catalogue`` (e.g.
    ``"efficiency.peft.reparameterization"``); ``paper`` names the paper (title, venue, year);
    ``config`` is a YAML snippet that enables the method in a run config."""

    taxonomy: str
    paper: str
    config: str
    summary: str = ""


class UnknownComponentError(KeyError):
    """A config names a component no registry holds."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


class Registry(Generic[T]):
    """A name -> component table with a decorator to fill it."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._info: dict[str, MethodInfo] = {}

    def register(self, name: str, info: MethodInfo | None = None) -> Callable[[T], T]:
        def decorator(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = item
            if info is not None:
                self._info[name] = info
            return item

        return decorator

    def info(self, name: str) -> MethodInfo | None:
        """The catalogue entry registered with ``name`` (None when it has none)."""
        return self._info.get(name)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise UnknownComponentError(
                f"unknown {self.kind} {name!r}; available: {known}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())
