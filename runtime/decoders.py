"""VAE decoders for latent models: the export's vae_decoder.onnx (ONNX Runtime) or a diffusers
AutoencoderKL (a local directory, or a hub name found in the local Hugging Face cache).
`open_vae` is the one place that decides which VAE a model gets (and refuses one for a
pixel-space model, which has no latents to decode)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from terdit_common.entry import signals_held
from terdit_common.inputs import input_file
from terdit_common.manifest import VAE_FILE
from terdit_common.ort import ort_session
from terdit_common.sampling import ModelInfo
from terdit_common.vae import resolve_vae

from .backends.protocol import BackendError


class OrtVae:
    def __init__(self, path: Path, latent_channels: Optional[int] = None,
                 flag: str = "--vae") -> None:
        self.session = ort_session(path, flag=flag if flag.startswith("--") else "",
                                   fix="pass a vae_decoder.onnx written by `python -m exporter "
                                       "... --vae DIR`, or a diffusers AutoencoderKL directory")
        self.source = str(path)
        inputs = self.session.get_inputs()
        shape = inputs[0].shape if len(inputs) == 1 else None
        if len(inputs) != 1 or inputs[0].name != "latent" or len(shape) != 4:
            found = ", ".join(f"{i.name} {i.shape}" for i in inputs)
            raise BackendError(f"{flag} {path}: a VAE decoder takes one input 'latent' (N, C, H, "
                               f"W), this file takes {found}; export one with `python -m "
                               f"exporter ... --vae DIR`")
        if latent_channels is not None and isinstance(shape[1], int) \
                and shape[1] != latent_channels:
            raise BackendError(f"{flag} {path}: decodes {shape[1]}-channel latents, the model's "
                               f"have {latent_channels}; pass the VAE the model was trained with")

    def decode(self, latents: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"latent": latents.astype(np.float32)})[0]


class DiffusersVae:
    def __init__(self, path: Path, device: Optional[str] = None,
                 latent_channels: Optional[int] = None, flag: str = "--vae") -> None:
        try:
            with signals_held():
                import torch

                from terdit.autoencoder import load_autoencoder
        except ImportError:
            raise BackendError(f"{flag} DIR needs torch and diffusers: pip install torch "
                               f"diffusers") from None
        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        vae, self.scaling = load_autoencoder(path, flag, latent_channels)
        self.vae = vae.to(self.device)
        self.source = str(path)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.no_grad():
            z = torch.from_numpy(latents).to(self.device) / self.scaling
            return self.vae.decode(z).sample.float().cpu().numpy()


def open_vae(spec: Optional[str | os.PathLike], export_dir: Optional[Path],
             info: Optional[ModelInfo] = None, flag: str = "--vae"):
    """The VAE of a model described by `info`: an explicit `spec` (an ONNX file, a diffusers
    directory or a cached hub name), else the export's vae_decoder.onnx, else None. A pixel-space
    model gets None, and a `spec` for it is refused (no latents to decode)."""
    channels = None if info is None else info.in_channels
    if info is not None and info.pixel_space:
        if spec is not None:
            raise BackendError(f"{flag} {spec}: {info.source} is a pixel-space model "
                               f"({channels} channel(s)) and writes its images directly; there "
                               f"are no latents to decode: drop {flag}")
        return None
    if spec is not None:
        if not isinstance(spec, (str, os.PathLike)):
            raise BackendError(f"{flag}={spec!r}: pass a path or a hub name")
        p = resolve_vae(str(spec))
        if p.suffix == ".onnx":
            return OrtVae(input_file(p, flag, "pass a vae_decoder.onnx, a diffusers "
                                              "AutoencoderKL directory or a cached hub name"),
                          channels, flag)
        if p.is_dir():
            return DiffusersVae(p, latent_channels=channels, flag=flag)
        raise BackendError(f"{flag} {spec}: expected a vae_decoder.onnx file, a diffusers "
                           f"AutoencoderKL directory (with config.json) or a hub name in the "
                           f"local Hugging Face cache")
    if export_dir is not None and (export_dir / VAE_FILE).is_file():
        # listed and verified with the export (open_export refuses an unlisted file)
        return OrtVae(export_dir / VAE_FILE, channels, "the export's")
    return None
