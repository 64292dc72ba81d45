"""Public names of a package loaded on first use (PEP 562): `import terdit` or `python -m
runtime` imports none of torch, ONNX Runtime or the package's modules until a name is used, so a
command line starts (and answers Ctrl-C, terdit_common.entry) before anything heavy loads.
`from terdit import TerDiT` and `terdit.TerDiT` work as with eager imports."""
from __future__ import annotations

import importlib
import sys
from typing import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable, Callable]:
    """(__getattr__, __dir__) for `package` whose public names are `exports` ({name: module
    relative to the package, e.g. ".model"}); a name is imported once and then cached."""
    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
