"""Name -> class registries for every kind of part: vision encoders, connectors, volume
strategies, scoring profiles, dataset converters.

A part is one class in one file that registers itself where it is defined:

    @CONNECTORS.register("mlp")
    class MLPConnector(Connector, nn.Module): ...

A registry given a `package` finds its parts itself: the first lookup imports every module
of that package (pkgutil), so adding a part is adding one file, and nothing imports a part
before something asks for one. Lookup is by exact name, never by substring, and an unknown
name is an error that lists the known ones.
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Parts of one kind by name.

    `kind` names the kind in errors ("connector"), `plural` its plural when adding an "s"
    is wrong; `package` is the dotted name of the package whose modules hold the parts;
    `attribute` is the class attribute that records a part's registered name (code that
    reports on a part reads it there, never compares names); `error` is the exception
    raised for an unknown name (a `ValueError` subclass, so callers of any registry can
    catch one type).
    """

    def __init__(
        self,
        kind: str,
        *,
        plural: str | None = None,
        package: str | None = None,
        attribute: str = "registered_name",
        error: type[ValueError] = ValueError,
    ) -> None:
        self.kind = kind
        self.plural = plural or f"{kind}s"
        self.package = package
        self.attribute = attribute
        self.error = error
        self._entries: dict[str, T] = {}
        self._discovered = package is None
        self._discovering = False
        self._lock = threading.RLock()

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: register under `name` and record the name on the class."""

        def add(obj: T) -> T:
            known = self._entries.get(name)
            if known is not None and known is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            if isinstance(obj, type):
                setattr(obj, self.attribute, name)
            return obj

        return add

    def unregister(self, name: str) -> None:
        """Remove a part (for parts defined by tests or notebooks that are re-run)."""
        self.check(name)
        del self._entries[name]

    def discover(self) -> None:
        """Import every module of `package` once, so each part in it registers itself.

        An import error propagates: a part that cannot load is a broken install, and a
        registry that silently lacked it would report the name as unknown instead."""
        if self._discovered:
            return
        with self._lock:
            # The same thread comes back here when a part looks something up while it is
            # imported: it sees the parts registered so far. Other threads wait.
            if self._discovered or self._discovering:
                return
            self._discovering = True
            try:
                package = importlib.import_module(self.package)
                for info in pkgutil.iter_modules(package.__path__):
                    importlib.import_module(f"{package.__name__}.{info.name}")
                self._discovered = True
            finally:
                self._discovering = False

    def check(self, name: str) -> None:
        """Raise `error` naming the known parts when `name` is not one of them."""
        if name not in self:
            known = ", ".join(self.names()) or "none"
            raise self.error(f"unknown {self.kind} {name!r}; known {self.plural}: {known}")

    def get(self, name: str) -> T:
        self.check(name)
        return self._entries[name]

    def names(self) -> list[str]:
        self.discover()
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        self.discover()
        return sorted(self._entries.items())

    def __contains__(self, name: object) -> bool:
        self.discover()
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
