"""A name -> (config dataclass, factory) registry, shared by policies and correctors.

The CLI takes its ``choices`` and option names from here, so adding a method is one decorator.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Entry:
    name: str
    config_cls: type
    factory: Callable[[Any], Any]
    help: str


class Registry:
    def __init__(self, kind: str, load: Callable[[], None] = lambda: None):
        self.kind = kind
        self.entries: dict[str, Entry] = {}
        self._load = load  # imports the modules that register themselves

    def register(self, name: str, config_cls: type, help: str):
        """Decorator over ``factory(config) -> object``."""

        def wrap(factory):
            self.entries[name] = Entry(name, config_cls, factory, help)
            return factory

        return wrap

    def names(self) -> list[str]:
        self._load()
        return sorted(self.entries)

    def get(self, name: str) -> Entry:
        self._load()
        if name not in self.entries:
            raise ValueError(f"unknown {self.kind} {name!r}; choose from {sorted(self.entries)}")
        return self.entries[name]

    def make(self, name: str, **options):
        """Build from keyword options; an unknown name or option is a clear error."""
        entry = self.get(name)
        fields = {f.name for f in dataclasses.fields(entry.config_cls)}
        unknown = set(options) - fields
        if unknown:
            raise ValueError(f"{self.kind} {name!r} has no option(s) {sorted(unknown)}; it takes {sorted(fields)}")
        return entry.factory(entry.config_cls(**options))


def _convert(text: str, hint) -> Any:
    """Turn a command-line value into the config field's type (int, float, bool, str, Optional)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args and typing.get_origin(hint) in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null"):
            return None
        hint = args[0]
    if typing.get_origin(hint) is tuple:
        inner = typing.get_args(hint)[0]
        return tuple(_convert(t, inner) for t in text.split("/") if t)
    if hint is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{text!r} is not a boolean")
    if hint in (int, float, str):
        return hint(text)
    return text


def parse_spec(registry: Registry, spec: str):
    """``"name:key=value,key=value"`` -> the object the registry builds (values typed by the config)."""
    name, _, rest = spec.partition(":")
    entry = registry.get(name.strip())
    hints = typing.get_type_hints(entry.config_cls)
    options = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq:
            raise ValueError(f"option {item!r} of {name!r} needs the form key=value")
        if key not in hints:
            raise ValueError(f"{registry.kind} {name!r} has no option {key!r}; it takes {sorted(hints)}")
        try:
            options[key] = _convert(value.strip(), hints[key])
        except ValueError as err:
            raise ValueError(f"option {key}={value!r} of {name!r}: {err}") from None
    return registry.make(name.strip(), **options)


def describe_registry(registry: Registry) -> str:
    """One line per entry with its options and defaults, for --help."""
    lines = []
    for name in registry.names():
        entry = registry.entries[name]
        opts = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(entry.config_cls))
        lines.append(f"  {name}: {entry.help}" + (f" [{opts}]" if opts else ""))
    return "\n".join(lines)
