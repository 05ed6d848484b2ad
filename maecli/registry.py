"""The registries' one mechanism (`maecli.methods`, `maecli.tasks`): a name maps to its class, or to "module:class"
until the class is first asked for, so that reading a registry imports nothing heavy (torch)."""

import importlib
from typing import Any


def resolve(registry: dict[str, Any], name: str, what: str) -> Any:
    """The class registered under `name`, imported the first time it is asked for."""
    assert name in registry, f"{what} must be one of {list(registry)}, got {name!r}"
    if isinstance(registry[name], str):
        module, attr = registry[name].split(":")
        registry[name] = getattr(importlib.import_module(module), attr)
    return registry[name]
