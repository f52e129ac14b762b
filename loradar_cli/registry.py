"""A tiny name -> object registry behind every name a user picks (unknown names list the valid ones).

To add an entry, decorate it (`@ATTACKS.register("name")`, as timm's `register_model`) in its own module and import
that module where the registry lives; add the name to `loradar_cli.names` too (a test keeps the two equal).
"""

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from loradar_cli.errors import NotFoundError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps stable lower-case keys to factories."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise NotFoundError(f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def add(self, name: str, obj: T) -> T:
        """Register an object that is not a decorated definition (e.g. a record instance)."""
        return self.register(name)(obj)
