"""Images, grids and ADM batches: every file is written atomically."""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .io import atomic_write, atomic_write_bytes


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) floats in [-1, 1] -> (N, H, W, C) uint8 (C = 1 or 3)."""
    x = np.clip((images.astype(np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image
    arr = image[..., 0] if image.shape[-1] == 1 else image
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def image_path(out_dir: Path, index: int) -> Path:
    return out_dir / "images" / f"{index:06d}.png"


def write_image(out_dir: Path, index: int, image: np.ndarray) -> Path:
    return atomic_write_bytes(image_path(out_dir, index), png_bytes(image))


def read_image(path: Path) -> Optional[np.ndarray]:
    """The image as (H, W, C) uint8, or None when the file is missing or not a valid PNG."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im)
    except (OSError, ValueError, SyntaxError):
        return None
    return arr[..., None] if arr.ndim == 2 else arr


def make_grid(images: np.ndarray, labels: Optional[Sequence[str]] = None, ncols: Optional[int] = None,
              pad: int = 2, scale: int = 1) -> np.ndarray:
    """(N, H, W, C) uint8 -> one RGB grid image; `labels` captions each cell."""
    from PIL import Image, ImageDraw
    n, h, w, c = images.shape
    ncols = ncols or min(n, max(1, int(math.ceil(math.sqrt(n)))))
    nrows = int(math.ceil(n / ncols))
    h2, w2 = h * scale, w * scale
    caption = 11 if labels else 0
    grid = Image.new("RGB", (ncols * (w2 + pad) + pad, nrows * (h2 + pad + caption) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        r, col = divmod(i, ncols)
        img = images[i]
        img = np.repeat(img, 3, axis=-1) if c == 1 else img
        tile = Image.fromarray(img).resize((w2, h2), Image.NEAREST)
        x0, y0 = pad + col * (w2 + pad), pad + r * (h2 + pad + caption)
        grid.paste(tile, (x0, y0 + caption))
        if labels:
            draw.text((x0 + 1, y0), str(labels[i])[: max(1, w2 // 6)], fill=(0, 0, 0))
    return np.asarray(grid)


def write_grid(path: Path, images: np.ndarray, labels: Optional[Sequence[str]] = None,
               ncols: Optional[int] = None) -> Path:
    h = images.shape[1]
    scale = max(1, 64 // h)  # small images (28-32 px) are enlarged so the grid is legible
    return atomic_write_bytes(path, png_bytes(make_grid(images, labels, ncols, scale=scale)))


def write_npz(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """ADM-format batch: arr_0 uint8 NHWC (3 channels, as the FID evaluator expects), arr_1
    labels."""
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, images, labels)

    return atomic_write(path, write)


def write_npy(path: Path, array: np.ndarray) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    return atomic_write(path, write)
