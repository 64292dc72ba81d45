"""Artifacts verified by content, one writer per output directory, and kills at any point
(including inside the atomic renames) followed by a resume that gives byte-identical results."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from exporter import ExportOptions, export
from runtime import open_backend
from runtime.__main__ import main as runtime_main
from terdit_common.errors import UserError
from tests.helpers import pixel_checkpoint

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(log=lambda *_: None)
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel")
    pixel_checkpoint(root / "ck", n_layers=1)
    export(root / "ck", root / "onnx", ExportOptions(validate=False, external_data=True), **QUIET)
    return root / "onnx"


# ---- tamper: any changed byte of any exported file is refused before sampling ----------------

def _tamper_cases(export_dir: Path):
    for f in sorted(export_dir.iterdir()):
        size = f.stat().st_size
        for where in sorted({0, size // 3, size // 2, size - 1}):
            yield f.name, where


def test_any_changed_byte_is_detected(exported, tmp_path):
    import shutil
    cases = list(_tamper_cases(exported))
    assert {name for name, _ in cases} == {"manifest.json", "model.onnx", "model.onnx.data",
                                          "config.json", "model.safetensors"}
    for backend in ("ort", "torch"):
        for name, offset in cases:
            work = tmp_path / f"{backend}-{name}-{offset}"
            shutil.copytree(exported, work)
            data = bytearray((work / name).read_bytes())
            data[offset] ^= 0x01
            (work / name).write_bytes(bytes(data))
            with pytest.raises(UserError, match="manifest.json|differs|checksum|JSON|UTF-8"):
                open_backend(work, backend)


# ---- one writer per output directory ---------------------------------------------------------

def _sample_cmd(model, out, *extra):
    return [sys.executable, "-m", "runtime", "sample", "--model", str(model), "--out", str(out),
            "--no-progress", "--threads", "1", *extra]


def _wait_for_lock(out: Path, proc, timeout=120.0):
    lock = out / ".terdit.lock"
    end = time.time() + timeout
    while time.time() < end:
        if lock.is_file() and lock.read_text().strip():
            return json.loads(lock.read_text())
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the first writer never took the lock")


def test_a_second_writer_is_refused_and_a_dead_ones_lock_is_taken_over(exported, tmp_path,
                                                                         capsys):
    out = tmp_path / "out"
    first = subprocess.Popen(_sample_cmd(exported, out, "--num", "400", "--steps", "50",
                                         "--batch-size", "1"),
                             env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        owner = _wait_for_lock(out, first)
        assert owner["pid"] == first.pid
        for extra in ([], ["--overwrite"]):
            code = runtime_main(["sample", "--model", str(exported), "--out", str(out), "--num",
                                 "400", "--steps", "50", "--no-progress", *extra])
            err = capsys.readouterr().err
            assert code == 2 and f"another process (pid {first.pid}" in err, err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the killed writer's lock is stale: the same command takes it over and finishes the run
    assert runtime_main(["sample", "--model", str(exported), "--out", str(out), "--num", "400",
                         "--steps", "50", "--no-progress", "--batch-size", "100"]) == 0
    captured = capsys.readouterr()
    assert "taking over the lock" in captured.err and f"pid {first.pid}" in captured.err
    assert json.loads((out / "samples.json").read_text())["complete"]


# ---- kills at any point, then the same command ---------------------------------------------

KILLER = """
import os, random, signal, sys, time
mode, value = sys.argv[1], float(sys.argv[2])
real = os.replace
count = [0]
def replace(src, dst):
    count[0] += 1
    if mode == "rename" and count[0] == int(value):
        os.kill(os.getpid(), signal.SIGKILL)     # dies inside the atomic rename, before it
    return real(src, dst)
os.replace = replace
if mode == "time":
    import threading
    threading.Timer(value, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
sys.argv = sys.argv[3:]
import runpy
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def _killed(mode, value, module, args, cwd):
    cmd = [sys.executable, "-c", KILLER, mode, str(value), module, *args]
    return subprocess.run(cmd, env=ENV, cwd=cwd, capture_output=True, text=True, timeout=600)


def _temps(root: Path):
    return [p for p in root.rglob("*") if p.name.endswith((".tmp", ".partial", ".old"))]


def _files(root: Path, names):
    return {n: (root / n).read_bytes() for n in names}


def test_sampling_killed_anywhere_resumes_byte_identically(exported, tmp_path):
    args = ["sample", "--model", str(exported), "--num", "12", "--steps", "3", "--batch-size",
            "4", "--no-progress", "--threads", "1"]
    assert runtime_main(args + ["--out", str(tmp_path / "ref")]) == 0
    names = [f"images/{i:06d}.png" for i in range(12)] + ["samples.npz", "grid.png"]
    ref = _files(tmp_path / "ref", names)
    rng = random.Random(0)
    trials = [("rename", k) for k in (1, 2, 7, 13, 15, 16)] + \
             [("time", round(rng.uniform(1.0, 6.0), 2)) for _ in range(2)]
    for i, (mode, value) in enumerate(trials):
        out = tmp_path / f"t{i}"
        proc = _killed(mode, value, "runtime", args + ["--out", str(out)], ROOT)
        assert proc.returncode in (0, -signal.SIGKILL), proc.stderr
        assert runtime_main(args + ["--out", str(out)]) == 0, (mode, value)
        assert _files(out, names) == ref, (mode, value)
        assert not _temps(out), (mode, value, _temps(out))
        record = json.loads((out / "samples.json").read_text())
        assert record["complete"] and record["settings"]["num_images"] == 12


def test_training_killed_anywhere_resumes_byte_identically(tmp_path):
    from terdit.train import main as train_main
    rng = np.random.default_rng(0)
    np.save(tmp_path / "lat.npy", rng.standard_normal((16, 4, 8, 8)).astype(np.float32))
    np.save(tmp_path / "lat.labels.npy", np.arange(16) % 10)
    base = ["--model", "TerDiT-tiny", "--data", "latents", "--data-path",
            str(tmp_path / "lat.npy"), "--steps", "6", "--global-batch", "4", "--ckpt-every",
            "2", "--log-every", "1", "--no-progress", "--threads", "1"]
    assert train_main(base + ["--out", str(tmp_path / "ref")]) == 0
    parts = [f"checkpoints/step_0000006/{p}/model.safetensors" for p in ("model", "ema")] + \
            ["final/model.safetensors"]
    ref = _files(tmp_path / "ref", parts)
    for i, (mode, value) in enumerate([("rename", k) for k in (1, 3, 4, 6, 9)] +
                                      [("time", 4.0)]):
        out = tmp_path / f"t{i}"
        proc = _killed(mode, value, "terdit.train", base + ["--out", str(out)], tmp_path)
        assert proc.returncode in (0, -signal.SIGKILL), proc.stderr
        done = (out / "checkpoints").is_dir() and any(
            (p / "train_state.json").is_file() for p in (out / "checkpoints").glob("step_*"))
        assert train_main(base + ["--out", str(out)] + (["--resume", "latest"] if done else [])) \
            == 0, (mode, value)
        assert _files(out, parts) == ref, (mode, value)
        assert not _temps(out), (mode, value, _temps(out))
