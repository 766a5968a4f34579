"""Package attributes imported on first use, so `clibd --help` does not import torch and transformers.

A package lists what it exports and from which submodule; `__getattr__` (PEP 562) imports the
submodule when a name is first read and keeps the value, so later reads cost nothing.

Usage (in a package's __init__.py):
    __getattr__, __dir__ = lazy_exports(__name__, globals(), {"CLIBDModel": ".modeling_clibd"})
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, namespace: dict, exports: dict[str, str]
                 ) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package` whose names `exports` maps to relative submodules."""

    def __getattr__(name: str) -> object:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], package), name)
        namespace[name] = value  # found directly from now on, without __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
