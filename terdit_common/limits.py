"""Sane bounds of a model config, checked before any model is built or any work is sized by it
(a typo such as n_layers: 1000000 or image_size: 2**40 is refused in one line instead of filling
the machine's memory). The largest official model (7B: dim 4096, 32 layers) and 512 px (64x64
latents, 1024 tokens) are far inside them."""
from __future__ import annotations

import math

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
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise ValueError(f"{name}={_short(v)}: must be an integer from {lo} to {hi}")
    size, patch = cfg.get("input_size"), cfg.get("patch_size")
    if isinstance(size, int) and isinstance(patch, int) and patch and \
            (size // patch) ** 2 > MAX_TOKENS:
        raise ValueError(f"input_size={size} with patch_size={patch} gives "
                         f"{(size // patch) ** 2} tokens, more than {MAX_TOKENS}")
    mult = cfg.get("ffn_dim_multiplier")
    if mult is not None and (not isinstance(mult, (int, float)) or isinstance(mult, bool)
                             or not math.isfinite(mult) or not 0 < mult <= MAX_FFN_MULTIPLIER):
        raise ValueError(f"ffn_dim_multiplier={_short(mult)}: must be null or a number in "
                         f"(0, {MAX_FFN_MULTIPLIER}]")
    eps = cfg.get("norm_eps")
    if eps is not None and (not isinstance(eps, (int, float)) or isinstance(eps, bool)
                            or not math.isfinite(eps) or not 0 < eps < 1):
        raise ValueError(f"norm_eps={_short(eps)}: must be a number in (0, 1)")


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"
