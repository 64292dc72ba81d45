"""Files we did not write are never touched, integrity cannot be bypassed, and nothing is left
behind (issue 20, second pass): a table of hostile file-system states walked through the
exporter, `runtime sample`, the trainer and `terdit.evaluate`, in process. Each case must end
with its exit code (2: bad input), one `error:` line naming the file or flag, no traceback,
nothing added (no output directory, lock or temporary), and every file of the user's
(symbolic-link targets included) and of the shared fixtures byte-identical.
One test kills a real export process (SIGKILL, then SIGTERM) and runs the same command again."""
import importlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from exporter import ExportOptions, export
from terdit_common.manifest import MANIFEST_FORMAT, files_record, seal
from tests.cases import (assert_refused, copy, edit_json, fifo, flip, mkdir, other_run, remove,
                         symlink, write)
from tests.helpers import all_of, case_dir, pixel_checkpoint

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(log=lambda *_: None)


def _export_layout(ck: Path, out: Path) -> None:
    """An export directory as the exporter lays it out (the checkpoint's files, model.onnx and a
    sealed manifest of their sha256), without lowering: model.onnx is a placeholder, so every
    case runs --backend torch or is refused before ONNX Runtime would read it. The real exporter
    runs in test_a_killed_export_is_cleaned_by_the_same_command."""
    shutil.copytree(ck, out)
    (out / "model.onnx").write_bytes(b"placeholder graph")
    doc = json.loads((ck / "config.json").read_text())
    manifest = {"format": MANIFEST_FORMAT, "config": doc["config"], "metadata": doc["metadata"],
                "graph": {}, "files": files_record(out)}
    (out / "manifest.json").write_text(json.dumps(seal(manifest)))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Built once: a pixel checkpoint, its export layout, latents, a one-step training run and
    a sampling run. Cases copy what they damage."""
    root = tmp_path_factory.mktemp("files")
    pixel_checkpoint(root / "ck", n_layers=1, class_names="abc")
    pixel_checkpoint(root / "fpck", n_layers=1, fp=True)
    _export_layout(root / "ck", root / "onnx")
    np.save(root / "lat.npy", np.zeros((4, 4, 8, 8), np.float32))
    np.save(root / "lat.labels.npy", np.arange(4))
    from terdit.train import main as train_main
    assert train_main(["--model", "TerDiT-tiny", "--data", "latents", "--data-path",
                       str(root / "lat.npy"), "--out", str(root / "run"), "--steps", "1",
                       "--global-batch", "2", "--no-progress"]) == 0
    from runtime.runtime_cli import main as runtime_main
    assert runtime_main(["sample", "--model", str(root / "onnx"), "--backend", "torch", "--out",
                         str(root / "samples"), "--num", "1", "--steps", "2",
                         "--no-progress"]) == 0
    record = json.loads((root / "samples" / "samples.json").read_text())
    assert record["complete"] and record["model"]["backend"] == "torch"
    return root


# ---- setup helpers: (tmp, base) -> None; argv paths use {T} (the case's directory) and {B}
# (the shared fixtures, only read) ---------------------------------------------------------------

def _reseal_manifest(edit):
    def sealed(doc):
        edit(doc)
        doc.update(seal({k: v for k, v in doc.items() if k != "manifest_sha256"}))
    return edit_json("onnx/manifest.json", sealed)


def _npy_header(shape, dtype="<f4") -> bytes:
    """A .npy header declaring `shape` (no data follows)."""
    header = repr({"descr": dtype, "fortran_order": False, "shape": tuple(shape)})
    header += " " * (64 - (10 + len(header) + 1) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode()


def _png_header(width, height) -> bytes:
    """A PNG whose header declares width x height (decoding it would fail; nothing decodes it)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + \
        chunk(b"IEND", b"")


def _idx_header(dims) -> bytes:
    import gzip
    return gzip.compress(bytes([0, 0, 0x08, len(dims)]) + struct.pack(f">{len(dims)}i", *dims))


def _fashion(images: bytes):
    def setup(tmp, base):
        import gzip
        (tmp / "fm").mkdir()
        (tmp / "fm" / "train-images-idx3-ubyte.gz").write_bytes(images)
        (tmp / "fm" / "train-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(bytes([0, 0, 0x08, 1]) + struct.pack(">i", 0)))
    return setup


def _image_folder(tmp, base):
    from PIL import Image
    for cls in ("a", "b"):
        (tmp / "imgs" / cls).mkdir(parents=True)
        Image.new("L", (8, 8), 3).save(tmp / "imgs" / cls / "x.png")


LAT = copy("lat.npy", "lat.labels.npy")
EX = ["exporter", "{T}/ck", "-o", "{T}/o", "--no-validate"]
SAMPLE = ["runtime", "sample", "--model", "{T}/onnx", "--out", "{T}/out", "--no-progress",
          "--num", "1", "--steps", "2", "--backend", "torch"]
TRAIN = ["train", "--model", "TerDiT-tiny", "--data", "latents", "--data-path", "{T}/lat.npy",
         "--out", "{T}/run", "--no-progress", "--steps", "1", "--global-batch", "2"]
RESUME = [a.replace("{T}/lat", "{B}/lat") for a in TRAIN] + ["--resume", "latest"]
STEP = "run/checkpoints/step_0000001"
EVAL = ["evaluate", "metrics", "--ref", "none", "--num-images", "1", "--steps", "2",
        "--no-progress"]

# (id, argv, regex the error line must match, setup)
CASES = [
    # 1. data loss: outputs that are inputs, symbolic links, --overwrite of what is not ours
    ("ex-out-is-input", ["exporter", "{T}/onnx", "-o", "{T}/onnx", "--overwrite"], r"-o .*onnx: is the input CHECKPOINT", copy("onnx")),
    ("ex-out-inside-input", ["exporter", "{T}/ck", "-o", "{T}/ck/sub"], "lies inside the input CHECKPOINT", copy("ck")),
    ("ex-out-contains-input", ["exporter", "{T}/w/ck", "-o", "{T}/w", "--overwrite"], "contains the input CHECKPOINT", lambda t, b: shutil.copytree(b / "ck", t / "w" / "ck")),
    ("ex-overwrite-foreign-file", EX + ["--overwrite"], r"-o .*/o: holds notes.txt, which this tool did not write", all_of(lambda t, b: shutil.copytree(b / "onnx", t / "o"), write("o/notes.txt", b"mine"))),
    ("ex-overwrite-checkpoint", ["exporter", "{T}/ck", "-o", "{T}/fpck", "--overwrite", "--no-validate"], "fpck: is not an export directory", copy("ck", "fpck")),
    ("ex-out-symlink", EX + ["--overwrite"], r"-o .*/o: is a symbolic link", all_of(copy("ck"), lambda t, b: shutil.copytree(b / "onnx", t / "real"), symlink("o", "real"))),
    ("ex-lock-symlink", EX, r"\.o\.lock: is a symbolic link", all_of(copy("ck"), symlink(".o.lock", "precious.txt"))),
    ("rs-lock-symlink", SAMPLE, r"\.terdit\.lock: is a symbolic link", all_of(copy("onnx"), mkdir("out"), symlink("out/.terdit.lock", "precious.txt"))),
    ("rs-out-is-model", SAMPLE[:5] + ["{T}/onnx", "--overwrite", "--backend", "torch"], "--out .*onnx: is the input --model", copy("onnx")),
    ("rs-out-inside-model", SAMPLE[:5] + ["{T}/onnx/s", "--backend", "torch"], "lies inside the input --model", copy("onnx")),
    ("rs-user-image", SAMPLE, r"out/images: holds 000000.png, which this tool did not write", all_of(copy("onnx"), lambda t, b: shutil.copytree(b / "samples" / "images", t / "out" / "images"))),
    ("rs-user-image-overwrite", SAMPLE + ["--overwrite"], "holds 000000.png, which this tool did not write", all_of(copy("onnx"), lambda t, b: shutil.copytree(b / "samples" / "images", t / "out" / "images"))),
    ("rs-user-grid-overwrite", SAMPLE + ["--overwrite"], "holds grid.png but no samples.json", all_of(copy("onnx"), write("out/grid.png", b"my grid"))),
    ("rs-foreign-samples-json", SAMPLE + ["--overwrite"], "samples.json is not a TerDiT Deploy sample record", all_of(copy("onnx"), write("out/samples.json", b'{"mine": 1}'), write("out/images/000000.png", b"x"))),
    ("rs-images-symlink", SAMPLE, r"out: images is a symbolic link where this tool writes a directory", all_of(copy("onnx"), mkdir("mine"), mkdir("out"), lambda t, b: os.symlink(t / "mine", t / "out" / "images"))),
    ("tr-foreign-checkpoints", TRAIN, "holds checkpoints but no train_config.json", all_of(LAT, write("run/checkpoints/model.ckpt", b"another run"))),
    ("tr-foreign-checkpoints-overwrite", TRAIN + ["--overwrite"], "holds checkpoints but no train_config.json", all_of(LAT, write("run/checkpoints/model.ckpt", b"another run"))),
    ("tr-foreign-ckpt-in-run-overwrite", TRAIN + ["--overwrite"], r"run/checkpoints: holds model.ckpt, which this tool did not write", all_of(LAT, copy("run"), write("run/checkpoints/model.ckpt", b"mine"))),
    ("tr-foreign-final", TRAIN, "holds final but no train_config.json", all_of(LAT, write("run/final/weights.bin", b"mine"))),
    ("tr-final-foreign-file", RESUME, r"run/final: holds notes.txt", all_of(LAT, copy("run"), write("run/final/notes.txt", b"mine"))),
    ("tr-lock-symlink", TRAIN, r"\.terdit\.lock: is a symbolic link", all_of(LAT, mkdir("run"), symlink("run/.terdit.lock", "precious.txt"))),
    ("tr-out-contains-data", ["train", "--model", "TerDiT-tiny", "--data", "latents", "--data-path", "{T}/run/lat.npy", "--out", "{T}/run", "--no-progress"], "contains the input --data-path", all_of(mkdir("run"), lambda t, b: shutil.copy(b / "lat.npy", t / "run"), lambda t, b: shutil.copy(b / "lat.labels.npy", t / "run"))),
    ("tr-out-inside-init", TRAIN[:-4] + ["--out", "{T}/fpck/run", "--init-from", "{T}/fpck"], "lies inside the input --init-from", all_of(LAT, copy("fpck"))),
    # 2. integrity: an export is read only through its manifest
    ("rs-export-no-manifest", SAMPLE, "holds model.onnx but no manifest.json", all_of(copy("onnx"), remove("onnx/manifest.json"), flip("onnx/model.safetensors"))),
    ("rs-export-no-manifest-ort", SAMPLE[:-2], "holds model.onnx but no manifest.json", all_of(copy("onnx"), remove("onnx/manifest.json"))),
    ("rs-export-manifest-dir", SAMPLE, r"manifest.json: not a regular file \(a directory\)", all_of(copy("onnx"), remove("onnx/manifest.json"), mkdir("onnx/manifest.json"))),
    ("rs-manifest-fifo", SAMPLE, r"manifest.json: not a regular file \(a FIFO", all_of(copy("onnx"), fifo("onnx/manifest.json"))),
    ("rs-listed-file-fifo", SAMPLE, r"model.safetensors: not a regular file \(a FIFO", all_of(copy("onnx"), fifo("onnx/model.safetensors"))),
    ("rs-listed-size-differs", SAMPLE, r"model.onnx: content differs from manifest.json \(\d+ bytes, recorded", all_of(copy("onnx"), write("onnx/model.onnx", b"short"))),
    ("rs-manifest-bytes-huge", SAMPLE, "MAX_WEIGHTS_BYTES", all_of(copy("onnx"), _reseal_manifest(lambda d: d["files"]["model.onnx"].update(bytes=2 ** 60)))),
    ("ex-export-no-manifest", EX[:1] + ["{T}/onnx", "-o", "{T}/o", "--no-validate"], "holds model.onnx but no manifest.json", all_of(copy("onnx"), remove("onnx/manifest.json"), flip("onnx/model.safetensors"))),
    ("ex-export-weights-edited", EX[:1] + ["{T}/onnx", "-o", "{T}/o", "--no-validate"], "model.safetensors: content differs from manifest.json", all_of(copy("onnx"), flip("onnx/model.safetensors"))),
    ("ev-export-no-manifest", EVAL + ["--model", "{T}/onnx"], "holds model.onnx but no manifest.json", all_of(copy("onnx"), remove("onnx/manifest.json"))),
    ("ev-export-weights-edited", EVAL + ["--model", "{T}/onnx"], "model.safetensors: content differs", all_of(copy("onnx"), flip("onnx/model.safetensors"))),
    # 3. resume rules; every flag acts or is refused
    ("rs-resume-other-backend", SAMPLE[:5] + ["{T}/samples"] + SAMPLE[6:], "different run .*--backend ort -> torch", all_of(copy("onnx", "samples"), other_run("samples/samples.json", lambda d: d["model"].update(backend="ort")))),
    ("ex-ema-on-checkpoint", EX + ["--ema"], r"--ema / --no-ema \(ema=True\) choose among the files of an official", copy("ck")),
    ("ex-from-fp-on-checkpoint", EX + ["--from-fp"], "--from-ternary / --from-fp", copy("ck")),
    ("ex-tolerance-no-validate", EX + ["--tolerance", "0.1"], "--tolerance sets the validation, which --no-validate skips", copy("ck")),
    ("ex-seed-no-validate", EX + ["--seed", "3"], "--seed sets the validation", copy("ck")),
    ("ex-vae-pixel-model", EX + ["--vae", "{T}/vae"], "pixel-space model .*drop --vae", all_of(copy("ck"), write("vae/config.json", b"{}"))),
    ("tr-model-and-config", TRAIN + ["--model-config", "{T}/m.json"], "--model would have no effect: --model-config", all_of(LAT, write("m.json", b"{}"))),
    ("tr-min-lr-constant", TRAIN + ["--lr-schedule", "constant", "--min-lr-ratio", "0.2"], "--min-lr-ratio would have no effect", LAT),
    ("tr-sample-steps-no-previews", TRAIN + ["--sample-steps", "5"], "--sample-steps would have no effect: .*--sample-every is 0", LAT),
    ("tr-strategy-one-process", TRAIN + ["--strategy", "fsdp"], "--strategy fsdp would have no effect", LAT),
    ("tr-overwrite-with-resume", RESUME + ["--overwrite"], "--overwrite would have no effect", all_of(LAT, copy("run"))),
    ("tr-packed-fp", TRAIN + ["--fp", "--final-weights", "packed"], "--final-weights packed would have no effect", LAT),
    # 4. bounds before work
    ("tr-npy-header-huge", TRAIN, r"lat.npy: its header declares shape \(1000000000, 4, 64, 64\).*MAX_ARRAY_BYTES", all_of(write("lat.npy", _npy_header((10 ** 9, 4, 64, 64))), copy("lat.labels.npy"))),
    ("tr-npy-truncated", TRAIN, r"lat.npy: its header declares 102400 bytes of data, the file holds 0; it is truncated", all_of(write("lat.npy", _npy_header((100, 4, 8, 8))), copy("lat.labels.npy"))),
    ("tr-npy-objects", TRAIN, "lat.npy: holds Python objects", all_of(write("lat.npy", _npy_header((4,), "|O")), copy("lat.labels.npy"))),
    ("tr-labels-count", TRAIN, r"4 latents but labels file \S*lat.labels.npy of shape \(3,\)", all_of(copy("lat.npy"), lambda t, b: np.save(t / "lat.labels.npy", np.arange(3)))),
    ("tr-npz-damaged", TRAIN[:6] + ["{T}/lat.npz"] + TRAIN[7:], "lat.npz: not a readable .npz", write("lat.npz", b"PK\x03\x04 not a zip")),
    ("tr-idx-header-huge", ["train", "--data", "fashion-mnist", "--data-path", "{T}/fm", "--out", "{T}/run", "--no-progress"], r"train-images-idx3-ubyte.gz: its header declares shape \(2000000000, 64, 64\).*MAX_ARRAY_BYTES", _fashion(_idx_header((2_000_000_000, 64, 64)))),
    ("tr-image-too-large", ["train", "--data", "folder", "--data-path", "{T}/imgs", "--out", "{T}/run", "--no-progress"], r"big.png: 9000x9000 pixels, more than 67108864 \(limits.MAX_IMAGE_PIXELS\)", all_of(_image_folder, write("imgs/a/big.png", _png_header(9000, 9000)))),
    ("tr-state-json-empty", RESUME, r"train_state.json: not valid JSON \(Expecting value at line 1 column 1\); the file is damaged: resume from another", all_of(LAT, copy("run"), write(STEP + "/train_state.json", b""))),
    ("tr-state-json-field", RESUME, "train_state.json: field 'rng' is NoneType", all_of(LAT, copy("run"), edit_json(STEP + "/train_state.json", lambda d: d.pop("rng")))),
    ("tr-state-tensors-damaged", RESUME, "--resume .*step_0000001: the checkpoint cannot be loaded", all_of(LAT, copy("run"), write(STEP + "/train_state.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage"))),
    # 7. messages name the thing: FIFOs are "not a regular file", damaged JSON names the file
    ("ex-checkpoint-fifo", ["exporter", "{T}/x.pt", "-o", "{T}/o"], r"x.pt: not a regular file \(a FIFO \(named pipe\)\)", fifo("x.pt")),
    ("ex-config-fifo", EX, r"ck/config.json: not a regular file \(a FIFO", all_of(copy("ck"), fifo("ck/config.json"))),
    ("ex-config-empty", EX, r"ck/config.json: not valid JSON .*restore it or save the checkpoint again", all_of(copy("ck"), write("ck/config.json", b""))),
    ("ex-vae-config-fifo", ["exporter", "{T}/onnx", "-o", "{T}/o", "--vae", "{T}/vae"], r"vae/config.json: not a regular file \(a FIFO", all_of(copy("onnx"), fifo("vae/config.json"))),
    ("tr-data-fifo", TRAIN, r"--data-path .*lat.npy: not a regular file \(a FIFO", fifo("lat.npy")),
    ("tr-labels-fifo", TRAIN, r"labels file .*lat.labels.npy: not a regular file \(a FIFO", all_of(copy("lat.npy"), fifo("lat.labels.npy"))),
    ("tr-model-config-fifo", TRAIN[:1] + TRAIN[3:] + ["--model-config", "{T}/m.json"], r"--model-config .*m.json: not a regular file \(a FIFO", all_of(LAT, fifo("m.json"))),
    ("tr-model-config-empty", TRAIN[:1] + TRAIN[3:] + ["--model-config", "{T}/m.json"], r"--model-config .*m.json: not valid JSON .*fix the file", all_of(LAT, write("m.json", b""))),
    ("tr-image-fifo", ["train", "--data", "folder", "--data-path", "{T}/imgs", "--out", "{T}/run", "--no-progress"], r"x2.png: not a regular file \(a FIFO", all_of(_image_folder, fifo("imgs/b/x2.png"))),
    ("tr-idx-fifo", ["train", "--data", "fashion-mnist", "--data-path", "{T}/fm", "--out", "{T}/run", "--no-progress"], r"train-images-idx3-ubyte.gz: not a regular file \(a FIFO", all_of(_fashion(b""), fifo("fm/train-images-idx3-ubyte.gz"))),
    ("ev-model-fifo", EVAL + ["--model", "{T}/x.pt"], r"x.pt: not a regular file \(a FIFO", fifo("x.pt")),
    ("ev-data-fifo", ["evaluate", "train-classifier", "--out", "{T}/c.st", "--data-path", "{T}/fm", "--no-progress"], r"train-images-idx3-ubyte.gz: not a regular file \(a FIFO", all_of(_fashion(b""), fifo("fm/train-images-idx3-ubyte.gz"))),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_files_we_did_not_write_are_safe(case, base, tmp_path, capsys):
    name, argv, pattern, setup = case
    work = case_dir(tmp_path, base, setup)
    # nothing of the user's changed or removed (links and their targets included), nothing
    # added: no output directory, lock or temporary is left by a refused run
    assert_refused(name, argv, pattern, work, base, capsys)


# ---- nothing left behind -----------------------------------------------------------------------

# The exporter as a real process, stopped while it writes model.onnx into its temporary
# directory (lowering is replaced by a stub: what is tested is what a stopped process leaves).
STOPPED_EXPORT = """
import importlib, sys, time
ex = importlib.import_module("exporter.export")
class Lowered:
    graph = []
def save_model(model, path, external):
    path.write_bytes(b"w" * (1 << 20))
    time.sleep(600)
ex.lower, ex.finalize, ex.save_model = (lambda *a: Lowered()), (lambda *a: None), save_model
from exporter.export_cli import main
sys.exit(main(sys.argv[1:]))
"""


def _stopped_export(ck: Path, out: Path, sig) -> tuple[int, str, Path]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", STOPPED_EXPORT, str(ck), "-o", str(out),
                             "--no-validate"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        end = time.time() + 120
        while not list(out.parent.glob(f".{out.name}.*.tmp/model.onnx")):
            assert proc.poll() is None and time.time() < end, proc.communicate()
            time.sleep(0.01)
        temp = next(out.parent.glob(f".{out.name}.*.tmp"))
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err, temp


def test_a_killed_export_is_cleaned_by_the_same_command(base, tmp_path, capsys, monkeypatch):
    """SIGKILL mid-export leaves its temporary directory (with a partial model.onnx) and its lock
    beside the output; the same command removes exactly that temporary (not another output's),
    takes the dead owner's lock over and leaves no lock. SIGTERM ends the export like Ctrl-C:
    exit code 130 and nothing left behind."""
    out = tmp_path / "o"
    code, err, temp = _stopped_export(base / "ck", out, signal.SIGTERM)
    assert code == 130 and "Traceback" not in err and "interrupted" in err, err
    assert list(tmp_path.iterdir()) == []
    code, err, temp = _stopped_export(base / "ck", out, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert temp.is_dir() and (tmp_path / ".o.lock").is_file() and not out.exists()
    (tmp_path / ".o.x.terdit-abcd1234.tmp").mkdir()          # another output's (o.x) temporary
    ex = importlib.import_module("exporter.export")
    seen = {}

    def rest_of_export(checkpoint, outdir, options, log):
        seen["temps"] = sorted(p.name for p in tmp_path.glob(".o.*.tmp"))
        seen["locked"] = (tmp_path / ".o.lock").is_file()
        return {}
    monkeypatch.setattr(ex, "_export", rest_of_export)
    from exporter.export_cli import main
    capsys.readouterr()
    assert main([str(base / "ck"), "-o", str(out), "--no-validate"]) == 0
    err = capsys.readouterr().err
    assert seen == {"temps": [".o.x.terdit-abcd1234.tmp"], "locked": True}, seen
    assert "taking over the lock" in err and temp.name in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".o.x.terdit-abcd1234.tmp"]


def test_an_interrupted_export_removes_its_temporary_and_lock(base, tmp_path, monkeypatch):
    """KeyboardInterrupt (Ctrl-C, or SIGTERM turned into it by the CLI) inside the output's
    temporary directory: the temporary and the lock are removed on the way out."""
    ex = importlib.import_module("exporter.export")

    class Lowered:
        graph = []

    def interrupted(*args, **kwargs):
        assert [p.name for p in tmp_path.glob(".o.*.tmp")] and (tmp_path / ".o.lock").is_file()
        raise KeyboardInterrupt
    monkeypatch.setattr(ex, "lower", lambda *a: Lowered())
    monkeypatch.setattr(ex, "finalize", lambda *a: None)
    monkeypatch.setattr(ex, "save_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export(base / "ck", tmp_path / "o", ExportOptions(validate=False), **QUIET)
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_training_checkpoint_leaves_no_temporary(base, tmp_path, monkeypatch):
    """KeyboardInterrupt while a training checkpoint is written: its `.partial` directory is
    removed and the lock released and removed on the way out."""
    import safetensors.torch
    from terdit.train import TrainConfig, train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(model="TerDiT-tiny", data="latents", data_path=str(base / "lat.npy"),
                          out=str(tmp_path / "run"), steps=1, global_batch=2, progress=False,
                          device="cpu"))
    left = [p for p in (tmp_path / "run").rglob("*")
            if p.name.endswith((".tmp", ".partial", ".old"))]
    assert left == [] and not (tmp_path / "run" / ".terdit.lock").exists()
