"""Named registries with one-line descriptions (timm's `register_model` / `list_models` pattern).

One registry per extension point: backbone and decoder adapters, exit rules and token rules, execution
backends and training objectives. Each is built on a table of :mod:`layerexit.catalog`, where every name's
one-line description is written once. Unknown names are answered with the list of known ones; `layerexit
list` prints every table.
"""

from __future__ import annotations

from typing import Callable, Generic, Mapping, TypeVar

from .errors import bad_value

T = TypeVar("T")


class Registry(Generic[T]):
    """``index``: the names and one-line descriptions of :mod:`layerexit.catalog` (the torch-free index the
    command line reads). A part registers by name alone and takes its description from there, so each
    description is written once; a name missing from the index is refused at import."""

    def __init__(self, kind: str, index: Mapping[str, str]):
        self.kind = kind
        self.index = index
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        if name not in self.index:
            raise RuntimeError(f"{self.kind} {name!r} is not in layerexit.catalog: add its name and one-line "
                               "description there (the command line reads them without importing torch)")

        def decorator(obj: T) -> T:
            if name in self._items:
                raise RuntimeError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str, param: str | None = None) -> T:
        if name not in self._items:
            raise bad_value(param or self.kind, name, f"choose one of {', '.join(sorted(self._items))}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def describe(self) -> list[tuple[str, str]]:
        return [(name, self.index[name]) for name in self.names()]

    def __contains__(self, name: str) -> bool:
        return name in self._items
