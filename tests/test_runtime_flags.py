"""Success paths of `python -m runtime sample` flags (README "Sampling", `sample --help`), through
`main(argv)` on tiny models with 2 steps: --dtype fp16/bf16, --uncond, --latents, --vae DIR and
--imagenet-ids (and a resume with another --dtype is refused). Each is compared with the same run
without the flag or with an independent computation, and the model's forward is watched where
the flag promises what it is given."""
import hashlib
import json

import numpy as np
import pytest
import torch

from runtime.runtime_cli import main
from runtime.backends.torch_backend import TorchBackend
from terdit import TerDiTConfig, save_checkpoint
from terdit_common.images import load_npz
from tests.helpers import pixel_checkpoint, random_model, tiny_vae

STEPS = ["--steps", "2", "--no-progress", "--backend", "torch"]


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    """A 1-channel 8x8 pixel model with 3 classes (null label 3)."""
    return pixel_checkpoint(tmp_path_factory.mktemp("rflags") / "ck", seed=2, num_classes=3,
                            n_layers=1)


@pytest.fixture
def calls(monkeypatch):
    """Every (x, y) the torch backend's forward receives."""
    seen = []
    real = TorchBackend.forward

    def forward(self, x, t, y, cfg_scale=None):
        seen.append((np.array(x, copy=True), np.asarray(y).tolist()))
        return real(self, x, t, y, cfg_scale)

    monkeypatch.setattr(TorchBackend, "forward", forward)
    return seen


def _sample(model, out, *flags):
    assert main(["sample", "--model", str(model), "--out", str(out), *STEPS, *flags]) == 0
    return json.loads((out / "samples.json").read_text())


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


# ---- --dtype -----------------------------------------------------------------------------------

def test_dtype_fp16_and_bf16_sample_to_their_precision(ck, tmp_path):
    common = ["--classes", "0", "2", "--save-latents", "--seed", "3"]
    _sample(ck, tmp_path / "fp32", *common, "--dtype", "fp32")
    ref = np.load(tmp_path / "fp32" / "latents.npy")
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    for dtype, tdtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        _sample(ck, tmp_path / dtype, *common, "--dtype", dtype)
        got = np.load(tmp_path / dtype / "latents.npy")
        assert got.dtype == np.float32 and np.isfinite(got).all()
        # the dtype is used (not bit-equal to fp32), within a multiple of the error a
        # 64x64 product takes in that dtype (measured: 16-17x, guidance 4 amplifies it)
        exact = x @ x
        own = float(((x.to(tdtype) @ x.to(tdtype)).float() - exact).abs().max()
                    / exact.abs().max())
        assert 0 < _rel(got, ref) <= 50 * own, (dtype, _rel(got, ref), own)
        assert len(list((tmp_path / dtype / "images").glob("*.png"))) == 2


def test_a_resume_with_another_dtype_is_refused(ck, tmp_path, capsys):
    """README: a resume with another model or settings is refused, naming what differs (the
    dtype changes the images, so it is one of the recorded settings)."""
    record = _sample(ck, tmp_path / "o", "--classes", "0", "--dtype", "fp32")
    assert record["settings"]["dtype"] == "fp32"
    capsys.readouterr()
    code = main(["sample", "--model", str(ck), "--out", str(tmp_path / "o"), *STEPS,
                 "--classes", "0", "--dtype", "bf16"])
    err = capsys.readouterr().err
    assert code == 2 and "dtype" in err, (code, err)


# ---- --uncond ----------------------------------------------------------------------------------

def test_uncond_samples_the_null_label_without_guidance(ck, tmp_path, calls):
    record = _sample(ck, tmp_path / "u", "--uncond", "--num", "3", "--save-latents")
    assert record["settings"]["labels"] == [3, 3, 3]          # null label = num_classes
    assert record["settings"]["cfg_scale"] == 1.0 and record["settings"]["cfg_mode"] is None
    assert calls and all(y == [3, 3, 3] for _, y in calls)    # one batch, no conditional half
    assert load_npz(tmp_path / "u" / "samples.npz")[1].tolist() == [3, 3, 3]
    calls.clear()
    _sample(ck, tmp_path / "c", "--classes", "1", "--num", "3", "--cfg-scale", "1",
            "--save-latents")
    assert all(y == [1, 1, 1] for _, y in calls)
    uncond, cond = (np.load(tmp_path / d / "latents.npy") for d in ("u", "c"))
    assert not np.array_equal(uncond, cond)


# ---- --latents ---------------------------------------------------------------------------------

def test_latents_file_is_the_initial_noise(ck, tmp_path, calls, capsys):
    z = np.random.default_rng(5).standard_normal((2, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "z.npy", z)
    common = ["--classes", "0", "1", "--save-latents", "--cfg-scale", "2"]
    record = _sample(ck, tmp_path / "a", *common, "--latents", str(tmp_path / "z.npy"))
    first_x = calls[0][0]
    assert np.array_equal(first_x[:2], z) and np.array_equal(first_x[2:], z)  # cond + uncond
    assert record["settings"]["initial_latents_sha256"] == hashlib.sha256(z.tobytes()).hexdigest()
    # DDIM (eta 0) from given latents draws no noise, so a --seed would change nothing: refused
    capsys.readouterr()
    assert main(["sample", "--model", str(ck), "--out", str(tmp_path / "b"), *STEPS, *common,
                 "--latents", str(tmp_path / "z.npy"), "--seed", "9"]) == 2
    assert "--seed 9: has no effect with --latents" in capsys.readouterr().err
    # with the ancestral sampler the seed draws each step's noise: it acts
    _sample(ck, tmp_path / "c", *common, "--latents", str(tmp_path / "z.npy"), "--seed", "9",
            "--sampler", "ddpm")
    _sample(ck, tmp_path / "n", *common, "--seed", "0")
    a, c, n = (np.load(tmp_path / d / "latents.npy") for d in "acn")
    assert not np.array_equal(a, n) and not np.array_equal(a, c)
    assert not np.array_equal(calls[-1][0][:2], z)


# ---- --vae DIR ---------------------------------------------------------------------------------

def test_vae_dir_decodes_a_latent_checkpoint(tmp_path):
    pytest.importorskip("diffusers")
    vae = tiny_vae(tmp_path / "vae")
    save_checkpoint(random_model(TerDiTConfig.from_name("TerDiT-tiny"), seed=1), tmp_path / "ck")
    record = _sample(tmp_path / "ck", tmp_path / "s", "--classes", "1", "2", "--save-latents",
                     "--vae", str(tmp_path / "vae"))
    assert record["vae"] == str(tmp_path / "vae")
    images, labels = load_npz(tmp_path / "s" / "samples.npz")
    lat = np.load(tmp_path / "s" / "latents.npy")
    with torch.no_grad():
        img = vae.decode(torch.from_numpy(lat) / vae.config.scaling_factor).sample.numpy()
    expect = np.clip((img + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    assert images.shape == (2, 16, 16, 3) and labels.tolist() == [1, 2]
    assert np.abs(images.astype(int) - expect.astype(int)).max() <= 1
    # the same run without --vae has nothing to decode with: latents only
    record = _sample(tmp_path / "ck", tmp_path / "l", "--classes", "1", "2")
    assert record["vae"] is None and record["outputs"]["images"] is None
    assert np.array_equal(np.load(tmp_path / "l" / "latents.npy"), lat)


# ---- --imagenet-ids ----------------------------------------------------------------------------

def test_imagenet_ids_map_to_the_release_labels(tmp_path):
    ck = pixel_checkpoint(tmp_path / "ck1000", seed=4, num_classes=1000, n_layers=1)
    # the release trained on ImageFolder dirs "0".."999": label = rank of str(id) among strings
    order = sorted(str(i) for i in range(1000))
    ids = [89, 235, 7, 999]
    want = [order.index(str(i)) for i in ids]
    assert want == [878, 152, 667, 999]
    mapped = _sample(ck, tmp_path / "m", "--classes", *map(str, ids), "--imagenet-ids")
    assert mapped["settings"]["labels"] == want and mapped["settings"]["imagenet_ids"] is True
    direct = _sample(ck, tmp_path / "d", "--classes", *map(str, want))
    assert direct["settings"]["labels"] == want
    a, la = load_npz(tmp_path / "m" / "samples.npz")
    b, lb = load_npz(tmp_path / "d" / "samples.npz")
    assert la.tolist() == lb.tolist() == want and np.array_equal(a, b)
    unmapped = _sample(ck, tmp_path / "u", "--classes", *map(str, ids))
    assert unmapped["settings"]["labels"] == ids
