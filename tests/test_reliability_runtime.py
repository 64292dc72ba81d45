"""Reliability, second pass: what the first tables did not try, for `runtime sample`,
`runtime build-engine`, the exporter and the Python API (the trainer's cases are in
test_reliability_train.py, terdit.evaluate's in test_reliability_evaluate.py), by class:

1. data loss: a lock file that is a hard link or holds a file of the user's, an input inside the
   output (--latents), an entry of our name but another kind (a directory named model.plan);
2. integrity: an export stripped of its manifest and model.onnx still read as a checkpoint, a
   vae_decoder.onnx the manifest does not list, build-engine on a manifest-less model.onnx;
3. silently wrong output: --cfg-mode without guidance, --seed with --latents and a sampler that
   draws no noise, a resume on another TernaryMatMul path, a changed image taken as resumed;
4. bounds: torchrun variables (WORLD_SIZE, RANK) out of range;
7. messages: an unloadable --vae names the flag; --out is checked before the model is opened.

Each CLI case ends with exit code 2 and one `error:` line naming the file or flag, no traceback,
nothing of the user's changed and nothing added (the case's tree and the shared fixtures are
hashed before and after); each API case raises runtime.UserError."""
import os
import shutil

import numpy as np
import pytest

from exporter import ExportOptions, export
from tests.cases import (assert_api_refused, assert_refused, copy, edit_json, flip, hard_link,
                         npy, other_run, remove, write)
from tests.helpers import all_of, case_dir, latent_checkpoint, pixel_checkpoint, run_cli_case

QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A pixel checkpoint and its export, a latent model's export without a VAE, a finished
    one-image ort run of the pixel export and one latent for it; cases only read them."""
    root = tmp_path_factory.mktemp("rel-runtime")
    pixel_checkpoint(root / "ck", n_layers=1, class_names="abc")
    export(root / "ck", root / "onnx", ExportOptions(validate=False), **QUIET)
    latent_checkpoint(root / "latck")
    export(root / "latck", root / "latonnx", ExportOptions(validate=False), **QUIET)
    from runtime.runtime_cli import main
    assert main(["sample", "--model", str(root / "onnx"), "--out", str(root / "run"), "--num",
                 "2", "--steps", "2", "--no-progress"]) == 0
    np.save(root / "l.npy", np.zeros((1, 1, 8, 8), np.float32))
    return root


def _user_png(rel):
    def setup(tmp, base):
        from PIL import Image
        Image.new("L", (8, 8), 200).save(tmp / rel)
    return setup


SAMPLE = ["runtime", "sample", "--model", "{B}/onnx", "--out", "{T}/out", "--no-progress",
          "--num", "1", "--steps", "2"]
RESUME = ["runtime", "sample", "--model", "{B}/onnx", "--out", "{T}/run", "--no-progress",
          "--num", "2", "--steps", "2"]
EX = ["exporter", "{B}/ck", "-o", "{T}/o", "--no-validate"]
STRIPPED = ("onnx/manifest.json", "onnx/model.onnx")

# (id, argv, regex the error line must match, setup or None, environment or None)
CASES = [
    # 1. we write, truncate or delete only what we created
    ("rs-lock-hard-link", SAMPLE, r"\.terdit\.lock: has 2 names \(a hard link", hard_link("out/.terdit.lock"), None),
    ("rs-lock-user-file", SAMPLE, r"\.terdit\.lock: holds 13 bytes that are not a lock record", write("out/.terdit.lock", b"my notes here"), None),
    ("ex-lock-hard-link", EX, r"\.o\.lock: has 2 names \(a hard link", hard_link(".o.lock"), None),
    ("ex-lock-user-file", EX, r"\.o\.lock: holds 13 bytes that are not a lock record", write(".o.lock", b"my notes here"), None),
    ("rs-latents-inside-out", SAMPLE + ["--latents", "{T}/out/l.npy", "--overwrite", "--seed", "1", "--sampler", "ddpm"], r"--out \S*out: contains the input --latents", lambda t, b: (t / "out").mkdir() or shutil.copy(b / "l.npy", t / "out"), None),
    ("rs-latents-is-out", SAMPLE[:5] + ["{T}/l.npy"] + SAMPLE[6:] + ["--latents", "{T}/l.npy"], r"--out \S*l.npy: (is the input --latents|exists and is not a directory)", copy("l.npy"), None),
    ("ex-overwrite-plan-dir", EX + ["--overwrite"], r"-o \S*/o: holds model.plan \(a directory where this tool writes a file\)", all_of(copy("onnx"), lambda t, b: t.joinpath("onnx").rename(t / "o"), write("o/model.plan/mine.txt", b"mine")), None),
    ("ex-overwrite-manifest-link", EX + ["--overwrite"], r"-o \S*/o: holds manifest.json \(a symbolic link", all_of(copy("onnx"), lambda t, b: t.joinpath("onnx").rename(t / "o"), write("mine.json", b"{}"), lambda t, b: (t / "o" / "manifest.json").unlink() or os.symlink(t / "mine.json", t / "o" / "manifest.json")), None),
    ("rs-overwrite-grid-dir", RESUME + ["--overwrite"], r"run: grid.png is a directory where this tool writes a file, so it is not ours", all_of(copy("run"), remove("run/grid.png"), write("run/grid.png/mine.txt", b"mine")), None),
    # 2. an export is read only through its manifest, and only what it lists is used
    ("rs-stripped-export-vae", ["runtime", "sample", "--model", "{T}/onnx", "--backend", "torch", "--out", "{T}/out", "--num", "1", "--steps", "2"], r"onnx: holds vae_decoder.onnx but no manifest.json", all_of(copy("onnx"), remove(*STRIPPED), write("onnx/vae_decoder.onnx", b"x"), flip("onnx/model.safetensors")), None),
    ("rs-stripped-export-plan", ["runtime", "sample", "--model", "{T}/onnx", "--backend", "torch", "--out", "{T}/out", "--num", "1", "--steps", "2"], r"onnx: holds model.plan but no manifest.json", all_of(copy("onnx"), remove(*STRIPPED), write("onnx/model.plan", b"x"), flip("onnx/model.safetensors")), None),
    ("ex-stripped-export-data", ["exporter", "{T}/onnx", "-o", "{T}/o", "--no-validate"], r"onnx: holds model.onnx.data but no manifest.json", all_of(copy("onnx"), remove(*STRIPPED), write("onnx/model.onnx.data", b"x")), None),
    ("ev-stripped-export-plan", ["evaluate", "grid", "--model", "{T}/onnx", "--out", "{T}/g.png", "--steps", "2", "--per-class", "1"], r"onnx: holds model.plan but no manifest.json", all_of(copy("onnx"), remove(*STRIPPED), write("onnx/model.plan", b"x")), None),
    ("rs-unlisted-weight-data", ["runtime", "sample", "--model", "{T}/onnx", "--out", "{T}/out", "--num", "1", "--steps", "2"], r"onnx: holds w.bin, which its manifest.json does not list", all_of(copy("onnx"), write("onnx/w.bin", b"unverified weights")), None),
    ("be-unlisted-file", ["runtime", "build-engine", "{T}/onnx", "--plugin", "{T}/lib.so"], r"onnx: holds notes.txt, which its manifest.json does not list", all_of(copy("onnx"), write("onnx/notes.txt"), write("lib.so")), None),
    ("rs-unlisted-vae", ["runtime", "sample", "--model", "{T}/latonnx", "--out", "{T}/out", "--num", "1", "--steps", "2"], r"latonnx: holds vae_decoder.onnx, which its manifest.json does not list; an export is read only with the files it lists", all_of(copy("latonnx"), write("latonnx/vae_decoder.onnx", b"not verified")), None),
    ("be-model-onnx-without-manifest", ["runtime", "build-engine", "{T}/onnx/model.onnx", "--plugin", "{T}/lib.so"], r"onnx: holds model.onnx but no manifest.json", all_of(copy("onnx"), remove("onnx/manifest.json"), flip("onnx/model.onnx"), write("lib.so", b"x")), None),
    # 3. every flag acts or is refused; only what this run wrote is resumed
    ("rs-cfg-mode-without-guidance", SAMPLE + ["--cfg-scale", "1", "--cfg-mode", "official"], r"--cfg-mode 'official': has no effect with --cfg-scale 1", None, None),
    ("rs-seed-with-latents", SAMPLE + ["--latents", "{B}/l.npy", "--seed", "7"], r"--seed 7: has no effect with --latents and a sampler that draws no noise", None, None),
    ("rs-seed-with-latents-dpm", SAMPLE + ["--latents", "{B}/l.npy", "--seed", "7", "--sampler", "dpm-solver"], r"--seed 7: has no effect with --latents", None, None),
    ("rs-resume-other-kernels", RESUME, r"different run .*ternary_matmul terdit CPU kernels \(elsewhere\) ->", all_of(copy("run"), other_run("run/samples.json", lambda d: d["settings"].update(ternary_matmul="terdit CPU kernels (elsewhere)"))), None),
    ("rs-resume-edited-record", RESUME + ["--cfg-scale", "3"], r"samples.json does not match its checksum \(record_sha256\): it was edited", all_of(copy("run"), edit_json("run/samples.json", lambda d: d["settings"].update(cfg_scale=3.0))), None),
    ("rs-resume-user-image", RESUME, r"images/000001.png is not a file this run wrote", all_of(copy("run"), _user_png("run/images/000001.png")), None),
    ("rs-resume-unlogged-image", RESUME, r"images/000000.png is not a file this run wrote", all_of(copy("run"), remove("run/written/rank_0.jsonl")), None),
    ("rs-resume-old-format", RESUME, r"samples.json is version 1 of the run format .* cannot be resumed", all_of(copy("run"), other_run("run/samples.json", lambda d: d.update(version=1))), None),
    # 4. bounded before work
    ("rs-world-size-huge", SAMPLE, r"WORLD_SIZE='1000000': must be an integer from 0 to 65536", None, {"WORLD_SIZE": "1000000"}),
    ("rs-rank-beyond-world", SAMPLE, r"RANK=7: must be below WORLD_SIZE=2", None, {"WORLD_SIZE": "2", "RANK": "7"}),
    ("rs-local-rank-beyond", SAMPLE, r"LOCAL_RANK=3: must be below LOCAL_WORLD_SIZE=2", None, {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "3"}),
    # (second audit) a file of the user's that looks like ours, files an export does not list
    ("rs-lock-user-json", SAMPLE, r"\.terdit\.lock: holds \d+ bytes that are not a lock record", write("out/.terdit.lock", b'{"owner": "me", "pid": 1}'), None),
    ("rs-cfg-official-one-channel", SAMPLE + ["--cfg-mode", "official"], r"--cfg-mode official guides eps channels 0..2, but this model has 1 channel", None, None),
    ("rs-imagenet-ids-small-model", SAMPLE + ["--imagenet-ids", "--classes", "0"], r"--imagenet-ids maps ImageNet ids to the labels of the official 1000-class release; \S+ has 3 classes", None, None),
    ("rs-no-compile-on-cpu", SAMPLE + ["--backend", "torch", "--device", "cpu", "--no-compile"], r"--no-compile: the torch backend compiles blocks .*only on its CUDA kernels \(this run is on cpu\)", None, None),
    ("rs-no-cuda-graphs-on-cpu", SAMPLE + ["--backend", "torch", "--device", "cpu", "--no-cuda-graphs"], r"--no-cuda-graphs: .*this run is on cpu", None, None),
    ("rs-eta-zero-dpm", SAMPLE + ["--sampler", "dpm-solver", "--eta", "0"], r"--eta 0.0: --sampler dpm-solver has no eta", None, None),
    ("rs-cfg-scale-huge", SAMPLE + ["--cfg-scale", "1e39"], r"--cfg-scale 1e\+39: must be a number from -10000 to 10000 \(limits.MAX_CFG_SCALE", None, None),
    ("rs-latents-nan", SAMPLE + ["--latents", "{T}/l.npy", "--sampler", "ddpm"], r"--latents: latent 0 holds NaN or Inf", npy("l.npy", np.full((1, 1, 8, 8), np.nan, np.float32)), None),
    ("rs-cpu-isa-bogus", SAMPLE + ["--kernels", "native"], r"--kernels native: TERDIT_CPU_ISA=bogus: not one of avx512-vnni, avx2, portable", None, {"TERDIT_CPU_ISA": "bogus"}),
    ("rs-cpu-lib-device", SAMPLE + ["--kernels", "native"], r"--kernels native: TERDIT_CPU_LIB=/dev/null: not (a library file|the library in use).*a character device", None, {"TERDIT_CPU_LIB": "/dev/null"}),
    ("rs-world-without-master", SAMPLE, r"WORLD_SIZE=2 is set but MASTER_ADDR is not \(torchrun sets both\)", None, {"WORLD_SIZE": "2", "RANK": "0"}),
    ("be-manifest-file", ["runtime", "build-engine", "{B}/onnx/manifest.json", "--plugin", "{T}/lib.so"], r"manifest.json: not an ONNX file \(.onnx\) nor a directory", write("lib.so"), None),
    # 7. messages name the flag
    ("rs-vae-onnx-garbage", ["runtime", "sample", "--model", "{B}/latonnx", "--out", "{T}/out", "--num", "1", "--steps", "2", "--vae", "{T}/v.onnx"], r"--vae \S*v.onnx: ONNX Runtime cannot load the model .*pass a vae_decoder.onnx", write("v.onnx", b"not onnx"), None),
    ("rs-out-under-a-file", SAMPLE[:5] + ["{T}/f/out"] + SAMPLE[6:], r"--out \S*f/out: \S*/f is a regular file, not a directory", write("f", b"a file"), None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_refused_in_one_line(case, base, tmp_path, capsys, monkeypatch):
    name, argv, pattern, setup, env = case
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    work = case_dir(tmp_path, base, setup)
    assert_refused(name, argv, pattern, work, base, capsys)


def test_out_is_checked_before_the_model_is_opened(base, tmp_path, capsys):
    """A bad --out is refused before the export is hashed or ONNX Runtime loads it: stderr holds
    the one error line and nothing else (no `TernaryMatMul: ...` line of an opened backend)."""
    (tmp_path / "f").write_bytes(b"a file")
    code, err = run_cli_case(SAMPLE[:5] + ["{T}/f/out"] + SAMPLE[6:] + ["--kernels", "function"],
                             tmp_path, base, capsys)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: --out"), err


# ---- the Python API: one exception type for bad arguments --------------------------------------

def _pipe(base):
    from runtime import TerDiTPipeline
    return TerDiTPipeline.from_pretrained(base / "onnx", kernels="function")


API_CASES = [
    ("pipeline-of-none", lambda b: __import__("runtime").TerDiTPipeline(None), r"TerDiTPipeline\(None\): pass a backend"),
    ("run-options-dict", lambda b: _pipe(b).run(b / "never", [0], {"steps": 2}), r"options=\{'steps': 2\}: pass a runtime.SampleOptions"),
    ("run-labels-text", lambda b: _pipe(b).run(b / "never", ["a"], __import__("runtime").SampleOptions(steps=2)), r"labels: 'a' is not a label id"),
    ("decode-bad-shape", lambda b: _pipe(b).decode(np.zeros((1, 2, 3))), r"latents \(1, 2, 3\): pass a numpy array \(N, 1, 8, 8\)"),
    ("call-unknown-argument", lambda b: _pipe(b)([0], num_steps=3), r"unknown argument num_steps of the pipeline call"),
    ("imagenet-ids-int", lambda b: _pipe(b)([0], imagenet_ids=1), r"imagenet_ids=1: must be True or False"),
    ("labels-for-zero", lambda b: _pipe(b).labels_for([0], 0), r"--num 0: must be from 1"),
    ("run-overwrite-text", lambda b: _pipe(b).run(b / "never", [0], __import__("runtime").SampleOptions(steps=2), overwrite="no"), r"overwrite='no': must be True or False"),
    ("run-latents-list", lambda b: _pipe(b).run(b / "never", [0], __import__("runtime").SampleOptions(steps=2), initial_latents=[[0.0]]), r"--latents: \[\[0.0\]\] is not a float numpy array"),
    ("sample-label-fraction", lambda b: _pipe(b).sample([0], [1.7], __import__("runtime").SampleOptions(steps=2)), r"labels=\[1.7\]: pass a list of integers"),
    ("sample-index-negative", lambda b: _pipe(b).sample([-1], [0], __import__("runtime").SampleOptions(steps=2)), r"indices: -1 is negative"),
    ("sample-options-none", lambda b: _pipe(b).sample([0], [0], None), r"options=None: pass a SampleOptions"),
    ("labels-for-uncond-text", lambda b: _pipe(b).labels_for(None, 2, uncond="no"), r"uncond='no': must be True or False"),
    ("cfg-mode-without-guidance", lambda b: _pipe(b)([0], guidance_scale=1.0, cfg_mode="standard"), r"--cfg-mode 'standard': has no effect with --cfg-scale 1"),
]


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_raises_one_type(case, base):
    assert_api_refused(*case, base)
    assert not (base / "never").exists()
