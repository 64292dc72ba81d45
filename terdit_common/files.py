"""Output files (docs/design.md section 9).

Files that are never half-written, content hashes, and one writer per output directory.

- `atomic_write(path, writer)`: the writer fills `.NAME.terdit-RANDOM.tmp` beside `path`, which
  is then renamed over it, so a reader sees the old file or the new one, never a torn one.
- `atomic_directory(path)`: the same for a whole directory.
- one writer per output: terdit_common.locks (`output_lock`, `file_output`).
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
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from .errors import UserError

LOCK_NAME = ".terdit.lock"
TEMP_MARK = "terdit-"                  # in every temporary name of ours (`_TEMP` below)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a file, streamed (constant memory for files of any size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def current_umask() -> int:
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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{TEMP_MARK}", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())            # mkstemp makes 0600
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
def atomic_directory(path: str | os.PathLike, overwrite: bool,
                     ours: Callable[[str], bool],
                     flag: str = "output",
                     dirs: Callable[[str], bool] = lambda name: False) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path`. Refuses an
    existing `path` unless `overwrite`, a symbolic link at `path`, and an existing `path`
    holding anything `ours` does not name (as files; directories where `dirs` names them); on
    any error the temporary directory is removed and `path` is left as it was."""
    path = Path(path)
    check_replaceable_dir(path, overwrite, ours, flag, dirs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{TEMP_MARK}", suffix=".tmp",
                                dir=path.parent))
    os.chmod(tmp, 0o777 & ~current_umask())                 # mkdtemp makes 0700
    try:
        yield tmp
        for f in tmp.rglob("*"):                    # writers that go through mkstemp (safetensors)
            if f.is_file():                          # leave 0600 files: give them the umask's mode
                os.chmod(f, 0o666 & ~current_umask())
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.{TEMP_MARK}", suffix=".old",
                                        dir=path.parent))
            os.rmdir(old)
            os.replace(path, old)
            os.replace(tmp, path)
            # what appeared in `path` since it was checked is not ours: it moves into the new
            # directory instead of going with the old one
            for entry in foreign_entries(old, ours, dirs):
                if not os.path.lexists(path / entry.name):
                    os.replace(entry, path / entry.name)
            if foreign_entries(old, ours, dirs):
                raise UserError(f"{flag} {path}: while it was replaced, files this tool did not "
                                f"write appeared in it under its own names; they are kept in "
                                f"{old}: move them away")
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_replaceable_dir(path: Path, overwrite: bool, ours: Callable[[str], bool],
                          flag: str, dirs: Callable[[str], bool] = lambda name: False) -> None:
    """The rule of `atomic_directory`, callable before any work: `path` is absent, or (with
    `overwrite`) a real directory holding only what `ours` names, as files (directories where
    `dirs` names them)."""
    if path.is_symlink():
        raise UserError(f"{flag} {path}: is a symbolic link; we replace only directories we "
                        f"wrote: remove the link or choose another path")
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: exists and is not a directory; choose another path")
    if path.exists() and not overwrite:
        raise UserError(f"{flag} {path} already exists; pass --overwrite to replace it")
    if path.exists():
        refuse_foreign(path, ours, flag, "--overwrite replaces only what this tool wrote", dirs)


# what this module's writers name their temporaries: `.NAME.terdit-RANDOM.tmp` / `.old` (RANDOM:
# the 8 characters tempfile adds); nothing else is taken for one of ours (a user's `.notes.old`
# or `.notes.20240101.old` is not)
_TEMP = r"\.{name}\.terdit-[a-z0-9_]{{8}}\.(?:tmp|old)"
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
    `.NAME.terdit-RANDOM.tmp` / `.old`, never another output's in the same directory).
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


def foreign_entries(directory: str | os.PathLike, ours: Callable[[str], bool],
                    dirs: Callable[[str], bool] = lambda name: False) -> list[Path]:
    """The entries of `directory` that its writer's format does not name: `ours(name)` false, or
    of another kind than the format writes (a symbolic link; a directory unless `dirs(name)`; a
    FIFO, socket or device). Temporaries of this module's writers are ours. A missing directory
    has none."""
    directory = Path(directory)
    if not directory.is_dir():
        return []

    def is_ours(p: Path) -> bool:
        if is_temp_name(p.name) or p.name == LOCK_NAME or (
                p.name.startswith(".") and p.name.endswith(".lock")
                and ours(p.name[1:-len(".lock")])):
            return True            # a temporary, or a lock (output_lock checks what it is)
        if not ours(p.name):
            return False
        mode = p.lstat().st_mode
        return stat.S_ISDIR(mode) if dirs(p.name) else stat.S_ISREG(mode)
    return sorted(p for p in directory.iterdir() if not is_ours(p))


def refuse_foreign(directory: str | os.PathLike, ours: Callable[[str], bool], flag: str,
                   rule: str, dirs: Callable[[str], bool] = lambda name: False) -> None:
    """UserError naming the first entry of `directory` that is not one of its writer's own
    (`foreign_entries`): we remove or replace only what our own format lists, as it writes it."""
    foreign = foreign_entries(directory, ours, dirs)
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        first = foreign[0]
        kind = "" if not ours(first.name) or is_temp_name(first.name) else \
            f" ({file_kind(first.lstat().st_mode)} where this tool writes " \
            f"{'a directory' if dirs(first.name) else 'a file'})"
        raise UserError(f"{flag} {directory}: holds {first.name}{kind}{more}, which this tool "
                        f"did not write; {rule}: move it away or choose another {flag}")


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
          (stat.S_ISREG, "a regular file"),
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
    fd = open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666 & ~current_umask())
    with os.fdopen(fd, "a") as f:
        f.write(text)


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
    if not probe_dir.is_dir():
        raise UserError(f"{flag} {path}: {probe_dir} is {file_kind(probe_dir.lstat().st_mode)}, "
                        f"not a directory; choose another path")
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
