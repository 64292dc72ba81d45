"""The Python API, shaped like a diffusers pipeline:

    from runtime import TerDiTPipeline
    pipe = TerDiTPipeline.from_pretrained("out/demo/onnx")            # an export or a checkpoint
    images = pipe(["Trouser", "Bag"], num_inference_steps=50, guidance_scale=3.0, seed=0).images

Image i of a call is image i of `python -m runtime sample` with the same labels (in the same
order), seed and sampler settings: both seed image i's noise with (seed, i).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from terdit_common.manifest import is_export_dir
from terdit_common.sampling import SampleOptions, imagenet_to_model_label

from .backends import open_backend
from .pipeline import Pipeline
from .vae import open_vae

OUTPUT_TYPES = ("pil", "np", "latent")


@dataclass
class TerDiTPipelineOutput:
    """`images`: a list of PIL images ("pil"), float32 (N, H, W, C) in [0, 1] ("np"), or the
    final latents (N, C, H, W) ("latent")."""

    images: Union[list, np.ndarray]
    labels: list[int]


class TerDiTPipeline:
    """Class-conditional sampling with any backend. Create it with `from_pretrained`."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.info = pipeline.info

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, backend: Optional[str] = None,
                        device: Optional[str] = None, vae: Optional[str] = None,
                        **backend_kwargs) -> "TerDiTPipeline":
        """`path`: an export directory (`python -m exporter`; backends ort, trt, torch) or a
        checkpoint (torch). backend None: ort for export directories, torch for checkpoints.
        `vae`: a VAE for latent models (default: the export's vae_decoder.onnx). Other keyword
        arguments go to the backend (e.g. threads=2 for ort, plugin=... for trt, dtype="bf16"
        for torch). `act_quant`: the activation mode of the ternary products; torch runs
        "none" (default), "int8" or "fp8"; ort and trt run the export's own mode and refuse
        another (BackendError)."""
        if device is not None:
            backend_kwargs["device"] = device
        opened = open_backend(path, backend, **backend_kwargs)
        export_dir = Path(path) if is_export_dir(path) else None
        decoder = None if opened.info.pixel_space else open_vae(vae, export_dir)
        return cls(Pipeline(opened, decoder))

    @property
    def labels(self) -> dict[str, int]:
        """Class name -> label id (names from the checkpoint's metadata; ids otherwise)."""
        names = self.info.class_names or [str(i) for i in range(self.info.num_classes)]
        return {name: i for i, name in enumerate(names)}

    def get_label_ids(self, names: Sequence[Union[str, int]]) -> list[int]:
        ids = []
        for name in names:
            if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
                ids.append(int(name))
            elif name in self.labels:
                ids.append(self.labels[name])
            else:
                raise ValueError(f"class {name!r} is not one of this model's classes: "
                                 f"{', '.join(list(self.labels)[:12])}")
        for v in ids:
            if not 0 <= v < self.info.num_classes:
                raise ValueError(f"class label {v} is outside [0, {self.info.num_classes})")
        return ids

    def __call__(self, class_labels: Sequence[Union[int, str]], num_inference_steps: int = 50,
                 guidance_scale: float = SampleOptions.cfg_scale, seed: int = 0,
                 sampler: str = "ddim", eta: float = 0.0, cfg_mode: Optional[str] = None,
                 clip_denoised: Optional[bool] = None, batch_size: int = 16,
                 output_type: str = "pil", imagenet_ids: bool = False
                 ) -> TerDiTPipelineOutput:
        """One image per entry of `class_labels` (ids, class names, or ImageNet ids with
        imagenet_ids=True for the official release)."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not one of {OUTPUT_TYPES}")
        labels = ([imagenet_to_model_label(int(c)) for c in class_labels] if imagenet_ids
                  else self.get_label_ids(class_labels))
        options = SampleOptions(steps=num_inference_steps, sampler=sampler, eta=eta,
                                cfg_scale=guidance_scale, cfg_mode=cfg_mode, seed=seed,
                                batch_size=batch_size, clip_denoised=clip_denoised)
        latents = np.concatenate([
            self.pipeline.sample(range(i, min(i + batch_size, len(labels))),
                                 labels[i:i + batch_size], options)
            for i in range(0, len(labels), batch_size)])
        if output_type == "latent":
            return TerDiTPipelineOutput(latents, labels)
        images = self.pipeline.decode(latents)
        if images is None:
            raise ValueError("this is a latent model without a VAE: pass vae=... to "
                             "from_pretrained or use output_type='latent'")
        if output_type == "np":
            return TerDiTPipelineOutput(images.astype(np.float32) / 255.0, labels)
        from PIL import Image
        return TerDiTPipelineOutput(
            [Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im) for im in images], labels)
