"""Output files (docs/design.md section 9).

Files that are never half-written, content hashes, and one writer per output directory.

- `atomic_write(path, writer)`: the writer fills `.NAME.RANDOM.tmp` beside `path`, which is then
  renamed over it, so a reader sees the old file or the new one, never a torn one.
- `atomic_directory(path)`: the same for a whole directory.
- `output_lock(lock_file)`: an advisory lock (flock) recording the owner's pid and host. The
  kernel drops it when the owner dies, so a lock left by a killed run is taken over (with a
  message); a live owner is a clear error.
- `remove_stale_temps(dir)` / `remove_stale_temps_of(path)`: the temporary names above, left by
  a run killed mid-write, are removed by the next run that holds the output's lock.

What we write we may remove; what we did not write we never touch:
- files are created without following symbolic links (`open_nofollow`), and a symbolic link
  where we would create a file or directory is refused;
- `check_disjoint`: an output that is, contains or lies inside an input is refused;
- `foreign_entries` / `atomic_directory(..., ours=)`: an existing output is replaced or cleared
  only when everything in it is named by the writer's own format.

Inputs are read through terdit_common.inputs.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from .errors import UserError

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
    place with the mode open() would have given it. A symbolic link at `path` is refused (it
    is not ours to replace)."""
    path = Path(path)
    if path.is_symlink():
        raise UserError(f"{path}: is a symbolic link where this tool writes its own file; we "
                        f"never replace links: remove it")
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
def atomic_directory(path: str | os.PathLike, overwrite: bool = False,
                     ours: Optional[Callable[[str], bool]] = None,
                     flag: str = "output") -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path`. Refuses an
    existing `path` unless `overwrite`, a symbolic link at `path`, and (when `ours` names the
    writer's files) an existing `path` holding anything `ours` does not name; on any error the
    temporary directory is removed and `path` is left as it was."""
    path = Path(path)
    check_replaceable_dir(path, overwrite, ours, flag)
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


def check_replaceable_dir(path: Path, overwrite: bool, ours: Optional[Callable[[str], bool]],
                          flag: str) -> None:
    """The rule of `atomic_directory`, callable before any work: `path` is absent, or (with
    `overwrite`) a real directory holding only what `ours` names."""
    if path.is_symlink():
        raise UserError(f"{flag} {path}: is a symbolic link; we replace only directories we "
                        f"wrote: remove the link or choose another path")
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: exists and is not a directory; choose another path")
    if path.exists() and not overwrite:
        raise UserError(f"{flag} {path} already exists; pass --overwrite to replace it")
    if path.exists() and ours is not None:
        refuse_foreign(path, ours, flag, "--overwrite replaces only what this tool wrote")


# what this module's writers name their temporaries: `.NAME.RANDOM.tmp` / `.old` (RANDOM: the
# 8 characters tempfile adds); nothing else is taken for one of ours (a user's `.notes.old` is not)
_TEMP = r"\.{name}\.[a-z0-9_]{{8}}\.(?:tmp|old)"
_ANY_TEMP = re.compile(_TEMP.format(name=".+"))


def is_temp_name(name: str) -> bool:
    """A temporary name of this module's writers."""
    return bool(_ANY_TEMP.fullmatch(name))


def remove_stale_temps(*directories: str | os.PathLike) -> list[Path]:
    """Remove the temporary files / directories this module's writers leave in `directories`
    (not below them) when a run is killed mid-write. Call it only while holding the output's
    lock, so no live writer owns them. Returns what was removed."""
    removed = []
    for directory in map(Path, directories):
        if not directory.is_dir() or directory.is_symlink():
            continue
        removed += remove_all(p for p in directory.iterdir() if is_temp_name(p.name))
    return removed


def remove_stale_temps_of(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries this module's writers left beside `path` (exactly its own
    `.NAME.RANDOM.tmp` / `.old`, never another output's in the same directory).
    Call it only while holding `path`'s lock."""
    path = Path(path)
    pattern = re.compile(_TEMP.format(name=re.escape(path.name)))
    if not path.parent.is_dir():
        return []
    return remove_all(p for p in path.parent.iterdir() if pattern.fullmatch(p.name))


def remove_all(paths: Iterable[Path]) -> list[Path]:
    """Remove each of `paths` (a directory with its content; links themselves); returns them."""
    removed = []
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        removed.append(p)
    return removed


def foreign_entries(directory: str | os.PathLike, ours: Callable[[str], bool]) -> list[Path]:
    """The entries of `directory` that its writer's format does not name (`ours(name)` false;
    temporaries of this module's writers are ours). A missing directory has none."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if not ours(p.name) and not is_temp_name(p.name))


def refuse_foreign(directory: str | os.PathLike, ours: Callable[[str], bool], flag: str,
                   rule: str) -> None:
    """UserError naming the first entry of `directory` that `ours` does not name: we remove or
    replace only what our own format lists."""
    foreign = foreign_entries(directory, ours)
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise UserError(f"{flag} {directory}: holds {foreign[0].name}{more}, which this tool did "
                        f"not write; {rule}: move it away or choose another {flag}")


def check_disjoint(output: str | os.PathLike, flag: str,
                   inputs: dict[str, Optional[str | os.PathLike]]) -> None:
    """Refuse an output that is, contains or lies inside one of `inputs` ({flag: path}):
    writing it would replace or change what it reads."""
    out = Path(os.path.realpath(output))
    for in_flag, value in inputs.items():
        if value is None:
            continue
        src = Path(os.path.realpath(value))
        if out == src:
            how = "is"
        elif src.is_relative_to(out):
            how = "contains"
        elif out.is_relative_to(src):
            how = "lies inside"
        else:
            continue
        raise UserError(f"{flag} {output}: {how} the input {in_flag} {value}; writing it would "
                        f"change the input: choose an output outside {value}")


_KINDS = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
          (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def file_kind(mode: int) -> str:
    """What a file of st_mode `mode` is, in words ("a FIFO (named pipe)")."""
    return next((name for test, name in _KINDS if test(mode)), "not a plain file")


def open_nofollow(path: str | os.PathLike, flags: int, mode: int = 0o666) -> int:
    """os.open that never follows a symbolic link at `path` and opens only a regular file (a
    link, FIFO, device or directory there is a UserError naming it): a file we create or append
    to is always our own."""
    path = Path(path)
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, mode)
    except OSError as err:
        if err.errno not in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            raise
        fd = None
    if fd is not None and stat.S_ISREG(os.fstat(fd).st_mode):
        os.set_blocking(fd, True)
        return fd
    if fd is not None:
        os.close(fd)
    raise UserError(f"{path}: is {file_kind(os.lstat(path).st_mode)} where this tool writes its "
                    f"own file; we never write through it: remove it")


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append to our own log file (created if needed; never through a symbolic link)."""
    fd = open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666 & ~_umask())
    with os.fdopen(fd, "a") as f:
        f.write(text)


@contextlib.contextmanager
def output_lock(lock_file: str | os.PathLike, what: str,
                log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> Iterator[Path]:
    """Hold an exclusive advisory lock on `lock_file` (created if needed) for the block. A lock
    held by a live process is a UserError naming its pid and host; one left by a dead process is
    taken over with a message. `what` names the protected output in messages."""
    lock_file = Path(lock_file)
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        fd = open_nofollow(lock_file, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    except UserError as err:
        raise UserError(f"{what}: cannot take the lock: {err}") from None
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
    """One line for an OSError (disk full, read-only, permissions ...) naming the path."""
    where = path or err.filename or "output"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device while writing {where}; free disk space or choose "
                f"another output directory, then run the same command again to resume")
    if err.errno == errno.EROFS:
        return f"{where} is on a read-only filesystem; choose another output directory"
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"{where}: permission denied; check its permissions or choose another path"
    if err.errno == errno.ENAMETOOLONG:
        return f"{where}: file name too long; choose a shorter path"
    return f"{where}: {err.strerror or err}"
