"""A registry: names to entries of one declared type. A second entry under a name already
taken, or an entry of another type, is refused at once: two declarations that silently replace
each other are a bug found only when the wrong one runs."""

import importlib
from collections.abc import Iterator, Mapping


class Registry(Mapping):
    def __init__(self, kind: str, entry_type: type):
        self.kind, self.entry_type = kind, entry_type
        self._entries: dict = {}

    def add(self, name: str, entry):
        if not isinstance(name, str) or not name:
            raise TypeError(f"a {self.kind} is registered under a non-empty name, not {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        if not isinstance(entry, self.entry_type):
            raise TypeError(f"{self.kind} {name!r} must be of type {self.entry_type.__name__}, "
                            f"not {type(entry).__name__}")
        self._entries[name] = entry
        return entry

    def __getitem__(self, name: str):
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def load(path: str):
    """The object a "package.module:name" path names, imported on first use: a registry that
    the command's parsers read stays free of torch."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)
