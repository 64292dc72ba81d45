"""A table of hostile or broken inputs walked through every CLI (exporter, runtime sample,
runtime build-engine, terdit.train, terdit.evaluate). Each must end with exit code 2 and one
`error:` line that names what is wrong (argparse's own usage errors: its two lines), no
traceback, nothing half-written and no temporary file left behind."""
import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from exporter import ExportOptions, export
from tests.helpers import all_of, case_dir, pixel_checkpoint, run_cli_case, tree_state

QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny pixel model as a checkpoint and as an export; both are copied before a case may
    damage them."""
    root = tmp_path_factory.mktemp("bad")
    pixel_checkpoint(root / "ck", n_layers=1, class_names="abc")
    pixel_checkpoint(root / "fp", n_layers=1, fp=True)
    export(root / "ck", root / "onnx", ExportOptions(validate=False), **QUIET)
    export(root / "ck", root / "onnx_cfg", ExportOptions(validate=False, cfg="standard"), **QUIET)
    export(root / "ck", root / "onnx_ext", ExportOptions(validate=False, external_data=True),
           **QUIET)
    np.savez(root / "good.npz", np.zeros((4, 8, 8, 3), np.uint8), np.arange(4) % 3)
    return root


# ---- setup helpers: each gets (tmp, base) and returns nothing; paths in argv use {T} / {B} ----

def _copy(name):
    def setup(tmp, base):
        shutil.copytree(base / name, tmp / name)
    return setup


def _edit_json(name, file, edit):
    def setup(tmp, base):
        shutil.copytree(base / name, tmp / name)
        path = tmp / name / file
        data = json.loads(path.read_text())
        result = edit(data)
        path.write_text(json.dumps(data if result is None else result))
    return setup


def _edit_manifest(edit):
    """A consistent (re-sealed) but wrong manifest, as a buggy tool might write it."""
    from terdit_common.manifest import seal

    def sealed(doc):
        result = edit(doc)
        return seal(doc if result is None else result)
    return _edit_json("onnx", "manifest.json", sealed)


def _write(name, file, content: bytes):
    def setup(tmp, base):
        shutil.copytree(base / name, tmp / name)
        (tmp / name / file).write_bytes(content)
    return setup


def _mutate(name, file, fn):
    def setup(tmp, base):
        shutil.copytree(base / name, tmp / name)
        path = tmp / name / file
        path.write_bytes(fn(path.read_bytes()))
    return setup


def _flip(data: bytes) -> bytes:
    b = bytearray(data)
    b[len(b) // 2] ^= 0x40
    return bytes(b)


def _config_value(field, value):
    def edit(doc):
        doc["config"][field] = value
    return _edit_json("ck", "config.json", edit)


def _file(name, content: bytes):
    def setup(tmp, base):
        (tmp / name).write_bytes(content)
    return setup


def _deep_json(tmp, base):
    shutil.copytree(base / "ck", tmp / "ck")
    (tmp / "ck" / "config.json").write_text("[" * 100000 + "]" * 100000)


def _huge_int(tmp, base):
    shutil.copytree(base / "ck", tmp / "ck")
    doc = (tmp / "ck" / "config.json").read_text()
    (tmp / "ck" / "config.json").write_text(doc.replace('"dim": 32', '"dim": ' + "9" * 5000))


def _sample_run(tmp, base):
    from runtime.runtime_cli import main
    assert main(["sample", "--model", str(base / "onnx"), "--out", str(tmp / "out"), "--steps",
                 "2", "--num", "2", "--no-progress"]) == 0


def _checkpoints(tmp, base):
    from terdit.train import main
    assert main(["--model", "TerDiT-tiny", "--data", "latents", "--data-path",
                 str(tmp / "lat.npy"), "--out", str(tmp / "run"), "--steps", "1",
                 "--global-batch", "2", "--no-progress"]) == 0


def _latents(tmp, base):
    np.save(tmp / "lat.npy", np.zeros((4, 4, 8, 8), np.float32))
    np.save(tmp / "lat.labels.npy", np.arange(4))


def _readonly(monkeypatch):
    """Writes fail as on a read-only mount (root ignores chmod, so the OS call is patched)."""
    import tempfile
    real_mkstemp, real_mkdtemp, real_mkdir = tempfile.mkstemp, tempfile.mkdtemp, os.mkdir

    def refuse(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    monkeypatch.setattr(os, "mkdir", refuse)
    return real_mkstemp, real_mkdtemp, real_mkdir


def _disk_full(monkeypatch):
    import terdit_common.files as files
    real = files.atomic_write

    def full(path, writer):
        if str(path).endswith(".png"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, writer)
    monkeypatch.setattr(files, "atomic_write", full)


def _reseal(export_dir: Path) -> None:
    from terdit_common.manifest import files_record, seal
    manifest = json.loads((export_dir / "manifest.json").read_text())
    manifest["files"] = files_record(export_dir)
    (export_dir / "manifest.json").write_text(json.dumps(seal(manifest)))


def _truncate_data(tmp, base):
    shutil.copytree(base / "onnx_ext", tmp / "onnx")
    data = tmp / "onnx" / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    _reseal(tmp / "onnx")


def _data_outside(tmp, base):
    """model.onnx points its weights at ../outside.data (consistently hashed and sealed)."""
    import onnx
    shutil.copytree(base / "onnx_ext", tmp / "onnx")
    model = onnx.load(str(tmp / "onnx" / "model.onnx"), load_external_data=False)
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = "../outside.data"
    onnx.save(model, str(tmp / "onnx" / "model.onnx"))
    (tmp / "onnx" / "model.onnx.data").rename(tmp / "outside.data")
    _reseal(tmp / "onnx")


LONG = "n" * 300
EX = ["exporter", "{B}/ck", "-o", "{T}/o"]
EXC = ["exporter", "{T}/ck", "-o", "{T}/o"]
SAMPLE = ["runtime", "sample", "--model", "{B}/onnx", "--out", "{T}/out", "--no-progress"]
SAMPLE_T = ["runtime", "sample", "--model", "{T}/onnx", "--out", "{T}/out", "--no-progress"]
BUILD = ["runtime", "build-engine", "{B}/onnx", "--plugin", "{T}/lib.so"]
TRAIN = ["train", "--model", "TerDiT-tiny", "--data", "latents", "--data-path", "{T}/lat.npy",
         "--out", "{T}/run", "--no-progress", "--steps", "1", "--global-batch", "2"]
EVAL = ["evaluate", "metrics", "--ref", "none"]

# (id, argv, expected regex in stderr, setup or None, patch or None)
CASES = [
    # exporter: inputs
    ("ex-missing", ["exporter", "{T}/nope", "-o", "{T}/o"], "no such file or directory", None, None),
    ("ex-garbage-pt", ["exporter", "{T}/x.pt", "-o", "{T}/o"], "not a PyTorch checkpoint", _file("x.pt", b"garbage!"), None),
    ("ex-empty-pt", ["exporter", "{T}/x.pt", "-o", "{T}/o"], "file is empty", _file("x.pt", b""), None),
    ("ex-unknown-kind", ["exporter", "{T}/x.bin", "-o", "{T}/o"], "unknown checkpoint type", _file("x.bin", b"x"), None),
    ("ex-weights-truncated", EXC, "model.safetensors: not a valid safetensors file", _mutate("ck", "model.safetensors", lambda b: b[:len(b) // 2]), None),
    ("ex-weights-missing", EXC, "model.safetensors: file not found", lambda t, b: (_copy("ck")(t, b), (t / "ck" / "model.safetensors").unlink()), None),
    ("ex-config-not-json", EXC, "config.json: not valid JSON", _write("ck", "config.json", b"{nope"), None),
    ("ex-config-not-utf8", EXC, "config.json: not UTF-8", _write("ck", "config.json", b'{"a": "\xff\xfe"}'), None),
    ("ex-config-deep", EXC, "config.json: cannot be read as JSON", _deep_json, None),
    ("ex-config-5000-digits", EXC, "config.json: cannot be read as JSON", _huge_int, None),
    ("ex-config-list", EXC, "config.json: field 'format'", _write("ck", "config.json", b"[1, 2]"), None),
    ("ex-config-unknown-field", EXC, "unknown config field.*'colour'", _config_value("colour", 3), None),
    ("ex-config-layers-1e6", EXC, "n_layers=1000000: must be an integer from 1 to 512", _config_value("n_layers", 1000000), None),
    ("ex-config-layers-disagree", EXC, "holds 1 transformer layer.*n_layers=300", _config_value("n_layers", 300), None),
    ("ex-config-dim-disagree", EXC, "x_embedder.weight has shape", _config_value("dim", 64), None),
    ("ex-config-size-2e40", EXC, "input_size=1099511627776", _config_value("input_size", 2 ** 40), None),
    ("ex-config-ffn-neg", EXC, "ffn_dim_multiplier=-1", _config_value("ffn_dim_multiplier", -1), None),
    ("ex-config-classes-neg", EXC, "config.json.*num_classes=-5", _config_value("num_classes", -5), None),
    ("ex-config-bool-dim", EXC, "dim=True", _config_value("dim", True), None),
    ("ex-config-heads", EXC, "divisible by n_heads", _config_value("n_heads", 3), None),
    ("ex-config-eps", EXC, "norm_eps", _config_value("norm_eps", "small"), None),
    ("ex-metadata-list", EXC, "field 'metadata' is list", _edit_json("ck", "config.json", lambda d: d.update(metadata=[1, 2])), None),
    ("ex-class-names-ints", EXC, "class_names", _edit_json("ck", "config.json", lambda d: d.update(metadata={"class_names": [1]})), None),
    ("ex-format", EXC, "field 'format' is 'other'", _edit_json("ck", "config.json", lambda d: d.update(format="other")), None),
    ("ex-weights-kind", EXC, "field 'weights' is 'xyz'", _edit_json("ck", "config.json", lambda d: d.update(weights="xyz")), None),
    ("ex-fp-model", ["exporter", "{B}/fp", "-o", "{T}/o"], "full-precision", None, None),
    # exporter: options and outputs
    ("ex-out-is-file", ["exporter", "{B}/ck", "-o", "{T}/f"], "exists and is not a directory", _file("f", b"x"), None),
    ("ex-out-too-long", ["exporter", "{B}/ck", "-o", "{T}/" + LONG], "255-byte limit", None, None),
    ("ex-out-exists", EX, "already exists; pass --overwrite", lambda t, b: (t / "o").mkdir(), None),
    ("ex-out-readonly", EX, "read-only filesystem", None, _readonly),
    ("ex-validate-batches-huge", EX + ["--validate-batches", "100000"], "--validate-batches 100000", None, None),
    ("ex-validate-batches-zero", EX + ["--validate-batches", "0"], "--validate-batches 0", None, None),
    ("ex-validate-batches-many", EX + ["--validate-batches", "1", "2", "3", "4", "5"], "give 1 to 4 batch sizes", None, None),
    ("ex-tolerance-nan", EX + ["--tolerance", "nan"], "--tolerance nan", None, None),
    ("ex-tolerance-neg", EX + ["--tolerance", "-1"], "--tolerance -1", None, None),
    ("ex-seed-neg", EX + ["--seed", "-1"], "--seed -1", None, None),
    ("ex-vae-missing", EX + ["--vae", "{T}/novae"], "novae/config.json: file not found|not in the Hugging Face cache", None, None),
    ("ex-vae-hub-absent", EX + ["--vae", "someorg/some-vae"], "not in the Hugging Face cache", None, None),
    ("ex-cfg-official-gray", EX + ["--cfg", "official"], "--cfg standard", None, None),
    ("ex-dtype", EX + ["--dtype", "fp64"], "invalid choice", None, None),
    # runtime sample: the model
    ("rs-missing", ["runtime", "sample", "--model", "{T}/nope", "--out", "{T}/out"], "no such file", None, None),
    ("rs-ckpt-as-ort", ["runtime", "sample", "--model", "{B}/ck", "--backend", "ort", "--out", "{T}/out"], "not an export directory", None, None),
    ("rs-manifest-not-json", SAMPLE_T, "manifest.json: not valid JSON", _write("onnx", "manifest.json", b"{"), None),
    ("rs-manifest-list", SAMPLE_T, "manifest.json: field '<top level>'", _write("onnx", "manifest.json", b"[]"), None),
    ("rs-manifest-no-config", SAMPLE_T, "field 'config'", _edit_manifest(lambda d: d.pop("config") and None), None),
    ("rs-manifest-bad-files", SAMPLE_T, "field 'files'", _edit_manifest(lambda d: d.update(files=[1])), None),
    ("rs-manifest-path-escape", SAMPLE_T, "plain file names", _edit_manifest(lambda d: d["files"].update({"../x": {"sha256": "0"}})), None),
    ("rs-manifest-edited", SAMPLE_T, "does not match its checksum", _edit_json("onnx", "manifest.json", lambda d: d["graph"].update(dtype="fp16")), None),
    ("rs-manifest-hash-zeroed", SAMPLE_T, "model.onnx: content differs", _edit_manifest(lambda d: d["files"]["model.onnx"].update(sha256="0" * 64)), None),
    ("rs-onnx-bit-flip", SAMPLE_T, "model.onnx: content differs", _mutate("onnx", "model.onnx", _flip), None),
    ("rs-weights-bit-flip", SAMPLE_T, "model.safetensors: content differs", _mutate("onnx", "model.safetensors", _flip), None),
    ("rs-onnx-missing", SAMPLE_T, "model.onnx: listed in manifest.json but missing", lambda t, b: (_copy("onnx")(t, b), (t / "onnx" / "model.onnx").unlink()), None),
    ("rs-manifest-config-disagrees", SAMPLE_T, "disagrees with the config stored", _edit_manifest(lambda d: d["config"].update(num_classes=2)), None),
    ("rs-manifest-config-huge", SAMPLE_T, "input_size=1099511627776", _edit_manifest(lambda d: d["config"].update(input_size=2 ** 40)), None),
    ("rs-manifest-metadata-list", SAMPLE_T, "field 'metadata' is list", _edit_manifest(lambda d: d.update(metadata=[1, 2])), None),
    ("rs-truncated-onnx-rehashed", SAMPLE_T, "ONNX Runtime cannot load", None, "truncate_onnx"),
    ("rs-truncated-data-rehashed", SAMPLE_T, "model.onnx: ONNX Runtime cannot load", _truncate_data, None),
    ("rs-data-outside-dir", SAMPLE_T, "model.onnx: ONNX Runtime cannot load", _data_outside, None),
    # runtime sample: flags
    ("rs-class-high", SAMPLE + ["--classes", "3"], r"--classes 3: outside \[0, 3\)", None, None),
    ("rs-class-neg", SAMPLE + ["--classes", "-1"], "--classes -1", None, None),
    ("rs-num-zero", SAMPLE + ["--num", "0"], "--num 0: must be from 1", None, None),
    ("rs-num-huge", SAMPLE + ["--num", "100000000000"], "--num 100000000000: must be from 1", None, None),
    ("rs-batch-zero", SAMPLE + ["--batch-size", "0"], "--batch-size 0", None, None),
    ("rs-batch-huge", SAMPLE + ["--batch-size", "1000000000"], "--batch-size 1000000000", None, None),
    ("rs-steps-zero", SAMPLE + ["--steps", "0"], "--steps 0", None, None),
    ("rs-steps-5000", SAMPLE + ["--steps", "5000"], "--steps 5000: must be an integer from 1 to 1000", None, None),
    ("rs-steps-ddim37", SAMPLE + ["--steps", "37"], "no integer stride.*use", None, None),
    ("rs-cfg-inf", SAMPLE + ["--cfg-scale", "inf"], "--cfg-scale inf: must be a number from -10000 to 10000", None, None),
    ("rs-cfg-nan", SAMPLE + ["--cfg-scale", "nan"], "--cfg-scale nan", None, None),
    ("rs-eta-nan", SAMPLE + ["--eta", "nan"], "--eta nan: must be a number from 0 to 100", None, None),
    ("rs-eta-neg", SAMPLE + ["--eta", "-1"], "--eta -1", None, None),
    ("rs-seed-neg", SAMPLE + ["--seed", "-1"], "--seed -1: must be a non-negative integer", None, None),
    ("rs-threads-neg", SAMPLE + ["--threads", "-4"], "--threads -4", None, None),
    ("rs-sampler", SAMPLE + ["--sampler", "euler"], "--sampler 'euler'", None, None),
    ("rs-diffusers-bogus", SAMPLE + ["--sampler", "diffusers:Nope"], "not a diffusers scheduler", None, None),
    ("rs-cfg-mode-folded", ["runtime", "sample", "--model", "{B}/onnx_cfg", "--out", "{T}/out", "--cfg-mode", "official"], "folded in", None, None),
    ("rs-uncond-classes", SAMPLE + ["--uncond", "--classes", "1"], "exclude each other", None, None),
    ("rs-imagenet-1000", SAMPLE + ["--imagenet-ids", "--classes", "1000"], "--imagenet-ids maps ImageNet ids to the labels of the official 1000-class release", None, None),
    ("rs-latents-missing", SAMPLE + ["--latents", "{T}/none.npy"], "--latents .*none.npy: file not found", None, None),
    ("rs-latents-shape", SAMPLE + ["--latents", "{T}/l.npy"], "--latents has shape", lambda t, b: np.save(t / "l.npy", np.zeros((2, 2))), None),
    ("rs-latents-pickle", SAMPLE + ["--latents", "{T}/p.npy"], "--latents .*p.npy: holds Python objects", lambda t, b: np.save(t / "p.npy", np.array([{}], dtype=object)), None),
    ("rs-vae-bogus", SAMPLE + ["--vae", "{T}/novae"], "--vae", None, None),
    ("rs-trt-no-plan", SAMPLE + ["--backend", "trt"], "no TensorRT plan", None, None),
    ("rs-device-cuda", ["runtime", "sample", "--model", "{B}/ck", "--out", "{T}/out", "--device", "cuda"], "no CUDA device|--device", None, None),
    ("rs-dtype", SAMPLE + ["--dtype", "fp64"], "invalid choice", None, None),
    # runtime sample: the output directory
    ("rs-out-file", ["runtime", "sample", "--model", "{B}/onnx", "--out", "{T}/f"], "exists and is not a directory", _file("f", b"x"), None),
    ("rs-out-long", ["runtime", "sample", "--model", "{B}/onnx", "--out", "{T}/" + LONG], "255-byte limit", None, None),
    ("rs-out-foreign", SAMPLE, "not a sample directory", lambda t, b: ((t / "out").mkdir(), (t / "out" / "notes.txt").write_text("x")), None),
    ("rs-out-other-run", SAMPLE + ["--steps", "3", "--num", "2"], "different run .*steps 2 -> 3", _sample_run, None),
    ("rs-out-readonly", SAMPLE, "read-only filesystem", None, _readonly),
    ("rs-disk-full", SAMPLE + ["--steps", "2", "--num", "1"], "no space left", None, _disk_full),
    # runtime build-engine
    ("be-no-tensorrt", BUILD, "TensorRT's Python package is not installed", lambda t, b: (t / "lib.so").write_bytes(b"x"), "no_tensorrt"),
    ("be-missing-plugin", BUILD, "plugin library .*lib.so not found|lib.so", None, "no_tensorrt"),
    ("be-missing-onnx", ["runtime", "build-engine", "{T}/nothing", "--plugin", "{T}/lib.so"], "no model.onnx here", None, None),
    ("be-tampered-export", ["runtime", "build-engine", "{T}/onnx", "--plugin", "{T}/lib.so"], "content differs", _mutate("onnx", "model.onnx", _flip), None),
    ("be-min-zero", BUILD + ["--min-batch", "0"], "--min-batch 0: must be from 1", None, "no_tensorrt"),
    ("be-min-gt-opt", BUILD + ["--min-batch", "8", "--opt-batch", "4"], "min <= opt <= max", None, "no_tensorrt"),
    ("be-workspace-zero", BUILD + ["--workspace-gib", "0"], "--workspace-gib 0.0: must be a number of GiB above 0", None, "no_tensorrt"),
    ("be-workspace-nan", BUILD + ["--workspace-gib", "nan"], "--workspace-gib nan: must be a number of GiB above 0", None, "no_tensorrt"),
    ("be-batch-word", BUILD + ["--max-batch", "many"], "invalid int value", None, None),
    # terdit.train
    ("tr-steps-zero", TRAIN + ["--steps", "0"], "--steps 0: must be an integer from 1", _latents, None),
    ("tr-batch-zero", TRAIN + ["--global-batch", "0"], "--global-batch 0", _latents, None),
    ("tr-lr-nan", TRAIN + ["--lr", "nan"], "--lr nan", _latents, None),
    ("tr-lr-neg", TRAIN + ["--lr", "-1"], "--lr -1", _latents, None),
    ("tr-threads-neg", TRAIN + ["--threads", "-4"], "--threads -4", _latents, None),
    ("tr-seed-neg", TRAIN + ["--seed", "-1"], "--seed -1", _latents, None),
    ("tr-ema-high", TRAIN + ["--ema-decay", "1.5"], "--ema-decay 1.5", _latents, None),
    ("tr-dropout-one", TRAIN + ["--class-dropout", "1"], "--class-dropout 1", _latents, None),
    ("tr-warmup-long", TRAIN + ["--warmup-steps", "100"], "--warmup-steps 100", _latents, None),
    ("tr-min-lr", TRAIN + ["--min-lr-ratio", "2"], "--min-lr-ratio 2", _latents, None),
    ("tr-grad-clip", TRAIN + ["--grad-clip", "0"], "--grad-clip 0", _latents, None),
    ("tr-sample-cfg-inf", TRAIN + ["--sample-cfg-scale", "inf"], "--sample-cfg-scale inf", _latents, None),
    ("tr-config-missing", TRAIN + ["--model-config", "{T}/none.json"], "--model-config .*none.json: file not found", _latents, None),
    ("tr-config-bad", TRAIN + ["--model-config", "{T}/m.json"], "m.json: not valid JSON", all_of(_latents, _file("m.json", b"{")), None),
    ("tr-config-field", TRAIN + ["--model-config", "{T}/m.json"], "m.json: unknown config field", all_of(_latents, _file("m.json", b'{"wings": 2}')), None),
    ("tr-config-layers", TRAIN + ["--model-config", "{T}/m.json"], "n_layers=1000000", all_of(_latents, _file("m.json", b'{"n_layers": 1000000}')), None),
    ("tr-folder-no-path", ["train", "--data", "folder", "--out", "{T}/run"], "needs a path", None, None),
    ("tr-folder-missing", ["train", "--data", "folder", "--data-path", "{T}/none", "--out", "{T}/run"], "does not exist", None, None),
    ("tr-latents-missing", TRAIN, "lat.npy does not exist", None, None),
    ("tr-latents-no-labels", TRAIN, "labels file", lambda t, b: np.save(t / "lat.npy", np.zeros((4, 4, 8, 8), np.float32)), None),
    ("tr-tiny-on-fmnist", ["train", "--model", "TerDiT-tiny", "--out", "{T}/run", "--data-path", "{T}/nofm"], "apt-get install dataset-fashion-mnist", None, None),
    ("tr-init-missing", TRAIN + ["--init-from", "{T}/none"], "no such file", _latents, None),
    ("tr-init-ternary", TRAIN + ["--init-from", "{B}/ck"], "does not match|ternary", _latents, None),
    ("tr-resume-none", TRAIN + ["--resume", "latest"], "start without --resume", _latents, None),
    ("tr-resume-dir", TRAIN + ["--resume", "{T}/nodir"], "--resume .*nodir.*missing", _latents, None),
    ("tr-out-file", TRAIN[:-4] + ["--out", "{T}/f"], "not a directory|exists", all_of(_latents, _file("f", b"x")), None),
    ("tr-has-checkpoints", TRAIN, "already holds checkpoints", all_of(_latents, _checkpoints), None),
    ("tr-resume-changed", TRAIN + ["--resume", "latest", "--lr", "0.1"], "--lr 0.0005 -> 0.1", all_of(_latents, _checkpoints), None),
    # terdit.evaluate
    ("ev-samples-missing", EVAL + ["--samples", "{T}/none.npz"], "not one of|file not found", None, None),
    ("ev-npz-truncated", EVAL + ["--samples", "{T}/cut.npz"], "cut.npz: not a readable .npz", lambda t, b: (t / "cut.npz").write_bytes((b / "good.npz").read_bytes()[:200]), None),
    ("ev-npz-no-arr0", EVAL + ["--samples", "{T}/x.npz"], "no arr_0", lambda t, b: np.savez(t / "x.npz", x=np.zeros(3)), None),
    ("ev-npz-float", EVAL + ["--samples", "{T}/x.npz"], "arr_0 is float", lambda t, b: np.savez(t / "x.npz", np.zeros((2, 8, 8, 3))), None),
    ("ev-npz-pickle", EVAL + ["--samples", "{T}/x.npz"], "x.npz: arr_0: holds Python objects", lambda t, b: np.savez(t / "x.npz", np.array([{}], dtype=object)), None),
    ("ev-ref-missing", ["evaluate", "metrics", "--samples", "{B}/good.npz", "--ref", "{T}/none"], "not one of|fid-helper", None, None),
    ("ev-ref-count-one", ["evaluate", "metrics", "--samples", "{B}/good.npz", "--ref", "{B}/good.npz", "--ref-count", "1"], "at least 2|fid-helper", None, None),
    ("ev-classifier-missing", EVAL + ["--samples", "{B}/good.npz", "--classifier", "{T}/c.st"], "classifier .*not found", None, None),
    ("ev-classifier-garbage", EVAL + ["--samples", "{B}/good.npz", "--classifier", "{T}/c.st"], "not a classifier", _file("c.st", b"garbage"), None),
    ("ev-model-missing", EVAL + ["--model", "{T}/none"], "no such file", None, None),
    ("ev-num-zero", EVAL + ["--model", "{B}/ck", "--num-images", "0"], "--num-images 0", None, None),
    ("ev-steps-zero", EVAL + ["--model", "{B}/ck", "--steps", "0"], "--steps 0", None, None),
    ("ev-cfg-nan", EVAL + ["--model", "{B}/ck", "--cfg-scale", "nan"], "--cfg-scale nan", None, None),
    ("ev-grid-no-labels", ["evaluate", "grid", "--samples", "{T}/x.npz", "--out", "{T}/g.png"], "no labels", lambda t, b: np.savez(t / "x.npz", np.zeros((2, 8, 8, 3), np.uint8)), None),
    ("ev-grid-per-class", ["evaluate", "grid", "--samples", "{B}/good.npz", "--out", "{T}/g.png", "--per-class", "9"], "fewer than --per-class 9", None, None),
    ("ev-plot-run", ["evaluate", "plot-losses", "--run", "nolabel", "--out", "{T}/p.png"], "expected LABEL=PATH", None, None),
    ("ev-threads", ["evaluate", "--threads", "-1", "metrics", "--samples", "{B}/good.npz"], "--threads -1", None, None),
    ("ev-classifier-data", ["evaluate", "train-classifier", "--out", "{T}/c.st", "--data-path", "{T}/nofm"], "apt-get install", None, None),
]


def _truncate_onnx(tmp, base, monkeypatch):
    shutil.copytree(base / "onnx", tmp / "onnx")
    path = tmp / "onnx" / "model.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    _reseal(tmp / "onnx")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_cleanly(case, base, tmp_path, capsys, monkeypatch):
    name, argv, pattern, setup, patch = case
    work = case_dir(tmp_path, base, setup)
    if patch == "truncate_onnx":
        _truncate_onnx(work, base, monkeypatch)
    elif patch == "no_tensorrt":
        monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)
    elif patch:
        patch(monkeypatch)
    before = tree_state(work)
    code, err = run_cli_case(argv, work, base, capsys)
    assert code == 2, (name, err)
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("error:") or ": error:" in last, err
    if not last.startswith("python -m") and ": error:" not in last:
        assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err
    import re
    assert re.search(pattern, err), (name, err)
    after = tree_state(work)
    added = sorted(set(after) - set(before))
    # nothing half-written, no temporary, no lock, no output directory of a refused run; a run
    # that fails mid-way (disk full) keeps what it finished, in the resumable layout
    allowed = {"out", "samples.json", "images", "latents", "written", "rank_0.jsonl"} \
        if name == "rs-disk-full" else set()
    assert all(Path(a).name in allowed for a in added), added
