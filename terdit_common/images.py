"""Images, grids and ADM sample batches (numpy + Pillow); every file is written atomically.

Images are uint8 (N, H, W, C) with the model's own channel count (1 for grayscale) everywhere
except in the ADM `.npz`, whose format (guided-diffusion's evaluator) is RGB: grayscale images
are repeated to 3 channels there, and `load_npz` turns them back into one channel.
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .errors import UserError
from .files import atomic_write, atomic_write_bytes
from .inputs import npz_headers, read_npz
from .limits import INT_BOUNDS, MAX_IMAGE_SIZE, MAX_IMAGES

MAX_LABEL = INT_BOUNDS["num_classes"][1]      # the largest class id (or null label) in an .npz


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) floats in [-1, 1] -> (N, H, W, C) uint8 (rounded, clamped)."""
    x = np.clip((np.asarray(images, dtype=np.float32) + 1.0) * 127.5 + 0.5, 0, 255)
    return np.ascontiguousarray(x.astype(np.uint8).transpose(0, 2, 3, 1))


def from_uint8(images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, C, H, W) float32 in [-1, 1] (the model's pixel space)."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)).astype(np.float32) / 127.5 - 1.0


def png_bytes(image: np.ndarray) -> bytes:
    """One (H, W, C) uint8 image as PNG bytes (C = 1: grayscale, 3: RGB)."""
    from PIL import Image
    arr = image[..., 0] if image.shape[-1] == 1 else image
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def read_png(path: Path) -> Optional[np.ndarray]:
    """An image as (H, W, C) uint8, or None when the file is missing or not a valid image (a
    header declaring more than PIL's pixel limit counts as not valid: it is never decoded)."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return arr[..., None] if arr.ndim == 2 else arr


def _uniform(labels: Sequence[str], n: int, ncols: int, by: str) -> bool:
    rows = math.ceil(n / ncols)
    if by == "col":
        return all(len({labels[r * ncols + c] for r in range(rows) if r * ncols + c < n}) == 1
                   for c in range(ncols))
    return all(len({labels[i] for i in range(r * ncols, min(n, (r + 1) * ncols))}) == 1
               for r in range(rows))


def make_grid(images: np.ndarray, labels: Optional[Sequence[str]] = None,
              ncols: Optional[int] = None, pad: int = 2, scale: int = 1) -> np.ndarray:
    """(N, H, W, C) uint8 -> one RGB grid. `labels` caption the images: once above each column
    when every column holds one label (e.g. classes cycled over the images), once left of each
    row when every row does (one class per row), else above every image."""
    from PIL import Image, ImageDraw
    n, h, w, c = images.shape
    ncols = ncols or min(n, max(1, int(math.ceil(math.sqrt(n)))))
    nrows = int(math.ceil(n / ncols))
    labels = [str(s) for s in labels] if labels is not None else None
    mode = None
    if labels:
        mode = ("col" if nrows > 1 and _uniform(labels, n, ncols, "col") else
                "row" if ncols > 1 and _uniform(labels, n, ncols, "row") else "cell")
    h2, w2 = h * scale, w * scale
    char_w = 6
    top = 12 if mode == "col" else 0
    left = (8 + char_w * max(len(s) for s in labels)) if mode == "row" else 0
    cap = 11 if mode == "cell" else 0
    col_w = w2 + pad
    if mode == "col":   # widen columns so the header fits
        col_w = max(col_w, char_w * max(len(s) for s in labels) + 2 * pad)
    width = left + ncols * col_w + pad
    height = top + nrows * (h2 + pad + cap) + pad
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        r, col = divmod(i, ncols)
        img = images[i]
        img = np.repeat(img, 3, axis=-1) if c == 1 else img
        tile = Image.fromarray(img).resize((w2, h2), Image.NEAREST)
        x0 = left + pad + col * col_w + (col_w - pad - w2) // 2
        y0 = top + pad + r * (h2 + pad + cap)
        grid.paste(tile, (x0, y0 + cap))
        if mode == "cell":
            draw.text((x0 + 1, y0), labels[i][: max(1, w2 // char_w)], fill=(0, 0, 0))
    if mode == "col":
        for col in range(min(ncols, n)):
            text = labels[col]
            x_mid = left + pad + col * col_w + (col_w - pad) // 2
            draw.text((x_mid - char_w * len(text) // 2, 1), text, fill=(0, 0, 0))
    elif mode == "row":
        for r in range(nrows):
            draw.text((4, top + pad + r * (h2 + pad) + h2 // 2 - 5), labels[r * ncols],
                      fill=(0, 0, 0))
    return np.asarray(grid)


def write_grid(path: str | os.PathLike, images: np.ndarray,
               labels: Optional[Sequence[str]] = None, ncols: Optional[int] = None) -> Path:
    """The grid as a PNG; small images (28-32 px) are enlarged so the grid is legible."""
    scale = max(1, 64 // images.shape[1])
    return atomic_write_bytes(path, png_bytes(make_grid(images, labels, ncols, scale=scale)))


def grid_columns(labels: Sequence[int], shown: int) -> Optional[int]:
    """One column per label when the labels cycle through a few classes, else None (square)."""
    uniq = len(set(labels[:shown]))
    if 1 < uniq <= 16 and shown % uniq == 0 and all(
            labels[i] == labels[i % uniq] for i in range(shown)):
        return uniq
    return None


def write_npz(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray) -> Path:
    """ADM-format batch: arr_0 uint8 NHWC RGB (grayscale repeated to 3 channels, as the ADM
    evaluator expects), arr_1 int64 labels."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be uint8 (N, H, W, 1 or 3), got {images.dtype} "
                         f"{images.shape}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:              # a file object: savez adds no suffix
            np.savez(f, arr_0=images, arr_1=np.asarray(labels, dtype=np.int64))

    return atomic_write(path, write)


def load_npz(path: str | os.PathLike, max_images: int = MAX_IMAGES
             ) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """An ADM-style batch: arr_0 uint8 (N, H, W, C), optional arr_1 labels (N,). RGB images whose
    channels are all equal come back as one channel. Bad files are a UserError naming the file;
    the headers (shape, dtype, declared sizes) are checked before any data is read."""
    fix = "pass an ADM-style .npz (arr_0 uint8 NHWC)"
    heads = npz_headers(path, fix=fix)
    if "arr_0" not in heads:
        raise UserError(f"{path}: no arr_0 (ADM-style sample files hold uint8 NHWC images in "
                        f"arr_0); found {sorted(heads)[:8]}")
    shape, dtype = heads["arr_0"]
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3):
        raise UserError(f"{path}: arr_0 is {dtype} {shape}, expected uint8 (N, H, W, 1 or 3)")
    if not 1 <= shape[0] <= max_images:
        raise UserError(f"{path}: arr_0 holds {shape[0]} images; expected 1 .. {max_images} "
                        f"(limits.MAX_IMAGES)")
    if not all(1 <= d <= MAX_IMAGE_SIZE for d in shape[1:3]):
        raise UserError(f"{path}: arr_0 images are {shape[1]}x{shape[2]}; each side must be "
                        f"from 1 to {MAX_IMAGE_SIZE} pixels (limits.MAX_IMAGE_SIZE)")
    names = ("arr_0",)
    if "arr_1" in heads:
        lshape, ldtype = heads["arr_1"]
        if lshape != (shape[0],) or ldtype.kind not in "iu":
            raise UserError(f"{path}: arr_1 is {ldtype} {lshape}, expected integer labels of "
                            f"shape ({shape[0]},)")
        names += ("arr_1",)
    arrays = read_npz(path, names)
    images, labels = arrays["arr_0"], arrays.get("arr_1")
    if labels is not None:
        labels = labels.astype(np.int64)
        if len(labels) and not 0 <= labels.min() <= labels.max() <= MAX_LABEL:
            bad = int(labels.min() if labels.min() < 0 else labels.max())
            raise UserError(f"{path}: arr_1 holds label {bad}; labels are class ids from 0 to "
                            f"{MAX_LABEL}")
    if images.shape[-1] == 3 and (images == images[..., :1]).all():
        images = np.ascontiguousarray(images[..., :1])
    return images, labels


def npy_bytes(array: np.ndarray) -> bytes:
    """`array` as the bytes of an .npy file."""
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def write_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    return atomic_write(path, write)
