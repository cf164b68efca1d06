"""Named registries with one-line descriptions (timm's `register_model` / `list_models` pattern).

One registry per extension point: backbone adapters, exit rules and training objectives. Unknown names are
answered with the list of known ones; `layerexit list` prints every registry.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from .errors import bad_value

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._descriptions: dict[str, str] = {}

    def register(self, name: str, description: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise RuntimeError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            self._descriptions[name] = description
            return obj

        return decorator

    def get(self, name: str, param: str | None = None) -> T:
        if name not in self._items:
            raise bad_value(param or self.kind, name, f"choose one of {', '.join(sorted(self._items))}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def describe(self) -> list[tuple[str, str]]:
        return [(name, self._descriptions[name]) for name in self.names()]

    def __contains__(self, name: str) -> bool:
        return name in self._items
