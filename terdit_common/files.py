"""Files that are never half-written, content hashes, and one writer per output directory.

- `atomic_write(path, writer)`: the writer fills `.NAME.RANDOM.tmp` beside `path`, which is then
  renamed over it, so a reader sees the old file or the new one, never a torn one.
- `atomic_directory(path)`: the same for a whole directory.
- `output_lock(lock_file)`: an advisory lock (flock) recording the owner's pid and host. The
  kernel drops it when the owner dies, so a lock left by a killed run is taken over (with a
  message); a live owner is a clear error.
- `remove_stale_temps(dir)`: the temporary names above, left by a run killed mid-rename, are
  removed by the next run that holds the directory's lock.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from .errors import UserError

TEMP_SUFFIXES = (".tmp", ".old", ".partial")
LOCK_NAME = ".terdit.lock"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a file, streamed (constant memory for files of any size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """writer(tmp) fills a temporary file beside `path`; it is flushed to disk and renamed into
    place with the mode open() would have given it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())            # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def atomic_write_json(path: str | os.PathLike, obj, sort_keys: bool = False) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path`. Refuses an
    existing `path` unless `overwrite`; on any error the temporary directory is removed and
    `path` is left as it was."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} exists and is not a directory; choose another output path")
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())                 # mkdtemp makes 0700
    try:
        yield tmp
        for f in tmp.rglob("*"):                    # writers that go through mkstemp (safetensors)
            if f.is_file():                          # leave 0600 files: give them the umask's mode
                os.chmod(f, 0o666 & ~_umask())
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.rmdir(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_temp_name(name: str) -> bool:
    """A temporary name of this module's writers (`.NAME.RANDOM.tmp`, `.NAME.RANDOM.old`,
    `.NAME.partial`)."""
    return name.startswith(".") and name.endswith(TEMP_SUFFIXES) and name != LOCK_NAME


def remove_stale_temps(*directories: str | os.PathLike) -> list[Path]:
    """Remove the temporary files / directories this module's writers leave in `directories`
    (not below them) when a run is killed mid-write. Call it only while holding the output's
    lock, so no live writer owns them. Returns what was removed."""
    removed = []
    for directory in map(Path, directories):
        if not directory.is_dir():
            continue
        for p in directory.iterdir():
            if not is_temp_name(p.name):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            removed.append(p)
    return removed


@contextlib.contextmanager
def output_lock(lock_file: str | os.PathLike, what: str,
                log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> Iterator[Path]:
    """Hold an exclusive advisory lock on `lock_file` (created if needed) for the block. A lock
    held by a live process is a UserError naming its pid and host; one left by a dead process is
    taken over with a message. `what` names the protected output in messages."""
    lock_file = Path(lock_file)
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    except OSError as err:
        raise UserError(f"{what}: cannot create the lock file: "
                        f"{os_error_message(err, lock_file)}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            owner = _read_owner(fd)
            raise UserError(f"{what} is being written by another process ({owner}); wait for "
                            f"it to finish, stop it, or choose another output") from None
        previous = _read_owner(fd)
        if previous != "unknown owner":
            log(f"note: {what}: taking over the lock of a run that ended without releasing it "
                f"({previous})")
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        try:
            yield lock_file
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)                                  # releases the flock


def _read_owner(fd: int) -> str:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (ValueError, UnicodeDecodeError, OSError):
        data = None
    if not isinstance(data, dict):
        return "unknown owner"
    return f"pid {data.get('pid')} on host {data.get('host')}, started {data.get('started')}"


def check_writable_dir(path: str | os.PathLike, flag: str) -> Path:
    """`path` as an output directory: refuse an existing non-directory, a component name the
    filesystem cannot hold, or a directory we cannot write, with one line each."""
    path = Path(path)
    for part in path.parts:
        if len(os.fsencode(part)) > 255:
            raise UserError(f"{flag} {str(path)[:80]}...: a path component is "
                            f"{len(os.fsencode(part))} bytes long, over the 255-byte limit of "
                            f"file names; choose a shorter name")
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: exists and is not a directory; choose another path")
    probe_dir = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
    if not os.access(probe_dir, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {probe_dir} is not writable; choose another path")
    return path


def os_error_message(err: OSError, path: Optional[os.PathLike | str] = None) -> str:
    """One line for an OSError met while writing outputs (disk full, read-only, ...)."""
    where = path or err.filename or "output"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device while writing {where}; free disk space or choose "
                f"another output directory, then run the same command again to resume")
    if err.errno == errno.EROFS:
        return f"{where} is on a read-only filesystem; choose another output directory"
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"{where}: permission denied; choose an output directory you can write"
    if err.errno == errno.ENAMETOOLONG:
        return f"{where}: file name too long; choose a shorter output path"
    return f"{where}: {err.strerror or err}"
