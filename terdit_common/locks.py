"""One writer per output (docs/design.md section 9).

- `output_lock(lock_file)`: an advisory lock (flock) recording the owner's pid and host. The
  kernel drops it when the owner dies, so a lock left by a killed run is taken over (with a
  message); a live owner is a clear error. The lock file is ours alone (a link, a hard link or a
  file holding anything but our record is refused, never truncated), and it is removed on the
  way out, with the directories created for it that stayed empty.
- `file_output(path)`: the lock of a single-file output (`.NAME.lock` beside it), and the
  temporaries a stopped writer of it left removed.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

from .errors import UserError
from .files import current_umask, open_nofollow, os_error_message, remove_stale_temps_of

LOCK_FORMAT = "terdit-lock"                # the record a lock file of ours holds


@contextlib.contextmanager
def output_lock(lock_file: str | os.PathLike, what: str,
                log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> Iterator[Path]:
    """Hold an exclusive advisory lock on `lock_file` (created if needed) for the block. A lock
    held by a live process is a UserError naming its pid and host; one left by a dead process is
    taken over with a message. `what` names the protected output in messages.

    The lock file is ours alone: a symbolic link, a file with several names (a hard link) or a
    file holding anything but a lock record of ours is refused, never truncated. On the way out
    the lock file is removed while it is still held, and so are the directories this call
    created for it when nothing else was written into them: a refused or interrupted run leaves
    nothing behind."""
    lock_file = Path(lock_file)
    created = [d for d in [lock_file.parent, *lock_file.parent.parents] if not d.exists()]
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        fd = _open_lock(lock_file, what)
    except UserError as err:
        _remove_empty(created)
        raise UserError(f"{what}: cannot take the lock: {err}") from None
    except OSError as err:
        _remove_empty(created)
        raise UserError(f"{what}: cannot create the lock file: "
                        f"{os_error_message(err, lock_file)}") from None
    try:
        previous = _read_owner(fd)
        if previous != "unknown owner":
            log(f"note: {what}: taking over the lock of a run that ended without releasing it "
                f"({previous})")
        record = {"format": LOCK_FORMAT, "pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        yield lock_file
    finally:
        if _same_file(fd, lock_file):
            with contextlib.suppress(FileNotFoundError):
                lock_file.unlink()                 # still held: no other writer is inside
        os.close(fd)                               # releases the flock
        _remove_empty(created)


def _open_lock(lock_file: Path, what: str) -> int:
    """An fd of `lock_file` holding its flock, checked to be a lock file of ours."""
    for _ in range(100):
        fd = open_nofollow(lock_file, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
        try:
            links = os.fstat(fd).st_nlink
            if links > 1:
                raise UserError(f"{lock_file}: has {links} names (a hard link to another file); "
                                f"this tool writes only its own lock file there: remove it")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    raise
                raise UserError(f"{what} is being written by another process "
                                f"({_read_owner(fd)}); wait for it to finish, stop it, or "
                                f"choose another output") from None
            if not _same_file(fd, lock_file):      # its owner removed it as we opened it
                os.close(fd)
                continue
            size = os.fstat(fd).st_size
            if size and _read_owner(fd) == "unknown owner":
                raise UserError(f"{lock_file}: holds {size} bytes that are not a lock record of "
                                f"this tool; we never overwrite a file we did not write: move "
                                f"it away")
            return fd
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
    raise UserError(f"{what}: the lock file {lock_file} keeps being replaced; is another run "
                    f"starting and stopping there?")


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.lstat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _remove_empty(directories: list[Path]) -> None:
    """rmdir each of `directories` (deepest first) that is empty: ones this run created."""
    for d in directories:
        with contextlib.suppress(OSError):
            d.rmdir()


@contextlib.contextmanager
def file_output(path: str | os.PathLike, flag: str) -> Iterator[Path]:
    """Hold the lock of the single output `path` (`.NAME.lock` beside it, one writer at a time)
    and remove the temporaries a stopped writer of `path` left beside it."""
    path = Path(path)
    with output_lock(path.parent / f".{path.name}.lock", f"{flag} {path}"):
        for p in remove_stale_temps_of(path):
            print(f"note: removed {p}, left by a run that was stopped", file=sys.stderr)
        yield path


def _read_owner(fd: int) -> str:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (ValueError, UnicodeDecodeError, OSError):
        data = None
    if not isinstance(data, dict) or data.get("format") != LOCK_FORMAT:
        return "unknown owner"                # not a record of ours (a user's JSON file too)
    return f"pid {data.get('pid')} on host {data.get('host')}, started {data.get('started')}"
