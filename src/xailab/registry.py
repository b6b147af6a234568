"""One small registry class; one instance per kind of thing (datasets, models, methods, metrics, studies).

CLI choices, test parametrisation and docs are generated from ``names()``, so adding an entry is one
decorated function and nothing else to keep in sync.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from xailab.errors import UnknownNameError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to entries (factories or specs). ``kind`` is used in error messages ("model", "dataset")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@MODELS.register("resnet18")`` adds the decorated factory under ``name``."""

        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return add

    def replace(self, name: str, obj: T) -> None:
        """Swap the entry of an already registered ``name`` (e.g. a spec completed by a later decorator)."""
        self.get(name)
        self._entries[name] = obj

    def get(self, name: str) -> T:
        """The factory registered as ``name``; an unknown name raises an error suggesting the nearest ones."""
        try:
            return self._entries[name]
        except KeyError:
            hint = did_you_mean(name, self._entries)
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}.{hint} Valid {self.kind}s: {', '.join(self.names())}."
            ) from None

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
