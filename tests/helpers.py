"""Shared test helpers."""
from typing import Optional

import torch

from terdit import TerDiT, TerDiTConfig


def random_model(cfg: TerDiTConfig, std: float = 0.05, seed: Optional[int] = None) -> TerDiT:
    """A latent TerDiT whose every parameter is perturbed: the zero-initialised adaLN and final
    layers would otherwise make outputs trivially equal and hide bugs."""
    if seed is not None:
        torch.manual_seed(seed)
    model = TerDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model
