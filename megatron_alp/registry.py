"""A registry by exact name: duplicates rejected, a miss answered with the valid names.

Shared by the small registries of the package (rewards, and any new one) so that every
"unknown name" message reads the same.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """``what`` names the kind of thing in messages (``"reward"``)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register under ``name``; a second registration is a ValueError."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.what} name must be a non-empty string, got {name!r}")

        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.what} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def names(self) -> list[str]:
        """Sorted registered names."""
        return sorted(self._items)

    def get(self, name: str) -> T:
        """The entry ``name``; ValueError listing the valid names otherwise."""
        if name not in self._items:
            raise ValueError(f"unknown {self.what} {name!r}; available: {', '.join(self.names())}")
        return self._items[name]
