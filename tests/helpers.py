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


def pixel_checkpoint(path, seed: int = 0, num_classes: int = 3, n_layers: int = 2,
                     class_names=None, fp: bool = False):
    """A tiny 1-channel 8x8 pixel-space model saved as a checkpoint directory (returns it)."""
    from terdit import save_checkpoint
    cfg = TerDiTConfig(input_size=8, patch_size=2, in_channels=1, dim=32, n_layers=n_layers,
                       n_heads=2, multiple_of=32, num_classes=num_classes, ternary=not fp)
    metadata = {"class_names": list(class_names)} if class_names else None
    return save_checkpoint(random_model(cfg, seed=seed), path, metadata=metadata)


def tiny_vae(path, block_out_channels=(8, 16)):
    """A small randomly initialised diffusers AutoencoderKL (4 latent channels, 2x2 upsampling
    per block) saved to `path`; needs diffusers."""
    import diffusers
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=block_out_channels,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                                  layers_per_block=1, norm_num_groups=8)
    vae.save_pretrained(path)
    return vae
