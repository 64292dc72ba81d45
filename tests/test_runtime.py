import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from exporter import ExportOptions, export
from runtime import (SampleOptions, SamplingError, TerDiTPipeline, imagenet_to_model_label,
                     open_backend)
from runtime.runtime_cli import main as cli_main
from terdit import TerDiTConfig, save_checkpoint
from terdit_common.guidance import guide
from terdit_common.sampling import ModelInfo, image_rng
from tests.helpers import pixel_checkpoint, random_model, tiny_vae

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(log=lambda *_: None)
FAST = SampleOptions(steps=4, sampler="ddim", cfg_scale=3.0, seed=7, batch_size=4)


@pytest.fixture(scope="module")
def pixel(tmp_path_factory):
    """A 1-channel pixel-space model: checkpoint + fp32 export (cfg outside) + folded-cfg export."""
    root = tmp_path_factory.mktemp("pixel")
    pixel_checkpoint(root / "ck", seed=3, num_classes=5, class_names="abcde")
    export(root / "ck", root / "onnx", ExportOptions(validate=False), **QUIET)
    export(root / "ck", root / "onnx_cfg", ExportOptions(cfg="standard", validate=False), **QUIET)
    return root


def _run(model, out, labels, options=FAST, backend=None, **kw):
    return TerDiTPipeline(open_backend(model, backend)).run(out, labels, options, progress=False,
                                                       log=lambda *_: None, **kw)


def _images(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted((out / "images").glob("*.png"))}


def test_ort_and_torch_backends_agree(pixel):
    ort_b = open_backend(pixel / "onnx")
    torch_b = open_backend(pixel / "ck")
    assert ort_b.name == "ort" and torch_b.name == "torch"
    labels = [0, 3, 4]
    a = TerDiTPipeline(ort_b).sample([0, 1, 2], labels, FAST)
    b = TerDiTPipeline(torch_b).sample([0, 1, 2], labels, FAST)
    assert np.abs(a - b).max() / np.abs(b).max() < 1e-4


def test_folded_cfg_graph_equals_pipeline_guidance(pixel):
    a = TerDiTPipeline(open_backend(pixel / "onnx")).sample([5, 6], [1, 2], FAST)
    folded = open_backend(pixel / "onnx_cfg")
    assert folded.info.folded_cfg == "standard"
    b = TerDiTPipeline(folded).sample([5, 6], [1, 2], FAST)
    assert np.abs(a - b).max() / np.abs(a).max() < 1e-4
    with pytest.raises(SamplingError, match="folded in"):
        TerDiTPipeline(folded).sample([0], [1], SampleOptions(steps=2, cfg_mode="official"))


def test_outputs_and_batch_size_independence(pixel, tmp_path):
    labels = [i % 5 for i in range(7)]
    rec1 = _run(pixel / "onnx", tmp_path / "b1", labels, SampleOptions(**{**FAST.__dict__, "batch_size": 1}))
    _run(pixel / "onnx", tmp_path / "b5", labels, SampleOptions(**{**FAST.__dict__, "batch_size": 5}))
    assert _images(tmp_path / "b1") == _images(tmp_path / "b5")
    assert len(_images(tmp_path / "b1")) == 7 and "000006.png" in _images(tmp_path / "b1")
    npz = np.load(tmp_path / "b1" / "samples.npz")
    assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (7, 8, 8, 3)
    assert npz["arr_1"].tolist() == labels
    rec = json.loads((tmp_path / "b1" / "samples.json").read_text())
    assert rec["complete"] and rec["settings"]["labels"] == labels and rec["settings"]["seed"] == 7
    assert rec["model"]["sha256"] and rec1["settings"]["sampler"] == "ddim"
    assert (tmp_path / "b1" / "grid.png").stat().st_size > 0


@pytest.mark.parametrize("sampler", ["ddpm", "dpm-solver"])
def test_other_samplers_run(pixel, sampler):
    lat = TerDiTPipeline(open_backend(pixel / "onnx")).sample([0, 1], [2, 2], SampleOptions(steps=5, sampler=sampler))
    assert lat.shape == (2, 1, 8, 8) and np.isfinite(lat).all()


def test_resume_after_interruption(pixel, tmp_path, monkeypatch):
    labels = [1, 2, 3, 4, 0, 1]
    _run(pixel / "onnx", tmp_path / "full", labels)
    import runtime.writer as run
    real = run.atomic_write_bytes
    calls = {"n": 0}

    def flaky(path, data):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # interrupted mid-run
        return real(path, data)

    monkeypatch.setattr(run, "atomic_write_bytes", flaky)
    with pytest.raises(KeyboardInterrupt):
        _run(pixel / "onnx", tmp_path / "resumed", labels)
    monkeypatch.setattr(run, "atomic_write_bytes", real)
    assert len(_images(tmp_path / "resumed")) == 3
    damaged = tmp_path / "resumed" / "images" / "000001.png"
    damaged.write_bytes(b"truncated")        # not what the run wrote: refused, never replaced
    with pytest.raises(SamplingError, match="images/000001.png is not a file this run wrote"):
        _run(pixel / "onnx", tmp_path / "resumed", labels)
    assert damaged.read_bytes() == b"truncated"
    damaged.unlink()                         # moved away: sampled again
    _run(pixel / "onnx", tmp_path / "resumed", labels)
    assert _images(tmp_path / "resumed") == _images(tmp_path / "full")
    with pytest.raises(SamplingError, match="different run .*steps 4 -> 3"):
        _run(pixel / "onnx", tmp_path / "resumed", labels, SampleOptions(steps=3))
    _run(pixel / "onnx", tmp_path / "resumed", labels, SampleOptions(steps=3), overwrite=True)


class _FakeBackend:
    name = "fake"
    settings: dict = {}

    def __init__(self, fail_above=None, nan_index=None):
        self.info = ModelInfo({"in_channels": 1, "input_size": 4, "num_classes": 3}, "fake", "0")
        self.fail_above, self.nan_index, self.batches = fail_above, nan_index, []

    def forward(self, x, t, y, cfg_scale=None):
        if self.fail_above and len(x) > self.fail_above:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.batches.append(len(x))
        out = np.concatenate([np.tanh(x) * 0.5, np.zeros_like(x)], axis=1)
        if self.nan_index is not None:
            out[self.nan_index] = np.nan
        return out.astype(np.float32)


def test_oom_halves_the_batch_without_losing_indices(tmp_path):
    opts = SampleOptions(steps=3, batch_size=8, cfg_scale=2.0)
    labels = [0, 1, 2] * 4
    TerDiTPipeline(_FakeBackend()).run(tmp_path / "ref", labels, opts, progress=False, log=lambda *_: None)
    fake = _FakeBackend(fail_above=6)  # CFG doubles the batch: 8 -> 4 images fit
    TerDiTPipeline(fake).run(tmp_path / "oom", labels, opts, progress=False, log=lambda *_: None)
    assert max(fake.batches) <= 6
    assert _images(tmp_path / "oom") == _images(tmp_path / "ref")


def test_nan_latents_name_the_image(tmp_path):
    with pytest.raises(SamplingError, match=r"image 12: latents became NaN/Inf at step 1"):
        TerDiTPipeline(_FakeBackend(nan_index=1)).sample([11, 12], [0, 1], SampleOptions(steps=2, cfg_scale=1.0))


def test_noise_depends_only_on_seed_and_index():
    a = image_rng(3, 10).standard_normal(5)
    assert np.array_equal(a, image_rng(3, 10).standard_normal(5))
    assert not np.array_equal(a, image_rng(3, 11).standard_normal(5))
    assert not np.array_equal(a, image_rng(4, 10).standard_normal(5))


def test_initial_latents_are_used(pixel):
    pipe = TerDiTPipeline(open_backend(pixel / "onnx"))
    z = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    a = pipe.sample([0, 1], [0, 1], FAST, initial=z)
    b = pipe.sample([5, 9], [0, 1], FAST, initial=z)  # indices no longer matter (DDIM eta 0)
    assert np.array_equal(a, b)
    with pytest.raises(SamplingError, match="shape"):
        pipe.sample([0], [0], FAST, initial=z)


def test_guide_modes():
    out = np.random.default_rng(0).standard_normal((4, 8, 2, 2)).astype(np.float32)
    off = guide(out, 4.0, "official", 4)
    std = guide(out, 4.0, "standard", 4)
    cond, uncond = out[:2], out[2:]
    assert np.allclose(off[:, :3], uncond[:, :3] + 4 * (cond[:, :3] - uncond[:, :3]))
    assert np.array_equal(off[:, 3:], cond[:, 3:])
    assert np.allclose(std[:, :4], uncond[:, :4] + 4 * (cond[:, :4] - uncond[:, :4]))
    # the same function on torch tensors (the reference model and the exported graph)
    ref = guide(torch.from_numpy(out), 4.0, "official", 4).numpy()
    assert np.array_equal(off, ref)


def test_imagenet_label_mapping():
    assert imagenet_to_model_label(89) == 878
    assert imagenet_to_model_label(235) == 152
    assert imagenet_to_model_label(0) == 0 and imagenet_to_model_label(999) == 999
    with pytest.raises(ValueError):
        imagenet_to_model_label(1000)


def test_latent_model_without_vae_writes_latents_only(tmp_path):
    torch.manual_seed(0)
    save_checkpoint(random_model(TerDiTConfig.from_name("TerDiT-tiny")), tmp_path / "ck")
    export(tmp_path / "ck", tmp_path / "onnx", ExportOptions(validate=False), **QUIET)
    notes = []
    rec = TerDiTPipeline(open_backend(tmp_path / "onnx")).run(tmp_path / "s", [1, 2, 3], FAST,
                                                         progress=False, log=notes.append)
    assert any("writing latents only" in n for n in notes)
    assert np.load(tmp_path / "s" / "latents.npy").shape == (3, 4, 8, 8)
    assert not (tmp_path / "s" / "samples.npz").exists() and rec["outputs"]["npz"] is None


def test_vae_decode_through_the_export(tmp_path):
    pytest.importorskip("diffusers")
    vae = tiny_vae(tmp_path / "vae")
    save_checkpoint(random_model(TerDiTConfig.from_name("TerDiT-tiny")), tmp_path / "ck")
    export(tmp_path / "ck", tmp_path / "onnx", ExportOptions(validate=False, vae=str(tmp_path / "vae")), **QUIET)
    assert cli_main(["sample", "--model", str(tmp_path / "onnx"), "--classes", "1", "2", "--steps", "3",
                     "--out", str(tmp_path / "s"), "--save-latents", "--no-progress"]) == 0
    npz = np.load(tmp_path / "s" / "samples.npz")
    assert npz["arr_0"].shape == (2, 16, 16, 3)  # 8x8 latents, two 2x upsamplings... of this tiny VAE
    lat = np.load(tmp_path / "s" / "latents.npy")
    with torch.no_grad():
        img = vae.decode(torch.from_numpy(lat) / 0.18215).sample.numpy()
    expect = np.clip((img + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    assert np.abs(npz["arr_0"].astype(int) - expect.astype(int)).max() <= 1


# ---- the CLI --------------------------------------------------------------------------------

@pytest.mark.parametrize("args, match", [
    (["--classes", "5"], r"--classes 5: outside \[0, 5\).*null label 5"),
    (["--classes", "-1"], r"--classes -1: outside"),
    (["--num", "0"], "--num 0: must be from 1 to"),
    (["--batch-size", "0"], "--batch-size 0: must be an integer from 1"),
    (["--steps", "0"], "--steps 0: must be an integer from 1 to 1000"),
    (["--backend", "trt"], "TensorRT|plan|plugin"),
])
def test_cli_bad_inputs_fail_cleanly(pixel, tmp_path, capsys, args, match):
    code = cli_main(["sample", "--model", str(pixel / "onnx"), "--out", str(tmp_path / "o"),
                     "--no-progress", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "\n" not in err
    import re
    assert re.search(match, err), err
    assert not (tmp_path / "o" / "images").exists() or not any((tmp_path / "o" / "images").iterdir())


def test_cli_unwritable_output_and_missing_model(pixel, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli_main(["sample", "--model", str(pixel / "onnx"), "--out", str(blocker / "sub"),
                     "--no-progress"]) == 2
    assert "file is a regular file, not a directory" in capsys.readouterr().err
    assert cli_main(["sample", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli_main(["sample", "--model", str(pixel / "ck"), "--backend", "ort", "--out",
                     str(tmp_path / "o")]) == 2
    assert "not an export directory" in capsys.readouterr().err


def test_cli_end_to_end(pixel, tmp_path):
    out = tmp_path / "s"
    proc = subprocess.run([sys.executable, "-m", "runtime", "sample", "--model", str(pixel / "onnx"),
                           "--classes", "0", "1", "2", "--num", "6", "--steps", "3", "--cfg", "2",
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 6 new image(s)" in proc.stdout and "img/s" in proc.stderr + proc.stdout
    assert len(list((out / "images").glob("*.png"))) == 6
    help_text = subprocess.run([sys.executable, "-m", "runtime", "sample", "--help"],
                               capture_output=True, text=True, cwd=ROOT, timeout=60).stdout
    for flag in ("--model", "--classes", "--num", "--steps", "--sampler", "--cfg-scale", "--seed",
                 "--batch-size", "--out", "--backend", "--latents", "--save-latents",
                 "--imagenet-ids", "--cfg-mode", "--uncond"):
        assert flag in help_text


def test_two_ranks_equal_one(pixel, tmp_path):
    common = ["sample", "--model", str(pixel / "onnx"), "--classes", "0", "1", "2", "3", "4",
              "--num-images", "7", "--steps", "3", "--no-progress", "--batch-size", "2"]
    assert cli_main(common + ["--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_port=29533", "-m", "runtime", *common, "--threads", "1",
                           "--out", str(tmp_path / "two")], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _images(tmp_path / "one") == _images(tmp_path / "two")
    a, b = np.load(tmp_path / "one" / "samples.npz"), np.load(tmp_path / "two" / "samples.npz")
    assert np.array_equal(a["arr_0"], b["arr_0"])
    rec = json.loads((tmp_path / "two" / "samples.json").read_text())
    assert rec["complete"] and rec["timing"]["world_size"] == 2


def test_torch_backend_w2a8_mode_on_cpu(pixel):
    exact = TerDiTPipeline(open_backend(pixel / "ck")).sample([0, 1], [1, 2], FAST)
    fp8 = TerDiTPipeline(open_backend(pixel / "ck", "torch", w2a8=True)).sample([0, 1], [1, 2], FAST)
    assert not np.array_equal(exact, fp8)
    assert np.abs(fp8 - exact).max() / np.abs(exact).max() < 0.2
