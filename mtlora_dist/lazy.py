"""Lazy package exports (PEP 562), so importing a package's torch-free config does not load torch."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, **modules: list[str]) -> Callable[[str], Any]:
    """A package ``__getattr__``: ``lazy_exports(__name__, inject=["inject_adapters"])`` imports
    ``<package>.inject`` when ``inject_adapters`` is first read."""
    where = {name: f"{package}.{module}" for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name in where:
            return getattr(importlib.import_module(where[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
