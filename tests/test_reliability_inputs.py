"""Reliability, second pass: hostile inputs to `runtime sample`, `runtime build-engine`,
`terdit.evaluate` and the Python API, grouped by what they used to do wrong:

- a flag that its backend (or sampler) would ignore: refused, naming flag and backend;
- a count, size or file that is not bounded before work (--threads 1000000, .npy / .npz headers
  declaring huge arrays, FIFOs that block a reader);
- a traceback (diffusers schedulers of another interface, Ctrl-C, SIGTERM);
- a message that does not name the file or flag it is about.

Each CLI case ends with exit code 2 and one `error:` line naming the file / flag, no traceback,
no file of the user's changed (the fixture tree is hashed before and after) and nothing left
behind; each API case raises runtime.UserError with the CLI's text. Ctrl-C / SIGTERM end with
exit code 130 and one `interrupted:` line."""
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from exporter import ExportOptions, export
from tests.cases import assert_api_refused, assert_refused, fifo, mkdir, npy
from tests.helpers import case_dir, latent_checkpoint, pixel_checkpoint

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(log=lambda *_: None)
TINY_VAE = {"_class_name": "AutoencoderKL", "block_out_channels": [8, 16],
            "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2, "latent_channels": 4,
            "layers_per_block": 1, "norm_num_groups": 8, "in_channels": 3, "out_channels": 3}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A pixel model (checkpoint + export), a latent checkpoint (4 channels, for the VAE cases)
    and a good ADM .npz; cases only read them (they are hashed before and after each case)."""
    root = tmp_path_factory.mktemp("rel2")
    pixel_checkpoint(root / "ck", n_layers=1, class_names="abc")
    export(root / "ck", root / "onnx", ExportOptions(validate=False), **QUIET)
    latent_checkpoint(root / "lat")
    np.savez(root / "good.npz", np.zeros((6, 8, 8, 3), np.uint8), np.arange(6) % 3)
    return root


# ---- setups: (tmp, base) -> None; paths in argv use {T} (per case) and {B} (the fixture) ------

def _bytes(name, fn):
    def setup(tmp, base):
        (tmp / name).write_bytes(fn())
    return setup


def _npy_bytes(shape, dtype="<f4", data=b""):
    """An .npy file whose header declares `shape` and which holds `data` (maybe too little)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False,
                                               "shape": tuple(shape)})
    return buf.getvalue() + data


def _npz(name, members: dict):
    """An .npz (a stored zip) of raw .npy member bytes, headers as given."""
    def setup(tmp, base):
        with zipfile.ZipFile(tmp / name, "w", zipfile.ZIP_STORED) as zf:
            for member, data in members.items():
                zf.writestr(member + ".npy", data)
    return setup


def _vae(config=None, raw=None):
    """A VAE directory holding only config.json (`config` as JSON, or `raw` bytes)."""
    def setup(tmp, base):
        (tmp / "vae").mkdir()
        (tmp / "vae" / "config.json").write_bytes(
            raw if raw is not None else json.dumps(config).encode())
    return setup


def _plan(tmp, base):
    shutil.copytree(base / "onnx", tmp / "onnx")
    (tmp / "onnx" / "model.plan").write_bytes(b"plan")
    os.mkfifo(tmp / "lib.so")


def _copy_onnx(tmp, base):
    shutil.copytree(base / "onnx", tmp / "onnx")
    (tmp / "lib.so").write_bytes(b"x")


def _log(text):
    def setup(tmp, base):
        (tmp / "log.jsonl").write_text(text)
    return setup


SAMPLE = ["runtime", "sample", "--model", "{B}/onnx", "--out", "{T}/out", "--no-progress",
          "--num", "1", "--steps", "2"]
SAMPLE_CK = ["runtime", "sample", "--model", "{B}/ck", "--out", "{T}/out", "--no-progress",
             "--num", "1", "--steps", "2"]
LATENT = ["runtime", "sample", "--model", "{B}/lat", "--out", "{T}/out", "--no-progress",
          "--num", "1", "--steps", "2", "--vae", "{T}/vae"]
BUILD = ["runtime", "build-engine", "{B}/onnx", "--plugin", "{T}/lib.so", "-o", "{T}/m.plan"]
METRICS = ["evaluate", "metrics", "--ref", "none", "--samples"]
EV_MODEL = ["evaluate", "metrics", "--ref", "none", "--model", "{B}/ck", "--num-images", "1",
            "--steps", "2", "--no-progress"]
PLOT = ["evaluate", "plot-losses", "--out", "{T}/p.png", "--run", "a={T}/log.jsonl"]
TRAIN_CLS = ["evaluate", "train-classifier", "--out", "{T}/c.st"]
DIFF = "diffusers:"

# (id, argv, regex the error must match, setup or None)
CASES = [
    # 3. every flag acts or is refused for its backend / sampler
    ("w2a8-on-ort", SAMPLE + ["--w2a8"], r"--act-quant fp8 \(--w2a8\): --backend ort runs the export's own", None),
    ("act-quant-on-ort", SAMPLE + ["--act-quant", "int8"], r"--act-quant int8: --backend ort", None),
    ("dtype-on-ort", SAMPLE + ["--dtype", "bf16"], r"--dtype bf16: --backend ort does not use it", None),
    ("device-on-ort", SAMPLE + ["--device", "cpu"], r"--device cpu: --backend ort does not use it", None),
    ("no-compile-on-ort", SAMPLE + ["--no-compile"], r"--no-compile: --backend ort does not use it", None),
    ("no-cuda-graphs-on-ort", SAMPLE + ["--no-cuda-graphs"], r"--no-cuda-graphs: --backend ort", None),
    ("plugin-on-ort", SAMPLE + ["--plugin", "{T}/lib.so"], r"--plugin \S*lib.so: --backend ort does not use it.*--backend trt", None),
    ("kernels-on-torch", SAMPLE_CK + ["--kernels", "native"], r"--kernels native: --backend torch does not use it.*--backend ort", None),
    ("plugin-on-torch", SAMPLE_CK + ["--plugin", "{T}/lib.so"], r"--plugin \S*: --backend torch", None),
    ("threads-on-trt", SAMPLE + ["--backend", "trt", "--threads", "2"], r"--threads 2: --backend trt does not use it", None),
    ("dtype-on-trt", SAMPLE + ["--backend", "trt", "--dtype", "fp16"], r"--dtype fp16: --backend trt.*build-engine --fp16", None),
    ("device-on-trt", SAMPLE + ["--backend", "trt", "--device", "cuda:1"], r"--device cuda:1: --backend trt.*CUDA_VISIBLE_DEVICES", None),
    ("kernels-on-trt", SAMPLE + ["--backend", "trt", "--kernels", "auto"], r"--kernels auto: --backend trt", None),
    ("vae-on-pixel-model", SAMPLE + ["--vae", "{T}/vae"], r"--vae \S*vae: .*pixel-space model.*drop --vae", mkdir("vae")),
    ("imagenet-ids-alone", SAMPLE + ["--imagenet-ids"], r"--imagenet-ids maps the ids given with --classes", None),
    ("uncond-with-cfg", SAMPLE + ["--uncond", "--cfg-scale", "3"], r"--uncond and --cfg-scale exclude each other", None),
    ("uncond-with-imagenet", SAMPLE + ["--uncond", "--imagenet-ids"], r"--uncond and --imagenet-ids", None),
    ("eta-with-ddpm", SAMPLE + ["--sampler", "ddpm", "--eta", "0.5"], r"--eta 0.5: --sampler ddpm has no eta", None),
    ("eta-with-dpm-solver", SAMPLE + ["--sampler", "dpm-solver", "--eta", "1"], r"--eta 1.0: --sampler dpm-solver has no eta", None),
    ("eta-with-euler", SAMPLE + ["--sampler", DIFF + "EulerDiscreteScheduler", "--eta", "0.3"], r"--eta 0.3: --sampler diffusers:EulerDiscreteScheduler has no eta", None),
    ("clip-with-diffusers", SAMPLE + ["--sampler", DIFF + "DDIMScheduler", "--clip-denoised"], r"--clip-denoised: --sampler diffusers:DDIMScheduler does not clamp", None),
    ("ev-steps-with-samples", METRICS + ["{B}/good.npz", "--steps", "20"], r"--steps: only used to sample from --model; the --samples images are already made: drop --steps", None),
    ("ev-save-with-samples", METRICS + ["{B}/good.npz", "--save-samples", "{T}/s.npz"], r"--save-samples: only used to sample from --model", None),
    ("ev-eta-with-ddpm", EV_MODEL + ["--sampler", "ddpm", "--eta", "1"], r"--eta 1.0: --sampler ddpm has no eta", None),
    # 4. bounded before work
    ("threads-1e6-ort", SAMPLE + ["--threads", "1000000"], r"--threads 1000000: must be an integer from 0 .* to 1024", None),
    ("threads-1e6-torch", SAMPLE_CK + ["--threads", "1000000"], r"--threads 1000000: must be", None),
    ("ev-threads-1e6", ["evaluate", "--threads", "1000000"] + METRICS[1:] + ["{B}/good.npz"], r"--threads 1000000: must be", None),
    ("latents-fifo", SAMPLE + ["--latents", "{T}/l.npy"], r"--latents \S*l.npy: not a regular file \(a FIFO", fifo("l.npy")),
    ("latents-dir", SAMPLE + ["--latents", "{T}/l.npy"], r"--latents \S*l.npy: not a regular file \(a directory\)", mkdir("l.npy")),
    ("latents-empty", SAMPLE + ["--latents", "{T}/l.npy"], r"--latents \S*l.npy: not an .npy array \(its header: EOF", _bytes("l.npy", lambda: b"")),
    ("latents-truncated", SAMPLE + ["--latents", "{T}/l.npy"], r"--latents \S*l.npy: .*declares 256 bytes of data, the file holds 10; it is truncated", _bytes("l.npy", lambda: _npy_bytes((1, 1, 8, 8), data=b"0123456789"))),
    ("latents-huge-header", SAMPLE + ["--latents", "{T}/l.npy"], r"--latents \S*l.npy: its header declares shape \(1000000000, 1, 8, 8\), 238.4 GiB, more than the limit", _bytes("l.npy", lambda: _npy_bytes((10**9, 1, 8, 8)))),
    ("latents-int", SAMPLE + ["--latents", "{T}/l.npy"], r"--latents \S*l.npy: dtype int64, expected a float array", npy("l.npy", np.zeros((1, 1, 8, 8), np.int64))),
    ("npz-fifo", METRICS + ["{T}/s.npz"], r"--samples \S*s.npz: not a regular file \(a FIFO", fifo("s.npz")),
    ("npz-2e6-images", METRICS + ["{T}/s.npz"], r"s.npz: arr_0 holds 2000000 images; expected 1 .. 1000000", _npz("s.npz", {"arr_0": _npy_bytes((2_000_000, 1, 1, 1), "|u1", bytes(2_000_000))})),
    ("npz-huge-sides", METRICS + ["{T}/s.npz"], r"s.npz: arr_0 images are 5000x1; each side must be from 1 to 4096", _npz("s.npz", {"arr_0": _npy_bytes((2, 5000, 1, 3), "|u1", bytes(30000))})),
    ("npz-header-vs-zip", METRICS + ["{T}/s.npz"], r"s.npz: arr_0: its header declares 768 bytes of data, the archive declares 3", _npz("s.npz", {"arr_0": _npy_bytes((4, 8, 8, 3), "|u1", b"abc")})),
    ("npz-label-negative", METRICS + ["{T}/s.npz"], r"s.npz: arr_1 holds label -3", lambda t, b: np.savez(t / "s.npz", np.zeros((2, 8, 8, 3), np.uint8), np.array([0, -3]))),
    ("grid-label-1e9", ["evaluate", "grid", "--samples", "{T}/s.npz", "--out", "{T}/g.png"], r"s.npz: arr_1 holds label 1000000000", lambda t, b: np.savez(t / "s.npz", np.zeros((2, 8, 8, 3), np.uint8), np.array([0, 10**9]))),
    ("ev-image-size-1e5", METRICS + ["{B}/good.npz", "--image-size", "100000"], r"--image-size 100000: must be from 28 to 4096 pixels", None),
    ("ev-per-class-zero", ["evaluate", "grid", "--samples", "{B}/good.npz", "--out", "{T}/g.png", "--per-class", "0"], r"--per-class 0: must be from 1", None),
    ("ev-ref-count-zero", ["evaluate", "metrics", "--samples", "{B}/good.npz", "--ref", "{B}/good.npz", "--ref-count", "0"], r"--ref-count 0: must be from 2", None),
    ("ev-smooth-zero", PLOT + ["--smooth", "0"], r"--smooth 0: must be from 1", _log('{"step": 1, "loss": 1.0}\n')),
    ("ev-epochs-1e9", TRAIN_CLS + ["--epochs", "1000000000"], r"--epochs 1000000000: must be an integer from 1 to 10000", None),
    ("ev-lr-nan", TRAIN_CLS + ["--lr", "nan"], r"--lr nan: must be a finite number > 0", None),
    ("be-max-batch-1e8", BUILD + ["--max-batch", "100000000"], r"--max-batch 100000000: must be from 1 to 65536 images", None),
    ("be-workspace-inf", BUILD + ["--workspace-gib", "inf"], r"--workspace-gib inf: must be a number of GiB above 0 and at most 1024", None),
    # 5. no traceback: schedulers of another interface, other exception types
    ("diffusers-vq", SAMPLE + ["--sampler", DIFF + "VQDiffusionScheduler"], r"--sampler diffusers:VQDiffusionScheduler: its constructor needs num_vec_classes", None),
    ("diffusers-flow-match", SAMPLE + ["--sampler", DIFF + "FlowMatchEulerDiscreteScheduler"], r"--sampler diffusers:FlowMatchEulerDiscreteScheduler: it does not take the IDDPM beta schedule", None),
    ("diffusers-inverse", SAMPLE + ["--sampler", DIFF + "DDIMInverseScheduler"], r"an inversion scheduler.*use diffusers:DDIMScheduler", None),
    ("diffusers-step-args", SAMPLE + ["--sampler", DIFF + "CogVideoXDPMScheduler"], r"its step\(\) also needs old_pred_original_sample", None),
    ("diffusers-config-refused", SAMPLE + ["--sampler", DIFF + "UnCLIPScheduler"], r"--sampler diffusers:UnCLIPScheduler: diffusers cannot run it on the IDDPM schedule", None),
    ("diffusers-path", SAMPLE + ["--sampler", DIFF + "../Scheduler"], r"--sampler diffusers:\.\./Scheduler: not a diffusers scheduler class", None),
    ("ev-diffusers-amused", EV_MODEL + ["--sampler", DIFF + "AmusedScheduler"], r"AmusedScheduler: its constructor needs mask_token_id", None),
    ("ev-log-not-json", PLOT, r"log.jsonl:2: not valid JSON", _log('{"step": 1, "loss": 1.0}\n{\n')),
    ("ev-log-list-row", PLOT, r"log.jsonl:1: a JSON list, expected an object", _log("[1, 2]\n")),
    ("ev-log-loss-text", PLOT, r"log.jsonl:1: a row with a loss needs numbers for 'step' and 'loss'", _log('{"step": 1, "loss": "low"}\n')),
    ("ev-log-not-utf8", PLOT, r"log.jsonl: not UTF-8", _bytes("log.jsonl", lambda: b'{"a": "\xff"}\n')),
    # 7. messages name the thing
    ("model-fifo", ["runtime", "sample", "--model", "{T}/m", "--out", "{T}/out"], r"--model \S*/m: not a regular file \(a FIFO", fifo("m")),
    ("trt-plugin-fifo", ["runtime", "sample", "--model", "{T}/onnx", "--backend", "trt", "--plugin", "{T}/lib.so", "--out", "{T}/out"], r"--plugin \S*lib.so: not a regular file \(a FIFO", _plan),
    ("vae-config-not-json", LATENT, r"--vae \S*vae/config.json: not valid JSON \(Expecting property name", _vae(raw=b"{")),
    ("vae-config-list", LATENT, r"--vae \S*vae: config.json: holds a JSON list", _vae([1])),
    ("vae-config-other-class", LATENT, r"config.json: _class_name is 'UNet2DModel', not AutoencoderKL", _vae({**TINY_VAE, "_class_name": "UNet2DModel"})),
    ("vae-config-huge", LATENT, r"config.json: block_out_channels=\[100000, 100000\]: must be", _vae({**TINY_VAE, "block_out_channels": [100000, 100000]})),
    ("vae-latent-channels", LATENT, r"config.json: latent_channels=8, but the model's latents have 4", _vae({**TINY_VAE, "latent_channels": 8})),
    ("vae-no-weights", LATENT, r"--vae \S*vae: diffusers cannot load this AutoencoderKL directory \(OSError", _vae(TINY_VAE)),
    ("vae-no-config", LATENT, r"--vae \S*vae/config.json: file not found", mkdir("vae")),
    ("vae-onnx-fifo", LATENT[:-1] + ["{T}/v.onnx"], r"--vae \S*v.onnx: not a regular file \(a FIFO", fifo("v.onnx")),
    ("be-plugin-fifo", BUILD, r"--plugin \S*lib.so: not a regular file \(a FIFO", fifo("lib.so")),
    ("be-onnx-fifo", ["runtime", "build-engine", "{T}/x.onnx", "--plugin", "{T}/lib.so"], r"\S*x.onnx: not a regular file \(a FIFO", fifo("x.onnx")),
    ("be-output-is-input", ["runtime", "build-engine", "{T}/onnx", "--plugin", "{T}/lib.so", "-o", "{T}/onnx/model.safetensors"], r"-o \S*model.safetensors: is the input EXPORT_DIR/model.safetensors", _copy_onnx),
    ("be-output-dir", ["runtime", "build-engine", "{T}/onnx", "--plugin", "{T}/lib.so", "-o", "{T}"], r"-o \S*: \S* is a directory; pass the .plan file to write", _copy_onnx),
    ("ev-out-is-input", METRICS + ["{T}/s.npz", "--out", "{T}/s.npz"], r"--out \S*s.npz: is the input --samples \S*s.npz; writing it would change the input", lambda t, b: shutil.copy(b / "good.npz", t / "s.npz")),
    ("ev-classifier-fifo", METRICS + ["{B}/good.npz", "--classifier", "{T}/c.st"], r"--classifier \S*c.st: not a regular file \(a FIFO", fifo("c.st")),
    ("ev-model-fifo", ["evaluate", "metrics", "--ref", "none", "--model", "{T}/m"], r"--model \S*/m: not a regular file \(a FIFO", fifo("m")),
    ("ev-log-missing", PLOT, r"--run \S*log.jsonl: file not found", None),
    ("ev-log-fifo", PLOT, r"--run \S*log.jsonl: not a regular file \(a FIFO", fifo("log.jsonl")),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_refused_in_one_line(case, base, tmp_path, capsys):
    name, argv, pattern, setup = case
    work = case_dir(tmp_path, base, setup)
    assert_refused(name, argv, pattern, work, base, capsys)


# ---- the Python API: one exception type, the CLI's text ---------------------------------------

def _pipe(base, **kw):
    from runtime import TerDiTPipeline
    return TerDiTPipeline.from_pretrained(base / "onnx", **kw)


API_CASES = [
    ("empty-labels", lambda b: _pipe(b)([]), r"class_labels is empty"),
    ("string-labels", lambda b: _pipe(b)("a"), r"class_labels='a' is a string; pass a list"),
    ("int-labels", lambda b: _pipe(b)(2), r"class_labels=2: pass a list"),
    ("unhashable-label", lambda b: _pipe(b)([[1]]), r"class \[1\] is not one of this model's"),
    ("imagenet-name", lambda b: _pipe(b)(["a"], imagenet_ids=True), r"imagenet_ids=True maps ImageNet ids to the labels of the official 1000-class release"),
    ("unknown-kwarg", lambda b: _pipe(b, colour=1), r"unknown backend option colour=1"),
    ("kwarg-wrong-backend", lambda b: _pipe(b, dtype="bf16"), r"--dtype bf16: --backend ort does not use it"),
    ("vae-on-pixel", lambda b: _pipe(b, vae="x"), r"--vae x: .*pixel-space model"),
    ("path-none", lambda b: __import__("runtime").TerDiTPipeline.from_pretrained(None), r"model=None"),
    ("sampler-vq", lambda b: _pipe(b)([0], sampler=DIFF + "VQDiffusionScheduler"), r"needs num_vec_classes"),
    ("steps-zero", lambda b: _pipe(b)([0], num_inference_steps=0), r"--steps 0: must be an integer"),
    ("output-type", lambda b: _pipe(b)([0], output_type="tensor"), r"output_type='tensor' is not one of"),
    ("compile-not-bool", lambda b: __import__("runtime").TerDiTPipeline.from_pretrained(b / "ck", compile="no"), r"--no-compile: .*must be True or False"),
    ("kernels-on-torch", lambda b: __import__("runtime").TerDiTPipeline.from_pretrained(b / "ck", kernels="auto"), r"--kernels auto: --backend torch does not use it"),
]


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_raises_one_type(case, base):
    assert_api_refused(*case, base)


def test_api_text_is_the_cli_text(base, tmp_path, capsys):
    from runtime import UserError
    from runtime.runtime_cli import main
    for kw, flags in (({"dtype": "bf16"}, ["--dtype", "bf16"]), ({"threads": 10**6},
                                                                 ["--threads", "1000000"])):
        with pytest.raises(UserError) as info:
            _pipe(base, **kw)
        capsys.readouterr()
        assert main(["sample", "--model", str(base / "onnx"), "--out", str(tmp_path / "o"),
                     *flags]) == 2
        assert capsys.readouterr().err.strip() == f"error: {info.value}"


# ---- Ctrl-C and SIGTERM -----------------------------------------------------------------------

def _interrupt_in(monkeypatch, how):
    import runtime.pipeline

    def run(*a, **k):
        if how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)                                  # the handler raises before this ends
        raise KeyboardInterrupt
    monkeypatch.setattr(runtime.pipeline.TerDiTPipeline, "run", run)


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupt_in_process(how, base, tmp_path, capsys, monkeypatch):
    from runtime.runtime_cli import main
    _interrupt_in(monkeypatch, how)
    previous = signal.getsignal(signal.SIGTERM)
    capsys.readouterr()
    t0 = time.time()
    code = main(["sample", "--model", str(base / "onnx"), "--out", str(tmp_path / "o"),
                 "--num", "1", "--steps", "2", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 130 and time.time() - t0 < 5, err
    assert err.splitlines()[-1] == "interrupted: run the same command to resume"
    assert "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) is previous         # the handler is restored


def test_evaluate_interrupt_in_process(base, capsys, monkeypatch):
    import terdit.evaluate.evaluate_cli as evaluate

    def stop(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(evaluate, "load_image_set", stop)
    capsys.readouterr()
    assert evaluate.main(METRICS[1:] + [str(base / "good.npz")]) == 130
    assert capsys.readouterr().err.strip() == ("interrupted: nothing was written; run the same "
                                               "command again")


def test_sigterm_to_a_running_sample(base, tmp_path):
    """A real SIGTERM to `python -m runtime sample` mid-run: exit code 130, one line, no
    traceback, no temporary file left (resuming is tests/test_reliability.py's)."""
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "runtime", "sample", "--model", str(base / "onnx"), "--out",
           str(out), "--num", "40", "--steps", "1000", "--batch-size", "1", "--no-progress",
           "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (out / "samples.json").exists() and time.time() < deadline:
            time.sleep(0.05)
        assert (out / "samples.json").exists(), "the run did not start"
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted: run the same command to resume"
    assert "Traceback" not in err
    assert not [p for p in out.rglob("*") if p.name.endswith((".tmp", ".partial", ".old"))]
