"""The case tables of the reliability tests (tests/test_reliability_*.py): setups that build a
case's directory, and the check every refused case passes.

A setup is `setup(tmp, base)`: `tmp` is the case's own directory ({T} in its argv), `base` the
module's shared fixtures ({B}, only read). Paths given to the factories are relative to `tmp`."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from tests.helpers import assert_one_error_line, run_cli_case, tree_state

PRECIOUS = b"the user's precious file\n"


def copy(*names):
    """Copies of the shared fixtures `names` (links copied as links)."""
    def setup(tmp, base):
        for name in names:
            if (base / name).is_dir():
                shutil.copytree(base / name, tmp / name, symlinks=True)
            else:
                shutil.copy2(base / name, tmp / name)
    return setup


def write(rel, data: bytes = b"x"):
    def setup(tmp, base):
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(data)
    return setup


def npy(rel, array):
    def setup(tmp, base):
        np.save(tmp / rel, array)
    return setup


def mkdir(rel):
    def setup(tmp, base):
        (tmp / rel).mkdir(parents=True, exist_ok=True)
    return setup


def fifo(rel):
    """A FIFO at `rel` (replacing what is there): a reader that opens it would block."""
    def setup(tmp, base):
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(path):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        os.mkfifo(path)
    return setup


def remove(*rels):
    def setup(tmp, base):
        for rel in rels:
            path = tmp / rel
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return setup


def symlink(rel, target_rel, content=PRECIOUS):
    """A symbolic link at `rel` to the user's own file (or directory) `target_rel`."""
    def setup(tmp, base):
        target = tmp / target_rel
        if not target.exists():
            target.write_bytes(content)
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, tmp / rel)
    return setup


def hard_link(rel, target_rel="precious.txt"):
    """A second name at `rel` for the user's own file `target_rel`."""
    def setup(tmp, base):
        (tmp / target_rel).write_bytes(PRECIOUS)
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        os.link(tmp / target_rel, tmp / rel)
    return setup


def flip(rel):
    """One bit of the file's middle byte changed."""
    def setup(tmp, base):
        data = bytearray((tmp / rel).read_bytes())
        data[len(data) // 2] ^= 0x40
        (tmp / rel).write_bytes(bytes(data))
    return setup


def edit_json(rel, edit):
    def setup(tmp, base):
        path = tmp / rel
        doc = json.loads(path.read_text())
        edit(doc)
        path.write_text(json.dumps(doc))
    return setup


def other_run(rel, edit):
    """samples.json at `rel` edited by `edit` and sealed again: the record of another run (a run
    with other settings), not a damaged one."""
    def setup(tmp, base):
        from terdit_common.manifest import seal
        path = tmp / rel
        doc = json.loads(path.read_text())
        doc.pop("record_sha256", None)
        edit(doc)
        path.write_text(json.dumps(seal(doc, "record_sha256")))
    return setup


def assert_refused(name, argv, pattern, work: Path, base: Path, capsys) -> str:
    """Run the case's command line in process: exit code 2, one `error:` line matching
    `pattern` (the last line), no traceback; the case's tree and the shared fixtures are exactly
    as they were (nothing of the user's changed, nothing added). Returns the error line."""
    before, base_before = tree_state(work), tree_state(base)
    code, err = run_cli_case(argv, work, base, capsys)
    line = assert_one_error_line(name, code, err, pattern)
    assert tree_state(work) == before, f"{name}: the case changed or left files"
    assert tree_state(base) == base_before, f"{name}: the case changed the shared fixtures"
    return line


def assert_api_refused(name, call, pattern, base: Path) -> None:
    """`call(base)` raises runtime.UserError (a ValueError) with one line matching `pattern`
    and changes none of the shared fixtures."""
    import re

    import pytest

    from runtime import UserError
    before = tree_state(base)
    with pytest.raises(UserError) as info:
        call(base)
    assert isinstance(info.value, ValueError)
    assert re.search(pattern, str(info.value)), (name, str(info.value))
    assert "\n" not in str(info.value)
    assert tree_state(base) == before
