"""What the stand-in's IPluginRegistry.load_library does with a file: dlopen it and read the
plugin creators it exports, as TensorRT's loadLibrary does, or say why it is no plugin library.

A plugin library exports `getCreators` (IPluginV3 creators) and `setLoggerFinder`, the two entry
points TensorRT looks up (plugins/ternaryMatMulPlugin/exports.map). `getCreators(int32_t&)`
returns an array of IPluginCreatorInterface pointers; each creator's kind, name, version and
namespace are read through its vtable, in the slot order of the TensorRT 10.16 and 11.1 headers
(Itanium C++ ABI, single inheritance):

    IVersionedInterface   0 getAPILanguage  1 getInterfaceInfo  2, 3 ~IVersionedInterface
    IPluginCreatorV3One   4 createPlugin  5 getFieldNames  6 getPluginName  7 getPluginVersion
                          8 getPluginNamespace

Only "PLUGIN CREATOR_V3ONE" creators (interface major 1) are taken: the stand-in models no other
kind. A library loaded here stays loaded (ctypes cannot dlclose) for the rest of the process.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

ENTRY_POINTS = ("getCreators", "setLoggerFinder")
CREATOR_KIND = b"PLUGIN CREATOR_V3ONE"
_GET_INTERFACE_INFO, _GET_NAME, _GET_VERSION, _GET_NAMESPACE = 1, 6, 7, 8


class NotAPluginLibrary(Exception):
    """The file cannot be loaded as a TensorRT plugin library; the message says why."""


class _InterfaceInfo(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_char_p), ("major", ctypes.c_int32), ("minor", ctypes.c_int32)]


def _virtual(obj: int, slot: int, restype):
    vtable = ctypes.cast(ctypes.c_void_p(obj), ctypes.POINTER(ctypes.POINTER(ctypes.c_void_p)))[0]
    return ctypes.CFUNCTYPE(restype, ctypes.c_void_p)(vtable[slot])(obj)


def read_creators(path: str | Path) -> list[tuple[str, str, str]]:
    """(name, version, namespace) of every creator the plugin library at `path` exports, or
    NotAPluginLibrary."""
    try:
        library = ctypes.CDLL(str(path))
    except OSError as e:
        raise NotAPluginLibrary(f"cannot dlopen {path}: {e}") from None
    missing = [name for name in ENTRY_POINTS if not hasattr(library, name)]
    if missing:
        raise NotAPluginLibrary(f"{path} does not export {', '.join(missing)}: not a plugin "
                                f"library")
    get_creators = library.getCreators
    get_creators.argtypes = [ctypes.POINTER(ctypes.c_int32)]
    get_creators.restype = ctypes.POINTER(ctypes.c_void_p)
    count = ctypes.c_int32(-1)
    array = get_creators(ctypes.byref(count))
    if not array or count.value < 1:
        raise NotAPluginLibrary(f"{path}: getCreators returned {count.value} creators")
    creators = []
    for i in range(count.value):
        obj = array[i]
        if not obj:
            raise NotAPluginLibrary(f"{path}: getCreators returned a null creator at {i}")
        info = _virtual(obj, _GET_INTERFACE_INFO, _InterfaceInfo)
        if info.kind != CREATOR_KIND or info.major != 1:
            raise NotAPluginLibrary(f"{path}: creator {i} is a {info.kind!r} version "
                                    f"{info.major}.{info.minor}; the stand-in models "
                                    f"{CREATOR_KIND.decode()!r} 1.x only")
        creators.append(tuple(_virtual(obj, slot, ctypes.c_char_p).decode()
                              for slot in (_GET_NAME, _GET_VERSION, _GET_NAMESPACE)))
    return creators
