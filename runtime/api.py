"""The Python API, shaped like a diffusers pipeline:

    from runtime import TerDiTPipeline
    pipe = TerDiTPipeline.from_pretrained("out/demo/onnx")            # an export or a checkpoint
    images = pipe(["Trouser", "Bag"], num_inference_steps=50, guidance_scale=3.0, seed=0).images

Image i of a call is image i of `python -m runtime sample` with the same labels (in the same
order), seed and sampler settings: both seed image i's noise with (seed, i).

Errors: every bad argument (an unknown keyword of `from_pretrained`, an option the backend does
not use, empty or malformed `class_labels`, a bad sampler setting, a damaged export ...) raises
`runtime.UserError`, a ValueError whose text is the one line `python -m runtime sample` prints
for the same mistake (`BackendError` and `SamplingError` are its subclasses).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

from terdit_common.errors import UserError
from terdit_common.limits import MAX_IMAGES
from terdit_common.manifest import export_dir_of
from terdit_common.sampling import SampleOptions, imagenet_to_model_label

from .backends import open_backend
from .pipeline import Pipeline
from .vae import open_vae

OUTPUT_TYPES = ("pil", "np", "latent")


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _label_list(class_labels) -> list:
    """`class_labels` as a non-empty list; a lone string or id is refused, not iterated."""
    if isinstance(class_labels, (str, bytes)):
        raise UserError(f"class_labels={_short(class_labels)} is a string; pass a list of "
                        f"labels, e.g. [{class_labels!r}]")
    if _is_int(class_labels) or not isinstance(class_labels, (list, tuple, range, np.ndarray)):
        raise UserError(f"class_labels={_short(class_labels)}: pass a list of class ids or "
                        f"names, one per image")
    labels = list(class_labels.tolist() if isinstance(class_labels, np.ndarray)
                  else class_labels)
    if not labels:
        raise UserError("class_labels is empty: pass one class id or name per image")
    if len(labels) > MAX_IMAGES:
        raise UserError(f"class_labels holds {len(labels)} labels, more than {MAX_IMAGES} images "
                        f"(limits.MAX_IMAGES); sample in several calls")
    return labels


@dataclass
class TerDiTPipelineOutput:
    """`images`: a list of PIL images ("pil"), float32 (N, H, W, C) in [0, 1] ("np"), or the
    final latents (N, C, H, W) ("latent")."""

    images: Union[list, np.ndarray]
    labels: list[int]


class TerDiTPipeline:
    """Class-conditional sampling with any backend. Create it with `from_pretrained`. Bad
    arguments raise runtime.UserError (a ValueError) with the CLI's message."""

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
        another. An unknown keyword, or an option the chosen backend does not use, raises
        UserError (BackendError)."""
        if device is not None:
            backend_kwargs["device"] = device
        opened = open_backend(path, backend, **backend_kwargs)
        return cls(Pipeline(opened, open_vae(vae, export_dir_of(path), opened.info)))

    @property
    def labels(self) -> dict[str, int]:
        """Class name -> label id (names from the checkpoint's metadata; ids otherwise)."""
        names = self.info.class_names or [str(i) for i in range(self.info.num_classes)]
        return {name: i for i, name in enumerate(names)}

    def get_label_ids(self, names: Sequence[Union[str, int]], imagenet_ids: bool = False
                      ) -> list[int]:
        """Model label ids of `names` (ids or class names; ImageNet ids with imagenet_ids)."""
        names = _label_list(names)
        ids = []
        for name in names:
            if _is_int(name):
                ids.append(imagenet_to_model_label(int(name)) if imagenet_ids else int(name))
            elif imagenet_ids:
                raise UserError(f"class_labels: {_short(name)} is not an ImageNet id; with "
                                f"imagenet_ids=True pass integers in [0, 1000)")
            elif isinstance(name, str) and name in self.labels:
                ids.append(self.labels[name])
            else:
                raise UserError(f"class {_short(name)} is not one of this model's classes: "
                                f"{', '.join(list(self.labels)[:12])}")
        for v in ids:
            if not 0 <= v < self.info.num_classes:
                raise UserError(f"class label {v} is outside [0, {self.info.num_classes}) for "
                                f"this model")
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
            raise UserError(f"output_type={_short(output_type)} is not one of "
                            f"{', '.join(OUTPUT_TYPES)}")
        if imagenet_ids not in (True, False):
            raise UserError(f"imagenet_ids={_short(imagenet_ids)}: must be True or False")
        labels = self.get_label_ids(class_labels, imagenet_ids)
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
            raise UserError("this is a latent model without a VAE: pass vae=... to "
                            "from_pretrained or use output_type='latent'")
        if output_type == "np":
            return TerDiTPipelineOutput(images.astype(np.float32) / 255.0, labels)
        from PIL import Image
        return TerDiTPipelineOutput(
            [Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im) for im in images], labels)
