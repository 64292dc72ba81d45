"""How runs end (issue 20, classes 5 and 6): never a traceback, nothing left behind.

- Ctrl-C (SIGINT) or SIGTERM while a command line is still loading its modules (torch, ONNX
  Runtime), parsing its flags or working ends with exit code 130 and one `interrupted:` line, for
  every entry point (terdit_common.entry); a closed standard output does not end a run
  (`... | head`).
- A run that is refused or interrupted before it wrote anything leaves no output directory and
  no lock; a run that finds a dead run's lock and temporaries takes the lock over and removes
  exactly those temporaries, and leaves no lock when it ends."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exporter import ExportOptions, export
from tests.helpers import pixel_checkpoint, run_cli_case, tree_state

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(log=lambda *_: None)
DEAD_LOCK = json.dumps({"format": "terdit-lock", "pid": 999999999, "host": "gone",
                        "started": "earlier", "command": "a run that was killed"}) + "\n"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("ends")
    pixel_checkpoint(root / "ck", n_layers=1)
    export(root / "ck", root / "onnx", ExportOptions(validate=False), **QUIET)
    (root / "lib.so").write_bytes(b"not a plugin")
    return root


# ---- class 5: interrupted while loading ---------------------------------------------------------

# Long jobs whose command lines load torch first (seconds), so a signal sent 0.15 s after the start
# lands while they load.
LOADING_TORCH = {
    "exporter": ["exporter", "{B}/ck", "-o", "{T}/o"],
    "train": ["terdit.train", "--model", "TerDiT-tiny", "--data", "latents", "--data-path",
              "{T}/none.npy", "--out", "{T}/run"],
    "evaluate": ["terdit.evaluate", "metrics", "--ref", "none", "--model", "{B}/ck",
                 "--num-images", "64", "--steps", "1000"],
}
# runtime loads in ~0.15 s: a signal lands while it loads, parses its flags or works
RUNTIME = {
    "sample": ["runtime", "sample", "--model", "{B}/onnx", "--out", "{T}/out", "--num", "64",
               "--steps", "1000", "--sampler", "ddpm", "--kernels", "function"],
    "build-engine": ["runtime", "build-engine", "{B}/onnx", "--plugin", "{B}/lib.so", "-o",
                     "{T}/m.plan"],
}
SIGNALS = {"ctrl-c": signal.SIGINT, "sigterm": signal.SIGTERM}


def _start(argv, work, base):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = [a.replace("{T}", str(work)).replace("{B}", str(base)) for a in argv]
    # a job started in the background (CI) inherits an ignored SIGINT: give Ctrl-C back
    return subprocess.Popen([sys.executable, "-m", *args], cwd=work, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _stop(argv, work, base, sig, after: float) -> tuple[int, str]:
    proc = _start(argv, work, base)
    time.sleep(after)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.parametrize("sig", list(SIGNALS))
@pytest.mark.parametrize("command", list(LOADING_TORCH))
def test_stopped_while_loading_is_one_line(command, sig, base, tmp_path):
    """While torch loads: exit code 130, one `interrupted:` line saying no work was done, no
    traceback, nothing written (the signal waits for the import to finish, so no half-imported
    module fails in an unrelated way)."""
    code, err = _stop(LOADING_TORCH[command], tmp_path, base, SIGNALS[sig], 0.15)
    assert code == 130, (code, err)
    assert err.strip().splitlines() == [
        "interrupted: stopped before any work; run the same command again"], err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("after", [0.1, 0.3, 0.6])
@pytest.mark.parametrize("sig", list(SIGNALS))
@pytest.mark.parametrize("command", list(RUNTIME))
def test_runtime_stopped_at_any_point_is_one_line(command, sig, after, base, tmp_path):
    """`runtime sample` / `build-engine` stopped while loading, parsing or working (build-engine
    also imports onnx and TensorRT later, with the signal held): exit code 130 and one
    `interrupted:` line, never a traceback or an abort; a build-engine that ended first (no
    TensorRT here) ends with its one error line."""
    code, err = _stop(RUNTIME[command], tmp_path, base, SIGNALS[sig], after)
    last = err.strip().splitlines()[-1]                # after progress and `TernaryMatMul:` lines
    ends = [line for line in err.splitlines() if line.startswith(("interrupted:", "error:"))]
    assert "Traceback" not in err and ends == [last], (code, err)
    assert (code == 130 and last.startswith("interrupted: ")) or (
        command == "build-engine" and code == 2 and last.startswith("error: ")), (code, err)


def test_a_closed_stdout_does_not_end_the_run(base, tmp_path):
    """`runtime sample ... | head -0`: the reader is gone before the run prints; every output is
    still written and the run ends with exit code 0, no traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime", "sample", "--model", str(base / "onnx"), "--out",
         str(tmp_path / "out"), "--num", "2", "--steps", "2", "--kernels", "function"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, err
    assert "Traceback" not in err and "error" not in err, err
    assert (tmp_path / "out" / "grid.png").is_file() and (tmp_path / "out" / "samples.npz").is_file()


@pytest.mark.parametrize("redirect", ["stdout-closed", "stderr-closed", "stdout-full"])
def test_closed_or_full_standard_streams_do_not_end_the_run(redirect, base, tmp_path):
    """`1>&-`, `2>&-` or `>/dev/full`: the run still writes every output and ends with 0."""
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "runtime", "sample", "--model", str(base / "onnx"), "--out",
            str(out), "--num", "2", "--steps", "2", "--kernels", "function"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if redirect == "stdout-full":
        with open("/dev/full", "w") as full:
            code = subprocess.run(argv, cwd=tmp_path, env=env, stdout=full,
                                  stderr=subprocess.DEVNULL, timeout=300).returncode
    else:
        closed = 1 if redirect == "stdout-closed" else 2
        code = subprocess.run(argv, cwd=tmp_path, env=env, timeout=300,
                              preexec_fn=lambda: os.close(closed)).returncode
    assert code == 0, redirect
    assert (out / "grid.png").is_file() and (out / "samples.npz").is_file()


def test_names_like_our_temporaries_are_not_ours(base, tmp_path, capsys):
    """A user's `.notes.20240101.old` or `.x.abcd1234.tmp` (our temporaries carry `terdit-`) in an
    output directory, or beside an export's output, survives the run."""
    out = tmp_path / "out"
    out.mkdir()
    mine = [out / ".notes.20240101.old", out / ".samples.json.abcd1234.tmp",
            tmp_path / ".o.backup01.old", tmp_path / ".o.abcd1234.tmp"]
    for p in mine:
        p.write_text("the user's")
    code, err = run_cli_case(["runtime", "sample", "--model", "{B}/onnx", "--out", "{T}/out",
                              "--num", "1", "--steps", "2", "--no-progress", "--overwrite"],
                             tmp_path, base, capsys)
    assert code == 0, err
    code, err = run_cli_case(["exporter", "{B}/ck", "-o", "{T}/o", "--no-validate"], tmp_path,
                             base, capsys)
    assert code == 0, err
    assert all(p.read_text() == "the user's" for p in mine)


def test_what_appears_during_an_overwrite_is_kept(tmp_path):
    """A file of the user's written into a directory while atomic_directory replaces it (after
    the check): it moves into the new directory instead of being deleted with the old one."""
    from terdit_common.files import atomic_directory
    out = tmp_path / "o"
    out.mkdir()
    (out / "a.txt").write_text("old")
    ours = {"a.txt"}.__contains__
    with atomic_directory(out, overwrite=True, ours=ours) as tmp:
        (tmp / "a.txt").write_text("new")
        (out / "notes.txt").write_text("the user's")          # after the check, before the swap
    assert (out / "a.txt").read_text() == "new" and (out / "notes.txt").read_text() == "the user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


# ---- class 6: nothing left behind -------------------------------------------------------------

def _interrupt_before_record(monkeypatch):
    """KeyboardInterrupt as runtime sample writes its samples.json (before any image)."""
    import runtime.writer as writer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(writer, "atomic_write_json", interrupted)


def _refused_under_the_lock(monkeypatch):
    """A refusal raised while the lock is held (the check under the lock) before any write."""
    import runtime.writer as writer
    from terdit_common.sampling import SamplingError

    def refused(*args, **kwargs):
        raise SamplingError("refused under the lock")
    monkeypatch.setattr(writer, "_prepare", refused)


def _interrupt_export(monkeypatch):
    import importlib
    ex = importlib.import_module("exporter.export")          # the module, not its function

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(ex, "_export", interrupted)


# (id, argv, patch, exit code): each ends before it wrote anything of its own
ENDED_EARLY = [
    ("rs-interrupted-before-record", ["runtime", "sample", "--model", "{B}/onnx", "--out", "{T}/a/b/out", "--num", "1", "--steps", "2", "--no-progress"], _interrupt_before_record, 130),
    ("rs-refused-under-lock", ["runtime", "sample", "--model", "{B}/onnx", "--out", "{T}/out", "--num", "1", "--steps", "2", "--no-progress"], _refused_under_the_lock, 2),
    ("ex-interrupted", ["exporter", "{B}/ck", "-o", "{T}/deep/o", "--no-validate"], _interrupt_export, 130),
    ("be-without-tensorrt", ["runtime", "build-engine", "{B}/onnx", "--plugin", "{B}/lib.so", "-o", "{T}/plans/m.plan"], None, 2),
]


@pytest.mark.parametrize("case", ENDED_EARLY, ids=[c[0] for c in ENDED_EARLY])
def test_a_run_that_ends_early_leaves_nothing(case, base, tmp_path, capsys, monkeypatch):
    name, argv, patch, expected = case
    if patch:
        patch(monkeypatch)
    monkeypatch.setitem(sys.modules, "tensorrt", None)         # no TensorRT: build-engine stops
    base_before = tree_state(base)
    code, err = run_cli_case(argv, tmp_path, base, capsys)
    assert code == expected and "Traceback" not in err, (name, code, err)
    assert list(tmp_path.iterdir()) == [], (name, sorted(tmp_path.rglob("*")))
    assert tree_state(base) == base_before


def test_a_dead_runs_lock_and_temporaries_are_cleaned(base, tmp_path, capsys):
    """runtime sample into a directory a killed run left (its lock record, a temporary of its
    samples.json and of an image): the same command takes the lock over, removes exactly those
    temporaries, finishes, and no lock remains."""
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    (out / ".terdit.lock").write_text(DEAD_LOCK)
    stale = [out / ".samples.json.terdit-abcd1234.tmp", out / "images" / ".000000.png.terdit-x1y2z3w4.tmp"]
    for p in stale:
        p.write_bytes(b"half written")
    (out / "notes.txt").write_text("the user's")
    code, err = run_cli_case(["runtime", "sample", "--model", "{B}/onnx", "--out", "{T}/out",
                              "--num", "1", "--steps", "2", "--no-progress", "--overwrite"],
                             tmp_path, base, capsys)
    assert code == 0, err
    assert "taking over the lock of a run that ended without releasing it" in err, err
    assert not any(p.exists() for p in stale) and not (out / ".terdit.lock").exists()
    assert (out / "notes.txt").read_text() == "the user's" and (out / "grid.png").is_file()


def test_build_engine_cleans_what_a_stopped_build_left(base, tmp_path, capsys, monkeypatch):
    """build-engine -o P: a dead build's lock and temporaries of P and of its record are removed
    before the build (here stopped by a missing TensorRT), another output's are kept."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    (tmp_path / ".m.plan.lock").write_text(DEAD_LOCK)
    mine = [tmp_path / ".m.plan.terdit-abcd1234.tmp", tmp_path / ".m.plan.json.terdit-abcd1234.tmp"]
    other = tmp_path / ".other.plan.terdit-abcd1234.tmp"
    for p in [*mine, other]:
        p.write_bytes(b"half written")
    code, err = run_cli_case(["runtime", "build-engine", "{B}/onnx", "--plugin", "{B}/lib.so",
                              "-o", "{T}/m.plan"], tmp_path, base, capsys)
    assert code == 2 and "TensorRT" in err.splitlines()[-1], err
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name], sorted(tmp_path.iterdir())
