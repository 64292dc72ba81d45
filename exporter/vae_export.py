"""Export of a diffusers AutoencoderKL decoder beside the model (vae_decoder.onnx)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor, nn

from terdit.autoencoder import load_autoencoder
from terdit.formats import TORCH_DTYPES
from terdit_common import op
from terdit_common.vae import read_vae_config, resolve_vae

from .graph import quiet_export, save_model
from .options import ExportError, ExportOptions
from .validate import cpu_session

# The VAE decoder is compared with PyTorch at the same dtype (its errors are not ternary-specific).
VAE_TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2}


class VaeDecoderGraph(nn.Module):
    def __init__(self, vae, scaling_factor: float) -> None:
        super().__init__()
        self.vae = vae
        self.scaling_factor = scaling_factor

    def forward(self, latent: Tensor) -> Tensor:
        return self.vae.decode(latent / self.scaling_factor).sample


def vae_source(vae_dir: str, latent_channels: Optional[int] = None) -> Path:
    """The --vae directory (a local path, or a hub name in the local cache), checked before any
    export work: a diffusers AutoencoderKL config within limits (and, given the model's latent
    channels, one that decodes them)."""
    vdir = resolve_vae(vae_dir)
    read_vae_config(vdir, "--vae", latent_channels)
    return vdir


def export_vae(vae_dir: str, out_path: Path, options: ExportOptions, latent_size: int,
               latent_channels: int, log: Callable[[str], None]) -> dict:
    """vae_decoder.onnx: latent (B, C, S, S) -> image (B, 3, 8S, 8S), batch dynamic, S fixed to
    the DiT's latent size."""
    vdir = vae_source(vae_dir)
    vae, scaling = load_autoencoder(vdir, "--vae", latent_channels)
    graph = VaeDecoderGraph(vae, scaling).to(TORCH_DTYPES[options.dtype]).eval()
    ch = int(vae.config.latent_channels)
    size = latent_size
    latent = torch.randn(2, ch, size, size, dtype=TORCH_DTYPES[options.dtype])
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad(), quiet_export():
        program = torch.onnx.export(graph, (latent,), dynamo=True, opset_version=op.GRAPH_OPSET,
                                    input_names=["latent"], output_names=["image"],
                                    dynamic_shapes={"latent": {0: batch}}, optimize=True,
                                    verify=False, verbose=False)
    save_model(program.model, out_path, external=False)
    info = {"file": out_path.name, "scaling_factor": scaling, "latent_channels": ch,
            "source": str(vdir.resolve()), "dtype": options.dtype}
    if options.validate and options.dtype != "bf16":
        sess = cpu_session(out_path, large=False)
        lat = torch.randn(3, ch, size, size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = graph(lat.to(TORCH_DTYPES[options.dtype])).float().numpy()
        out = sess.run(None, {"latent": lat.to(TORCH_DTYPES[options.dtype]).numpy()})[0].astype(np.float32)
        rel = float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-12))
        tol = VAE_TOLERANCE[options.dtype]
        info["validation"] = {"runtime": "onnxruntime CPU", "rel_err": rel, "tolerance": tol,
                              "passed": rel <= tol}
        log(f"  validate VAE decoder: rel err {rel:.3e}")
        if rel > tol:
            raise ExportError(f"VAE decoder validation failed: rel err {rel:.3e} > {tol:g}")
    return info
