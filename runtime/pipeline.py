"""The sampling pipeline over any backend: the shared sampler (terdit_common.sampling), VAE
decoding, and whole runs into an output directory (runtime.run).

Low-level API (the high-level one is runtime.api.TerDiTPipeline):

    pipe = Pipeline("out/demo/onnx")                 # or Pipeline(open_backend(path, "torch"))
    latents = pipe.sample([0, 1], [3, 7], SampleOptions(steps=50, cfg_scale=3.0))
    images = pipe.decode(latents)                    # uint8 (N, H, W, C), C = the model's (1 or 3)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from terdit_common.errors import UserError
from terdit_common.images import to_uint8
from terdit_common.manifest import export_dir_of
from terdit_common.sampling import (ModelInfo, SampleOptions, SamplingError, resolve_cfg_mode,
                                    sample_latents)

from .backends import Backend, open_backend
from .vae import open_vae


class Pipeline:
    """A backend (or a path, opened with `open_backend` and its keyword arguments, e.g.
    backend="torch", act_quant="int8") plus an optional VAE decoder (default: the export's
    vae_decoder.onnx for latent models)."""

    def __init__(self, backend: Backend | str | os.PathLike, vae=None, **backend_kwargs) -> None:
        source = None
        if isinstance(backend, (str, os.PathLike)):
            source = Path(backend)
            backend = open_backend(source, backend_kwargs.pop("backend", None), **backend_kwargs)
        elif backend_kwargs:
            raise UserError(f"backend options {sorted(backend_kwargs)} need a path, not an "
                            f"opened backend")
        self.backend = backend
        self.info: ModelInfo = backend.info
        if vae is not None and self.info.pixel_space:
            raise UserError(f"vae: {self.info.source} is a pixel-space model; there are no "
                            f"latents to decode: drop the VAE")
        if vae is None and source is not None:
            vae = open_vae(None, export_dir_of(source), self.info)
        self.vae = vae

    @property
    def pixel_space(self) -> bool:
        return self.info.pixel_space

    def cfg_mode(self, options: SampleOptions) -> str:
        return resolve_cfg_mode(self.info, options)

    def sample(self, indices: Sequence[int], labels: Sequence[int], options: SampleOptions,
               initial: Optional[np.ndarray] = None,
               on_step: Optional[Callable[[int], None]] = None) -> np.ndarray:
        """Final latents (B, C, H, W) of images `indices` (their noise seeds) with model labels
        `labels`."""
        for v in labels:
            if not 0 <= int(v) <= self.info.num_classes:
                raise SamplingError(f"label {v} is outside [0, {self.info.num_classes}] (the "
                                    f"last is the null label)")
        return sample_latents(self.backend.forward, self.info, indices, labels, options,
                              initial, on_step)

    def decode(self, latents: np.ndarray) -> Optional[np.ndarray]:
        """uint8 (N, H, W, C) images with the model's channel count (a grayscale model gives
        C = 1; only the ADM samples.npz repeats it to RGB), or None for a latent model without
        a VAE."""
        if self.pixel_space:
            return to_uint8(latents)
        if self.vae is None:
            return None
        return to_uint8(self.vae.decode(latents))

    def run(self, out_dir: str | os.PathLike, labels: Sequence[int], options: SampleOptions,
            **kwargs) -> dict:
        """Sample every image into `out_dir` (PNGs, grid, ADM npz, samples.json), resuming what
        a previous run with the same model and settings wrote; see runtime.run.run_to_dir."""
        from .run import run_to_dir
        return run_to_dir(self, Path(out_dir), list(labels), options, **kwargs)
