"""The trainer checks everything before it writes anything (issue 20, second pass): bad data and
labels, a damaged run to resume, an --init-from or --model-config that does not fit, counts and
model sizes beyond their limits, flags that would have no effect, a loss that turns NaN. Each
case runs `python -m terdit.train` in process and must end with exit code 2, one `error:` line
naming the file, field or flag, no traceback, and the case's directory exactly as it was: no
run/, no lock, no temporary added, every file of an existing run byte-identical."""
import json
import os
import shutil

import numpy as np
import pytest

from tests.cases import assert_refused, copy, npy, write
from tests.helpers import (all_of, assert_one_error_line, case_dir, pixel_checkpoint, run_cli_case,
                           tree_state)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Built once: latents with labels, a full-precision pixel checkpoint and a finished
    one-step run. Cases copy what they damage."""
    root = tmp_path_factory.mktemp("train_reliability")
    rng = np.random.default_rng(0)
    np.save(root / "lat.npy", rng.standard_normal((4, 4, 8, 8)).astype(np.float32).clip(-1, 1))
    np.save(root / "lat.labels.npy", np.arange(4))
    pixel_checkpoint(root / "fpck", n_layers=1, fp=True)
    from terdit.train import main as train_main
    assert train_main(["--model", "TerDiT-tiny", "--data", "latents", "--data-path",
                       str(root / "lat.npy"), "--out", str(root / "run"), "--steps", "1",
                       "--global-batch", "2", "--no-progress"]) == 0
    return root


# ---- setup helpers: (tmp, base) -> None; argv paths use {T} (the case's directory) and {B}
# (the shared fixtures, only read) ---------------------------------------------------------------

def _latents_with(index, value):
    """lat.npy + labels whose sample `index` holds one `value` (NaN, Inf)."""
    def setup(tmp, base):
        data = np.load(base / "lat.npy")
        data[index, 1, 2, 3] = value
        np.save(tmp / "lat.npy", data)
        shutil.copy2(base / "lat.labels.npy", tmp / "lat.labels.npy")
    return setup


def _npz_with(index, value):
    def setup(tmp, base):
        data = np.load(base / "lat.npy")
        data[index, 0, 0, 0] = value
        np.savez(tmp / "lat.npz", latents=data, labels=np.load(base / "lat.labels.npy"))
    return setup


TINY = {"input_size": 8, "patch_size": 2, "in_channels": 4, "dim": 64, "n_layers": 2,
        "n_heads": 4, "multiple_of": 32, "num_classes": 10}


def _config(**fields):
    """m.json: TerDiT-tiny's fields, changed by `fields`."""
    return write("m.json", json.dumps({**TINY, **fields}).encode())


def _image_folder(tmp, base):
    from PIL import Image
    for cls in ("a", "b"):
        (tmp / "imgs" / cls).mkdir(parents=True)
        Image.new("L", (8, 8), 3).save(tmp / "imgs" / cls / "x.png")


def _truncated_png(tmp, base):
    """A PNG whose header is whole and whose pixel data is cut: only decoding finds it."""
    from PIL import Image
    Image.effect_noise((64, 64), 50).save(tmp / "imgs" / "b" / "cut.png")
    data = (tmp / "imgs" / "b" / "cut.png").read_bytes()
    (tmp / "imgs" / "b" / "cut.png").write_bytes(data[:len(data) // 2])


LAT = copy("lat.npy", "lat.labels.npy")
TRAIN = ["train", "--model", "TerDiT-tiny", "--data", "latents", "--data-path", "{T}/lat.npy",
         "--out", "{T}/run", "--no-progress", "--steps", "1", "--global-batch", "2"]
# the base run continued in the case's copy of it (the data path must be the one it recorded)
RESUME = [a.replace("{T}/lat", "{B}/lat") for a in TRAIN] + ["--resume", "latest"]
CONFIG = TRAIN[:1] + TRAIN[3:] + ["--model-config", "{T}/m.json"]
FOLDER = ["train", "--model", "TerDiT-tiny", "--data", "folder", "--data-path", "{T}/imgs",
          "--out", "{T}/run", "--no-progress", "--steps", "1", "--global-batch", "2"]
LOG_ROW = b'{"step": 1, "loss": 1.0}\n'

# (id, argv, regex the error line must match, setup)
CASES = [
    # a) everything is checked before anything is written into --out
    ("tr-resume-torn-log", RESUME, r"run/log\.jsonl:2: not valid JSON", all_of(copy("run"), write("run/log.jsonl", LOG_ROW + b"{torn\n" + LOG_ROW))),
    ("tr-resume-log-list", RESUME, r"run/log\.jsonl:1: a JSON list, expected an object", all_of(copy("run"), write("run/log.jsonl", b"[1]\n"))),
    ("tr-resume-file", TRAIN + ["--resume", "{T}/notes.txt"], r"--resume .*notes\.txt: not a directory; pass a checkpoints/step_XXXXXXX", all_of(LAT, write("notes.txt", b"mine"))),
    ("tr-init-from-mismatch", TRAIN + ["--init-from", "{B}/fpck"], r"--init-from .*fpck: its config does not match .*in_channels 1 vs 4.*pass the --model", LAT),
    ("tr-overwrite-refused-keeps-run", TRAIN + ["--overwrite", "--init-from", "{B}/fpck"], r"--init-from .*fpck: its config does not match", all_of(LAT, copy("run"))),
    ("tr-labels-float", TRAIN, r"labels file .*lat\.labels\.npy have dtype float64, expected integers", all_of(copy("lat.npy"), npy("lat.labels.npy", np.arange(4.0)))),
    ("tr-labels-negative", TRAIN, r"labels file .*lat\.labels\.npy: holds label -1; labels are class ids from 0", all_of(copy("lat.npy"), npy("lat.labels.npy", np.array([0, 1, -1, 2])))),
    ("tr-png-corrupt", FOLDER, r"bad\.png: not a readable image .*remove or replace it", all_of(_image_folder, write("imgs/b/bad.png", b"\x89PNG\r\n\x1a\nnot a png"))),
    ("tr-png-truncated", FOLDER, r"cut\.png: not a readable image .*remove or replace it", all_of(_image_folder, _truncated_png)),
    # b) every count and size bounded, with its limit named, before any work
    ("tr-global-batch-1e9", TRAIN + ["--global-batch", "1000000000"], r"--global-batch 1000000000: must be from 1 to 65536 samples per step \(limits\.MAX_BATCH\)", LAT),
    ("tr-model-6e12-parameters", CONFIG, r"--model-config .*m\.json: 6\.7\d*e\+12 parameters \(dim 32768, n_layers 512\), more than 1e\+11 \(limits\.MAX_PARAMETERS\)", all_of(LAT, _config(dim=32768, n_layers=512, n_heads=256))),
    ("tr-num-timesteps-1e9", TRAIN + ["--num-timesteps", "1000000000"], r"--num-timesteps 1000000000: must be from 1 to 100000 \(limits\.MAX_TIMESTEPS\)", LAT),
    ("tr-labels-1e12", TRAIN, r"labels file .*lat\.labels\.npy: holds label 1000000000000; .*limits\.INT_BOUNDS num_classes", all_of(copy("lat.npy"), npy("lat.labels.npy", np.array([0, 1, 2, 10 ** 12])))),
    ("tr-sample-steps-5000", TRAIN + ["--sample-every", "1", "--sample-steps", "5000"], r"--sample-steps 5000: must be an integer from 1 to 1000", LAT),
    ("tr-sample-steps-no-stride", TRAIN + ["--sample-every", "1", "--sample-steps", "999"], r"--sample-steps 999: 999 DDIM steps: no integer stride", LAT),
    # c) every config field type-checked, NaN data and a NaN loss named where they are
    ("tr-config-dropout-string", CONFIG, r'--model-config .*m\.json: field class_dropout_prob is the string "x", expected a number', all_of(LAT, _config(class_dropout_prob="x"))),
    ("tr-config-dropout-null", CONFIG, r"field class_dropout_prob is null, expected a number", all_of(LAT, _config(class_dropout_prob=None))),
    ("tr-config-kv-heads-string", CONFIG, r'field n_kv_heads is the string "4", expected an integer or null', all_of(LAT, _config(n_kv_heads="4"))),
    ("tr-config-eps-string", CONFIG, r'field norm_eps is the string "1e-5", expected a number', all_of(LAT, _config(norm_eps="1e-5"))),
    ("tr-config-ternary-replaced", CONFIG, r"m\.json: ternary false would be replaced by true, the trainer's setting without --fp; give --fp instead", all_of(LAT, _config(ternary=False))),
    ("tr-config-dropout-replaced", CONFIG, r"m\.json: class_dropout_prob 0\.3 would be replaced by 0\.1, .*give --class-dropout 0\.3 instead", all_of(LAT, _config(class_dropout_prob=0.3))),
    ("tr-latents-nan", TRAIN, r"--data-path .*lat\.npy: latent 2 holds NaN or Inf values", _latents_with(2, np.nan)),
    ("tr-latents-inf-npz", TRAIN[:6] + ["{T}/lat.npz"] + TRAIN[7:], r"--data-path .*lat\.npz: latent 0 holds NaN or Inf values", _npz_with(0, np.inf)),
    ("tr-norm-eps-1e-300", CONFIG, r"step 1: the training loss is not finite \(loss nan.*norm_eps 1e-300.*nothing of step 1 was written", all_of(LAT, _config(norm_eps=1e-300))),
    ("tr-lr-1e30", TRAIN + ["--steps", "2", "--lr", "1e30", "--warmup-steps", "0"], r"step 2: the training loss is not finite .*--lr 1e\+30", LAT),
    # d) a periodic flag longer than the run would never act
    ("tr-sample-every-over-steps", TRAIN + ["--sample-every", "1000"], r"--sample-every would have no effect: it is more than --steps 1, so no preview would be written; drop --sample-every", LAT),
    ("tr-ckpt-every-over-steps", TRAIN + ["--ckpt-every", "5"], r"--ckpt-every would have no effect: it is more than --steps 1.*; drop --ckpt-every", LAT),
    ("tr-log-every-over-steps", TRAIN + ["--log-every", "5"], r"--log-every would have no effect: it is more than --steps 1.*; drop --log-every", LAT),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_refused_run_leaves_everything_as_it_was(case, base, tmp_path, capsys):
    name, argv, pattern, setup = case
    assert_refused(name, argv, pattern, case_dir(tmp_path, base, setup), base, capsys)


def test_a_model_beyond_the_machines_memory_is_refused_before_it_is_built(base, tmp_path,
                                                                         capsys):
    # about 9.6e10 parameters: under MAX_PARAMETERS, 1.8 TiB of training state
    setup = all_of(LAT, _config(dim=8192, n_layers=112, n_heads=64))
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if memory >= 1 << 40:
        pytest.skip(f"this machine has {memory / 2**40:.1f} TiB of memory: the model may fit")
    argv = CONFIG + ["--device", "cpu"]
    assert_refused("tr-model-over-memory", argv, r"--model-config .*m\.json: 9\.\d+e\+10 "
                   r"parameters need \S+ GiB of training state per rank .*more than the \S+ GiB of "
                   r"this machine's memory; choose a smaller model",
                   case_dir(tmp_path, base, setup), base, capsys)


@pytest.mark.parametrize("env, pattern", [
    ({"WORLD_SIZE": "2", "RANK": "7", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
     r"RANK=7: must be below WORLD_SIZE=2"),
    ({"WORLD_SIZE": "2", "RANK": "1"}, r"WORLD_SIZE=2 is set but MASTER_ADDR is not"),
    ({"WORLD_SIZE": "0"}, r"WORLD_SIZE=0: a run has at least one process"),
], ids=["rank-beyond-world", "no-master", "world-zero"])
def test_a_torchrun_environment_without_torchrun_is_one_line(env, pattern, base, tmp_path,
                                                             capsys, monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert_refused(f"tr-env-{env}", TRAIN, pattern, case_dir(tmp_path, base, LAT), base, capsys)


# ---- stopped runs ------------------------------------------------------------------------------

def _stop_in_step(monkeypatch, n, how):
    """Make the training loss of step `n` (1-based) raise `how` (an exception) or, for "nan",
    be NaN."""
    import torch

    from terdit.diffusion import GaussianDiffusion
    real, seen = GaussianDiffusion.training_losses, []

    def losses(self, *args, **kwargs):
        seen.append(1)
        terms = real(self, *args, **kwargs)
        if len(seen) == n and how == "nan":
            terms["loss"] = terms["loss"] * torch.tensor(float("nan"))
        elif len(seen) == n:
            raise how
        return terms
    monkeypatch.setattr(GaussianDiffusion, "training_losses", losses)


@pytest.mark.parametrize("how", [KeyboardInterrupt(), RuntimeError("CUDA out of memory. Tried "
                                                                   "to allocate 2.00 GiB")],
                         ids=["interrupted", "out-of-memory"])
def test_a_run_stopped_before_its_first_checkpoint_leaves_nothing(how, base, tmp_path, capsys,
                                                                  monkeypatch):
    work = case_dir(tmp_path, base, LAT)
    before = tree_state(work)
    _stop_in_step(monkeypatch, 1, how)
    code, err = run_cli_case(TRAIN, work, base, capsys)
    if isinstance(how, KeyboardInterrupt):
        assert code == 130 and err.splitlines()[-1].startswith("interrupted: "), (code, err)
    else:                   # a tiny model: the batch's activations are the likely cause
        assert_one_error_line("oom", code, err, r"out of memory while training \(CUDA out of "
                              r"memory.*likely cause is the batch: .*lower --global-batch")
    assert tree_state(work) == before


def test_out_of_memory_with_a_large_model_names_the_model(base, tmp_path, capsys, monkeypatch):
    import terdit.train.setup as setup
    from terdit import TerDiTConfig
    from terdit.train import TrainConfig
    _, state = setup.training_bytes(TerDiTConfig.from_name("TerDiT-tiny"), TrainConfig(), 1)
    monkeypatch.setattr(setup, "device_memory", lambda device: state * 3 // 2)
    _stop_in_step(monkeypatch, 1, RuntimeError("CUDA out of memory."))
    work = case_dir(tmp_path, base, LAT)
    before = tree_state(work)
    code, err = run_cli_case(TRAIN, work, base, capsys)
    assert_one_error_line("oom-model", code, err, r"likely cause is the model: \S+ parameters "
                          r"hold .* GiB of training state per rank.*choose a smaller --model")
    assert tree_state(work) == before


def test_a_nan_loss_after_a_checkpoint_keeps_the_run_resumable(base, tmp_path, capsys,
                                                             monkeypatch):
    work = case_dir(tmp_path, base, LAT)
    argv = TRAIN + ["--steps", "3", "--ckpt-every", "1", "--log-every", "1"]
    with monkeypatch.context() as patch:
        _stop_in_step(patch, 3, "nan")
        code, err = run_cli_case(argv, work, base, capsys)
    assert_one_error_line("nan-after-checkpoint", code, err,
                          r"step 3: the training loss is not finite \(loss nan.*nothing of step "
                          r"3 was written.*--resume latest continues from the last one")
    run = work / "run"
    from terdit.train import read_log
    assert [r["step"] for r in read_log(run / "log.jsonl")] == [1, 2]
    assert (run / "checkpoints" / "latest").read_text() == "step_0000002\n"
    assert not (run / ".terdit.lock").exists()
    code, err = run_cli_case(argv + ["--resume", "latest"], work, base, capsys)
    assert code == 0, err
    assert [r["step"] for r in read_log(run / "log.jsonl")] == [1, 2, 3]
