"""A PyTorch TerDiT as a model of the shared sampler (terdit_common.sampling): the runtime's torch
backend, `terdit.evaluate` and the trainer's previews all sample through this adapter, so one
model gives the same images everywhere."""
from __future__ import annotations

import sys
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from terdit_common.images import to_uint8
from terdit_common.sampling import ModelInfo, SampleOptions, sample_latents


class TorchForward:
    """forward(x, t, y, cfg_scale=None) over numpy arrays for a torch module taking (x, t, y)."""

    def __init__(self, module, device: Optional[torch.device] = None) -> None:
        self.module = module
        if device is None:
            first = next(module.parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
        self.device = device

    @torch.no_grad()
    def __call__(self, x: np.ndarray, t: np.ndarray, y: np.ndarray,
                 cfg_scale: Optional[float] = None) -> np.ndarray:
        out = self.module(torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(self.device),
                          torch.from_numpy(np.ascontiguousarray(t, np.float32)).to(self.device),
                          torch.from_numpy(np.ascontiguousarray(y, np.int64)).to(self.device))
        return out.float().cpu().numpy()


def inference_model(model: nn.Module, device: Optional[str | torch.device] = None,
                    dtype: Optional[torch.dtype] = None) -> nn.Module:
    """What every sampler runs for a TerDiT: the fused graph of the packed model (the exporter's
    structure; a latent model is packed on a copy first), or a full-precision model as it is,
    in eval mode on `device` (default: the model's) in `dtype` (default: the model's)."""
    import copy

    from .fused import FusedTerDiT
    from .ternary import pack_model_
    if model.cfg.ternary:
        if not model.packed:
            model = pack_model_(copy.deepcopy(model))
        model = FusedTerDiT(model)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model.eval()


def model_info(model, source: str = "", sha256: str = "",
               metadata: Optional[dict] = None) -> ModelInfo:
    return ModelInfo(model.cfg.to_dict(), source, sha256, None, dict(metadata or {}))


def sample_images(model, labels: Sequence[int], options: SampleOptions,
                  indices: Optional[Sequence[int]] = None, progress: bool = False,
                  metadata: Optional[dict] = None) -> np.ndarray:
    """uint8 (N, H, W, C) images of a pixel-space TerDiT (latent models: the first channels
    of the final latents), image i seeded by (options.seed, indices[i]): the images that
    `python -m runtime sample --backend torch` writes for the same settings."""
    info = model_info(model, metadata=metadata)
    forward = TorchForward(inference_model(model))
    indices = list(range(len(labels))) if indices is None else list(indices)
    from tqdm.auto import tqdm
    out = []
    # the bar is closed however the loop ends (an interrupt's message starts on its own line)
    with tqdm(total=len(labels), unit="img", desc="sampling", file=sys.stderr,
              dynamic_ncols=True, disable=not progress) as bar:
        for i in range(0, len(labels), options.batch_size):
            lat = sample_latents(forward, info, indices[i:i + options.batch_size],
                                 list(labels[i:i + options.batch_size]), options)
            out.append(to_uint8(lat if info.pixel_space else lat[:, :3]))
            bar.update(len(lat))
    return np.concatenate(out)
