"""Artifacts verified by content, one writer per output directory, and kills at any point
(including inside the atomic renames) followed by a resume that gives byte-identical results."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from exporter import ExportOptions, export
from runtime import open_backend
from runtime.runtime_cli import main as runtime_main
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

# Runs `python -m MODULE ARGS` and SIGKILLs it on the N-th call of one function (module:attribute,
# e.g. os:replace: inside an atomic rename, before it happens). Exit code -9 proves that the kill
# landed, and the N-th call is one the finished run makes: a point the run really reaches.
KILLER = """
import importlib, os, runpy, signal, sys
where, n = sys.argv[1], int(sys.argv[2])
module_name, _, path = where.partition(":")
owner = importlib.import_module(module_name)
*parents, name = path.split(".")
for part in parents:
    owner = getattr(owner, part)
real = getattr(owner, name)
count = [0]
def killing(*args, **kwargs):
    count[0] += 1
    if count[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
setattr(owner, name, killing)
sys.argv = sys.argv[3:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def _kill_runs(trials, module, args, tmp_path, cwd):
    """Runs `python -m module *args --out tmp_path/tI` for every trial (where, n) at once (each
    spends most of its time importing torch) and checks that every kill landed; returns the
    output directories."""
    outs, procs = [], []
    for i, (where, n) in enumerate(trials):
        outs.append(tmp_path / f"t{i}")
        cmd = [sys.executable, "-c", KILLER, where, str(n), module, *args, "--out", str(outs[i])]
        with open(tmp_path / f"t{i}.stderr", "w") as err:
            procs.append(subprocess.Popen(cmd, env=ENV, cwd=cwd, stdout=subprocess.DEVNULL,
                                          stderr=err))
    for i, ((where, n), proc) in enumerate(zip(trials, procs)):
        code = proc.wait(timeout=600)
        assert code == -signal.SIGKILL, (
            f"the kill at call {n} of {where} never landed (exit code {code}): "
            f"{(tmp_path / f't{i}.stderr').read_text()[-2000:]}")
    return outs


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
    # renames: samples.json (1), images 0..11 (2..13), samples.npz (14), grid.png (15), the
    # final samples.json (16); model forwards: 3 batches x 3 steps, 5 is inside batch 2
    trials = [("os:replace", k) for k in (1, 2, 7, 13, 15, 16)] + \
             [("terdit_common.sampling:guided_forward", k) for k in (5, 9)]
    for (where, n), out in zip(trials, _kill_runs(trials, "runtime", args, tmp_path, ROOT)):
        record = out / "samples.json"
        assert not record.is_file() or not json.loads(record.read_text())["complete"], (where, n)
        if "forward" in where:      # killed in batch (n - 1) // 3 + 1: the batches before it wrote
            assert len(list((out / "images").glob("*.png"))) == 4 * ((n - 1) // 3), (where, n)
        assert runtime_main(args + ["--out", str(out)]) == 0, (where, n)
        assert _files(out, names) == ref, (where, n)
        assert not _temps(out), (where, n, _temps(out))
        record = json.loads((out / "samples.json").read_text())
        assert record["complete"] and record["settings"]["num_images"] == 12


def test_training_killed_anywhere_resumes_byte_identically(tmp_path):
    from terdit.train import main as train_main
    from terdit.train import read_log
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
    # 6 training steps, one loss per step; a checkpoint after steps 2, 4 and 6: the 4th loss is
    # step 4's, after the step-2 checkpoint and before the step-4 one
    trials = [("os:replace", k) for k in (1, 3, 4, 6, 9)] + \
             [("terdit.diffusion:GaussianDiffusion.training_losses", 4)]
    for (where, n), out in zip(trials, _kill_runs(trials, "terdit.train", base, tmp_path,
                                                  tmp_path)):
        assert not (out / "final").exists(), (where, n)
        if "training_losses" in where:      # killed in step n: steps 1 .. n - 1 were logged
            assert [r["step"] for r in read_log(out / "log.jsonl")] == list(range(1, n)), n
        done = (out / "checkpoints").is_dir() and any(
            (p / "train_state.json").is_file() for p in (out / "checkpoints").glob("step_*"))
        assert train_main(base + ["--out", str(out)] + (["--resume", "latest"] if done else [])) \
            == 0, (where, n)
        assert _files(out, parts) == ref, (where, n)
        assert not _temps(out), (where, n, _temps(out))
