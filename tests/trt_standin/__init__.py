"""A stand-in `tensorrt` module per TensorRT release (10.16 and 11.1), for tests on machines
without TensorRT (all of ours: docs/design.md section 5).

What it proves: our calls exist with these names in the real bindings of that release (every
other name raises AttributeError, surface.py), they are made in an order and with arguments that
the stand-in's checks accept (profile vs. input shapes, I/O shapes and addresses before execution,
a 0-d input set as 0-d), the ONNX parser's node -> plugin mapping as docs/design.md section 5 describes
it for 10.15+ / 11.x, and that the plugin library is one TensorRT can load: load_library dlopens
it and registers the creators its getCreators exports (library.py). What it does not prove:
anything TensorRT itself does (building, tactic selection, the plugin's kernels, numerics); the
stand-in engine runs the ONNX file in ONNX Runtime.

    trt = make_tensorrt("11.1")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
"""
from __future__ import annotations

import types

from . import engine, network
from .engine import HostTransfer
from .surface import SURFACE, VERSIONS, enum_class, names

__all__ = ["HostTransfer", "VERSIONS", "make_tensorrt", "stand_in_classes"]

FULL_VERSION = {"10.16": "10.16.0.72", "11.1": "11.1.0.106"}
ENUMS = ("BuilderFlag", "NetworkDefinitionCreationFlag", "DataType", "LayerType",
         "MemoryPoolType", "TensorIOMode", "PluginCapabilityType", "OnnxParserFlag")
_ENUM_BASES = {name: enum_class(name, " ".join(SURFACE[name])) for name in ENUMS}


def stand_in_classes() -> dict[str, type]:
    """The stand-in's unversioned classes by binding name."""
    classes = {name: cls for module in (network, engine) for name, cls in vars(module).items()
               if isinstance(cls, type) and issubclass(cls, network.StandIn) and name[0] != "_"
               and cls is not network.StandIn}
    return {**classes, **_ENUM_BASES}


def make_tensorrt(version: str, *, library_creators=None):
    """A fresh `tensorrt` stand-in for `version` ("10.16" or "11.1"). IPluginRegistry.load_library
    takes a real plugin library only (one that exports getCreators and setLoggerFinder) and
    registers the creators it exports; `library_creators` ((name, version, namespace) each), when
    given, is registered instead (a library with other creators)."""
    trt = types.ModuleType("tensorrt", f"stand-in for the TensorRT {version} Python bindings")
    classes = {}
    for name, base in stand_in_classes().items():
        classes[name] = type(name, (base,), {"_surface": names(version, name), "_trt": trt,
                                             "_version": version, "_trt_name": name,
                                             "__module__": "tensorrt"})
    module_names = names(version, "tensorrt")
    for name in module_names - {"__version__", "get_plugin_registry"}:
        setattr(trt, name, classes[name])
    trt.__version__ = FULL_VERSION[version]
    registry = classes["IPluginRegistry"]()
    trt.get_plugin_registry = lambda: registry
    trt._standin_classes = classes
    trt._library_creators = None if library_creators is None else tuple(library_creators)
    return trt
