"""Every bound in one place, checked before any work is sized by it (a typo such as n_layers:
1000000, --threads 1000000 or an .npy header declaring 2**40 elements is refused in one line
naming the limit, instead of filling the machine's memory or crashing a native library).

- Model configs: the largest official model (7B: dim 4096, 32 layers) and 512 px (64x64 latents,
  1024 tokens) are far inside INT_BOUNDS.
- Counts and sizes of the command lines and the Python API, and sizes of input files (MAX_*;
  terdit_common.inputs applies them to files before reading)."""
from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np

from .errors import UserError

# field -> (smallest, largest) accepted value
INT_BOUNDS = {
    "input_size": (1, 1024),
    "patch_size": (1, 64),
    "in_channels": (1, 64),
    "dim": (2, 32768),
    "n_layers": (1, 512),
    "n_heads": (1, 1024),
    "multiple_of": (1, 65536),
    "num_classes": (1, 1_000_000),
}
MAX_TOKENS = 65536
MAX_FFN_MULTIPLIER = 64.0


def check_model_config(cfg: dict) -> None:
    """ValueError naming the first field of `cfg` (a dict of TerDiTConfig fields) that is not
    an integer / number within its bounds."""
    for name, (lo, hi) in INT_BOUNDS.items():
        if name not in cfg:
            continue
        v = cfg[name]
        if not is_int(v) or not lo <= v <= hi:
            raise ValueError(f"{name}={short(v)}: must be an integer from {lo} to {hi}")
    size, patch = cfg.get("input_size"), cfg.get("patch_size")
    if isinstance(size, int) and isinstance(patch, int) and patch and \
            (size // patch) ** 2 > MAX_TOKENS:
        raise ValueError(f"input_size={size} with patch_size={patch} gives "
                         f"{(size // patch) ** 2} tokens, more than {MAX_TOKENS}")
    mult = cfg.get("ffn_dim_multiplier")
    if mult is not None and (not isinstance(mult, (int, float)) or isinstance(mult, bool)
                             or not math.isfinite(mult) or not 0 < mult <= MAX_FFN_MULTIPLIER):
        raise ValueError(f"ffn_dim_multiplier={short(mult)}: must be null or a number in "
                         f"(0, {MAX_FFN_MULTIPLIER}]")
    eps = cfg.get("norm_eps")
    if eps is not None and (not isinstance(eps, (int, float)) or isinstance(eps, bool)
                            or not math.isfinite(eps) or not 0 < eps < 1):
        raise ValueError(f"norm_eps={short(eps)}: must be a number in (0, 1)")


def short(v) -> str:
    """repr(v) cut to fit a one-line message."""
    text = repr(v)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


def is_int(v) -> bool:
    """An integer value (numpy's too), not a bool."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


# ---- counts, sizes and files given on the command line (or to the Python API) ----------------
# Every one is checked before any work starts, so a typo is one line instead of a minute of work
# followed by an out-of-memory kill or a crash inside a native library.

MAX_IMAGES = 1_000_000          # images in one run (--num, --num-images), one .npz, one folder
MAX_BATCH = 65536               # images per forward (--batch-size; build-engine --*-batch)
MAX_SEED = 2**63 - 1
MAX_CFG_SCALE = 1e4             # |--cfg-scale| (guidance scales in use are below 20; float32 ends
                                # near 3e38, so larger values turn the output into inf)
MAX_ETA = 100.0                 # DDIM --eta (1 is DDPM's noise level)
MAX_THREADS = 1024              # --threads (ONNX Runtime / torch CPU threads)
MAX_WORLD_SIZE = 65536          # torchrun's WORLD_SIZE (processes of one run)
MAX_COUNT = 10**9               # the trainer's counts (--steps, --global-batch, --log-every ...)
MAX_IMAGE_SIZE = 4096           # pixels per side of an image read from an .npz or padded to
MAX_IMAGE_PIXELS = 8192 * 8192  # one image of a training folder (its header, before decoding)
MAX_ARRAY_BYTES = 64 << 30      # one array read from an .npy / .npz / IDX / safetensors file
MAX_WEIGHTS_BYTES = 256 << 30   # one weights file (checkpoint, export) before it is hashed/read
MAX_JSON_BYTES = 16 << 20       # one JSON file of ours or a config (manifest, record, config)
MAX_TEXT_BYTES = 1 << 30        # one text file read whole (a training log, a csv dataset)
MAX_HEADER_BYTES = 100 << 20    # the JSON header of a safetensors file
MAX_WORKSPACE_GIB = 1024.0      # build-engine --workspace-gib
MAX_EPOCHS = 10_000             # train-classifier --epochs
MAX_WIDTH = 4096                # train-classifier --width
MAX_SMOOTH = 1_000_000          # plot-losses --smooth
MAX_VALIDATE_BATCHES = 4        # exporter --validate-batches
MAX_VALIDATE_BATCH = 64         # the largest batch the exporter validates
# a diffusers AutoencoderKL config (--vae DIR), checked before diffusers allocates its weights
# (the SD VAE: block_out_channels [128, 256, 512, 512], layers_per_block 2)
VAE_INT_BOUNDS = {"latent_channels": (1, 64), "in_channels": (1, 4), "out_channels": (1, 4),
                  "layers_per_block": (1, 16), "norm_num_groups": (1, 1024)}
VAE_MAX_BLOCKS = 8
VAE_MAX_BLOCK_CHANNELS = 4096


def check_count(flag: str, value, lo: int, hi: int, unit: str = "") -> int:
    """`value` as an int in [lo, hi], else a UserError naming the flag, the value and the
    bounds (`unit` words them: "--num 0: must be from 1 to 1000000 images")."""
    if not is_int(value) or not lo <= value <= hi:
        rule = f"from {lo} to {hi} {unit}" if unit else f"an integer from {lo} to {hi}"
        raise UserError(f"{flag} {short(value)}: must be {rule}")
    return int(value)


def check_threads(threads, flag: str = "--threads") -> Optional[int]:
    """None or 0 (the library's default) .. MAX_THREADS."""
    if threads is None:
        return None
    if not is_int(threads) or not 0 <= threads <= MAX_THREADS:
        raise UserError(f"{flag} {short(threads)}: must be an integer from 0 (the library's "
                        f"default) to {MAX_THREADS} (limits.MAX_THREADS); more threads than "
                        f"CPU cores ({os.cpu_count()} here) only add overhead")
    return int(threads)


def check_array_bytes(where: str, shape, itemsize: int,
                      error: type[UserError] = UserError) -> int:
    """The bytes of an array that a file header declares, refused (before anything is read)
    above MAX_ARRAY_BYTES or the machine's memory."""
    nbytes = int(itemsize) * math.prod(int(d) for d in shape)
    limit = min(MAX_ARRAY_BYTES, physical_memory() or MAX_ARRAY_BYTES)
    if nbytes > limit:
        raise error(f"{where}: its header declares shape {tuple(int(d) for d in shape)}, "
                    f"{nbytes / 2**30:.1f} GiB, more than the limit of {limit / 2**30:.1f} GiB "
                    f"(MAX_ARRAY_BYTES or this machine's memory); pass a smaller file")
    return nbytes


def physical_memory() -> Optional[int]:
    """Bytes of this machine's memory; None if unknown."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


# ---- the trainer's model and schedule (checked before anything is built) ---------------------
MAX_PARAMETERS = 100_000_000_000  # parameters of a model the trainer builds (TerDiT-7B: 7.3e9)
MAX_TIMESTEPS = 100_000         # the trainer's --num-timesteps (the official schedule has 1000)
