"""Reading what a user gives us (docs/design.md section 9): every input is checked before it is
read, and every failure is one UserError (or the caller's subclass) naming the flag and the
file, the rule and the fix.

- `input_file`: a regular file (a symbolic link to one is fine) of a bounded size. A missing
  path, a directory, a FIFO or a device (reading one would block or never end) and an oversized
  file are each one line.
- `read_json_file`: a bounded JSON file; syntax, encoding and nesting errors name the file.
- `.npy` / `.npz`: the headers (shape, dtype, declared sizes) are read and checked against
  limits.MAX_ARRAY_BYTES, the machine's memory and the file's real size before any data is
  loaded; arrays of Python objects (which would need pickle) are refused.
"""
from __future__ import annotations

import json
import os
import stat
import zipfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .errors import UserError
from .files import file_kind
from .limits import MAX_JSON_BYTES, check_array_bytes, short

def _where(path, flag: str) -> str:
    return f"{flag} {path}" if flag else str(path)


def _tail(fix: str) -> str:
    return f"; {fix}" if fix else ""


def input_file(path: str | os.PathLike, flag: str = "", fix: str = "",
               max_bytes: Optional[int] = None, limit_name: str = "",
               error: type[UserError] = UserError) -> Path:
    """`path` if it is a regular file of at most `max_bytes` (the limit named `limit_name`),
    else `error`: "FLAG PATH: what is wrong; FIX"."""
    if not isinstance(path, (str, os.PathLike)):
        raise error(f"{flag or 'path'}={short(path)}: expected a file path{_tail(fix)}")
    path = Path(path)
    where = _where(path, flag)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise error(f"{where}: file not found{_tail(fix)}") from None
    except OSError as err:
        raise error(f"{where}: cannot read it ({err.strerror or err}){_tail(fix)}") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{where}: not a regular file ({file_kind(st.st_mode)}){_tail(fix)}")
    if max_bytes is not None and st.st_size > max_bytes:
        limit = f" ({limit_name})" if limit_name else ""
        raise error(f"{where}: {st.st_size} bytes, more than the limit of {max_bytes} "
                    f"bytes{limit}{_tail(fix)}")
    return path


def read_bytes(path: str | os.PathLike, flag: str = "", fix: str = "",
               max_bytes: int = MAX_JSON_BYTES, limit_name: str = "MAX_JSON_BYTES",
               error: type[UserError] = UserError) -> bytes:
    """The content of a bounded input file (`input_file`'s rules)."""
    path = input_file(path, flag, fix, max_bytes, limit_name, error)
    try:
        with open(path, "rb") as f:
            return f.read(max_bytes + 1)
    except OSError as err:
        raise error(f"{_where(path, flag)}: cannot read it ({err.strerror or err})"
                    f"{_tail(fix)}") from None


def parse_json(data: bytes | str, where: str, fix: str = "",
               error: type[UserError] = UserError) -> Any:
    """JSON text with every failure one `error` naming `where`: encoding, syntax, integers of
    thousands of digits, nesting too deep to parse."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return json.loads(text)
    except UnicodeDecodeError as err:
        raise error(f"{where}: not UTF-8 text (byte {err.start}){_tail(fix)}") from None
    except json.JSONDecodeError as err:
        raise error(f"{where}: not valid JSON ({err.msg} at line {err.lineno} column "
                    f"{err.colno}){_tail(fix)}") from None
    except (ValueError, RecursionError) as err:
        why = " ".join(str(err).split())[:80] or type(err).__name__
        raise error(f"{where}: cannot be read as JSON ({why}){_tail(fix)}") from None


def read_json_file(path: str | os.PathLike, flag: str = "", fix: str = "",
                   max_bytes: int = MAX_JSON_BYTES, error: type[UserError] = UserError) -> Any:
    """A JSON file of at most `max_bytes` (`input_file` + `parse_json`)."""
    data = read_bytes(path, flag, fix, max_bytes, "MAX_JSON_BYTES" if max_bytes ==
                      MAX_JSON_BYTES else "", error)
    return parse_json(data, _where(path, flag), fix, error)


# ---- .npy and .npz ------------------------------------------------------------------------

def npy_header(f, where: str, error: type[UserError] = UserError
               ) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, bytes of data) declared by the .npy header at the start of stream `f`,
    read without reading the data and bounded by limits.check_array_bytes."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"format version {version[0]}.{version[1]} (1.0 and 2.0 are read)")
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read(f)
    except (ValueError, EOFError, SyntaxError, TypeError) as err:
        raise error(f"{where}: not an .npy array (its header: "
                    f"{' '.join(str(err).split())[:120]}); the file may be truncated or of "
                    f"another kind") from None
    if dtype.hasobject:
        raise error(f"{where}: holds Python objects (dtype {dtype}), which are never loaded "
                    f"(that would run pickle); save a numeric array")
    if any(not isinstance(d, int) or d < 0 for d in shape):
        raise error(f"{where}: its header declares shape {shape}; the file is damaged")
    return tuple(shape), dtype, check_array_bytes(where, shape, dtype.itemsize, error)


def _check_kind(where: str, dtype: np.dtype, kinds: str, fix: str,
                error: type[UserError]) -> None:
    names = {"f": "float", "i": "integer", "u": "unsigned integer", "b": "boolean"}
    if dtype.kind not in kinds:
        want = " or ".join(names.get(k, k) for k in kinds)
        raise error(f"{where}: dtype {dtype}, expected a {want} array{_tail(fix)}")


def npy_file_header(path: str | os.PathLike, flag: str = "", fix: str = "",
                    kinds: Optional[str] = None, error: type[UserError] = UserError
                    ) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of an .npy file, checked (header, dtype kind in `kinds`, size, data not
    truncated) without reading its data."""
    path = input_file(path, flag, fix, error=error)
    where = _where(path, flag)
    with open(path, "rb") as f:
        shape, dtype, nbytes = npy_header(f, where, error)
        offset = f.tell()
    if kinds is not None:
        _check_kind(where, dtype, kinds, fix, error)
    size = path.stat().st_size
    if size < offset + nbytes:
        raise error(f"{where}: its header declares {nbytes} bytes of data, the file holds "
                    f"{size - offset}; it is truncated")
    return shape, dtype


def read_npy(path: str | os.PathLike, flag: str = "", fix: str = "",
             shape: Optional[tuple] = None, kinds: str = "f",
             error: type[UserError] = UserError) -> np.ndarray:
    """An .npy array whose header is checked first (`npy_file_header`, and `shape` when given);
    never unpickles."""
    found, _ = npy_file_header(path, flag, fix, kinds, error)
    if shape is not None and found != tuple(shape):
        raise error(f"{flag or path} has shape {found}, expected {tuple(shape)} ({path})"
                    f"{_tail(fix)}")
    return _load(path, flag, lambda: np.load(path, allow_pickle=False), error)


def npz_headers(path: str | os.PathLike, flag: str = "", fix: str = "",
                error: type[UserError] = UserError) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{name: (shape, dtype)} of every array of an .npz, from the member headers, without
    reading data: each member's declared size must hold exactly the data its header declares
    (a truncated or doctored archive is refused unread)."""
    path = input_file(path, flag, fix, error=error)
    where = _where(path, flag)
    heads = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                name = info.filename[:-4]
                with zf.open(info) as f:
                    shape, dtype, nbytes = npy_header(f, f"{where}: {name}", error)
                    offset = f.tell()
                if info.file_size != offset + nbytes:
                    raise error(f"{where}: {name}: its header declares {nbytes} bytes of data, "
                                f"the archive declares {info.file_size - offset}; the file is "
                                f"damaged")
                heads[name] = (shape, dtype)
    except UserError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError,
            NotImplementedError) as err:
        raise error(f"{where}: not a readable .npz ({type(err).__name__}: "
                    f"{' '.join(str(err).split())[:120]}); the file may be truncated") from None
    return heads


def read_npz(path: str | os.PathLike, names: tuple[str, ...], flag: str = "",
             error: type[UserError] = UserError) -> dict[str, np.ndarray]:
    """Arrays `names` of an .npz whose headers `npz_headers` checked (never unpickles)."""
    def load():
        with np.load(path, allow_pickle=False) as z:
            return {name: z[name] for name in names}
    return _load(path, flag, load, error)


def _load(path, flag: str, load, error: type[UserError]):
    try:
        return load()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as err:
        raise error(f"{_where(path, flag)}: cannot read the arrays ({type(err).__name__}: "
                    f"{' '.join(str(err).split())[:120]}); the file may be truncated or "
                    f"damaged") from None
