"""VAE decoders for latent models: the export's vae_decoder.onnx (ONNX Runtime) or a diffusers
AutoencoderKL (a local directory, or a hub name found in the local Hugging Face cache)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from terdit_common.manifest import VAE_FILE
from terdit_common.ort import ort_session
from terdit_common.vae import VAE_SCALE, resolve_vae

from .backends import BackendError


class OrtVae:
    def __init__(self, path: Path) -> None:
        self.session = ort_session(path)
        self.source = str(path)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"latent": latents.astype(np.float32)})[0]


class DiffusersVae:
    def __init__(self, path: Path, device: Optional[str] = None) -> None:
        try:
            import torch
            from diffusers.models import AutoencoderKL
        except ImportError:
            raise BackendError("--vae DIR needs diffusers and torch: pip install diffusers") from None
        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True).to(self.device).eval()
        self.scaling = float(getattr(self.vae.config, "scaling_factor", VAE_SCALE) or VAE_SCALE)
        self.source = str(path)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.no_grad():
            z = torch.from_numpy(latents).to(self.device) / self.scaling
            return self.vae.decode(z).sample.float().cpu().numpy()


def open_vae(spec: Optional[str | os.PathLike], export_dir: Optional[Path]):
    """An explicit --vae (ONNX file, diffusers directory or cached hub name), else the export's
    vae_decoder.onnx, else None."""
    if spec is not None:
        p = resolve_vae(str(spec))
        if p.suffix == ".onnx" and p.is_file():
            return OrtVae(p)
        if (p / "config.json").is_file():
            return DiffusersVae(p)
        raise BackendError(f"--vae {spec}: expected a vae_decoder.onnx file, a diffusers "
                           f"AutoencoderKL directory (with config.json) or a hub name in the "
                           f"local Hugging Face cache")
    if export_dir is not None and (export_dir / VAE_FILE).is_file():
        return OrtVae(export_dir / VAE_FILE)
    return None
