"""Classifier-free guidance over a [cond; uncond] batch (docs/design.md sections 2 and 6), for
numpy arrays and torch tensors alike."""
from __future__ import annotations

import sys

import numpy as np

from .errors import UserError

CFG_MODES = ("official", "standard")


def check_cfg_mode(mode: str, in_channels: int, flag: str = "--cfg-mode") -> str:
    """`mode`, if it can guide a model with `in_channels` channels: official guides eps channels
    0..2, so a model of fewer channels would have its variance channels guided instead."""
    if mode not in CFG_MODES:
        raise UserError(f"{flag} {mode!r} is not one of {', '.join(CFG_MODES)}")
    if mode == "official" and in_channels < 3:
        raise UserError(f"{flag} official guides eps channels 0..2, but this model has "
                        f"{in_channels} channel(s) (its variance channels would be guided); use "
                        f"{flag} standard")
    return mode


def default_cfg_mode(in_channels: int) -> str:
    """The official checkpoints guide eps channels 0..2 only; that is only meaningful for
    4-channel latents, so other models default to standard guidance."""
    return "official" if in_channels == 4 else "standard"


def guided_channels(mode: str, in_channels: int) -> int:
    if mode not in CFG_MODES:
        raise ValueError(f"cfg mode {mode!r} is not one of {CFG_MODES}")
    return 3 if mode == "official" else in_channels


def guide(out, scale, mode: str, in_channels: int):
    """Guided output of the n images of a [cond (n); uncond (n)] batch of model outputs
    (2n, C or 2C, H, W): eps channels per `mode` become uncond + scale * (cond - uncond), every
    other channel keeps the conditional half's value. Works on numpy arrays and torch tensors
    (scale may be a float or a 0-d array / tensor)."""
    g = guided_channels(mode, in_channels)
    n = out.shape[0] // 2
    cond, uncond = out[:n], out[n:]
    eps = uncond[:, :g] + scale * (cond[:, :g] - uncond[:, :g])
    if isinstance(out, np.ndarray):
        return np.concatenate([eps.astype(out.dtype, copy=False), cond[:, g:]], axis=1)
    torch = sys.modules["torch"]      # a tensor exists, so torch is imported
    return torch.cat([eps, cond[:, g:]], dim=1)
