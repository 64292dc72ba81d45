"""The one loader of a diffusers AutoencoderKL directory (the exporter's --vae and the runtime's
--vae DIR): its config is checked within limits before diffusers allocates anything, diffusers'
loading notes are kept off stderr, and what goes wrong is one UserError naming the flag."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Optional

from terdit_common.errors import UserError
from terdit_common.vae import VAE_SCALE, read_vae_config


def load_autoencoder(path: str | Path, flag: str = "--vae",
                     latent_channels: Optional[int] = None):
    """(AutoencoderKL in eval mode, its latent scaling factor) from diffusers directory `path`;
    `latent_channels`, when given, is what the model's latents have."""
    read_vae_config(Path(path), flag, latent_channels)
    try:
        from diffusers.models import AutoencoderKL
        from diffusers.utils import logging as diffusers_logging
    except ImportError:
        raise UserError(f"{flag} {path} needs diffusers: pip install 'diffusers>=0.30'") from None
    try:
        with _quiet(diffusers_logging):
            vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True)
    # what diffusers raises for a directory it cannot load: missing / unreadable weights
    # (OSError), weights that do not fit the config (RuntimeError), config values of the wrong
    # type (TypeError, ValueError, KeyError)
    except (OSError, RuntimeError, TypeError, ValueError, KeyError) as err:
        text = " ".join(str(err).split())[:200]
        raise UserError(f"{flag} {path}: diffusers cannot load this AutoencoderKL directory "
                        f"({type(err).__name__}: {text}); pass a directory saved with "
                        f"AutoencoderKL.save_pretrained(DIR) (config.json and weights)") from None
    scaling = float(getattr(vae.config, "scaling_factor", VAE_SCALE) or VAE_SCALE)
    return vae.eval(), scaling


@contextlib.contextmanager
def _quiet(diffusers_logging):
    """diffusers' loading notes (accelerate missing, a weights file it falls back from, ...) are
    many lines on stderr; what goes wrong is raised and reported in one line instead."""
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)
