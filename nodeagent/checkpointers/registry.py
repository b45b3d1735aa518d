"""Checkpointer backends by name: what the job file's ``checkpointer`` key selects.

``criu`` is imported lazily (only agents that run CRIU units need it); ``app`` is always there.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from nodeagent.checkpointers.base import CheckpointError, Checkpointer

_MODULES = {"criu": "nodeagent.checkpointers.criu", "app": "nodeagent.checkpointers.app"}
NAMES = tuple(sorted(_MODULES))


class UnknownCheckpointer(CheckpointError):
    """The job asked for a backend this agent does not have."""


def backend_class(name: str) -> type[Checkpointer]:
    """The Checkpointer subclass registered as ``name``."""
    module_name = _MODULES.get(name)
    if module_name is None:
        raise UnknownCheckpointer(f"unknown checkpointer {name!r} (known: {', '.join(NAMES)})")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UnknownCheckpointer(f"checkpointer {name!r} is not available here: {e}") from None
    for _, obj in inspect.getmembers(module, inspect.isclass):
        if (issubclass(obj, Checkpointer) and obj is not Checkpointer
                and not inspect.isabstract(obj) and getattr(obj, "name", None) == name):
            return obj
    raise UnknownCheckpointer(f"module {module_name} defines no checkpointer named {name!r}")


def make_backend(name: str, **kwargs: Any) -> Checkpointer:
    """A new instance of backend ``name``."""
    return backend_class(name)(**kwargs)


def capabilities() -> dict[str, dict[str, bool]]:
    """name -> capabilities of every backend that imports on this node (for registration)."""
    out = {}
    for name in NAMES:
        try:
            out[name] = backend_class(name).capabilities.as_dict()
        except UnknownCheckpointer:
            continue
    return out
