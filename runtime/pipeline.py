"""The runtime's one front door, shaped like a diffusers pipeline:

    from runtime import TerDiTPipeline
    pipe = TerDiTPipeline.from_pretrained("out/demo/onnx")            # an export or a checkpoint
    images = pipe(["Trouser", "Bag"], num_inference_steps=50, guidance_scale=3.0, seed=0).images

`TerDiTPipeline` owns every rule of a sampling job once: opening the backend (and, under
torchrun, its device), choosing the VAE, turning labels into model ids and checking them, and
the record of a run. Below it, `sample` / `decode` are the low-level steps; `run` writes a whole
run into a directory through runtime.writer, which only writes what the pipeline's
`sample_batch(indices)` returns. `python -m runtime sample` parses its flags and calls `run`.

Image i of a call is image i of `python -m runtime sample` with the same labels (in the same
order), seed and sampler settings: both seed image i's noise with (seed, i).

Errors: every bad argument (an unknown keyword of `from_pretrained`, an option the backend does
not use, empty or malformed `class_labels`, a bad sampler setting, a damaged export ...) raises
`runtime.UserError`, a ValueError whose text is the one line `python -m runtime sample` prints
for the same mistake (`BackendError` and `SamplingError` are its subclasses).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from terdit_common.cli import check_torchrun_env, env_int
from terdit_common.errors import UserError
from terdit_common.images import to_uint8
from terdit_common.limits import MAX_IMAGES, check_count, is_int, short
from terdit_common.manifest import export_dir_of
from terdit_common.sampling import (IMAGENET_CLASSES, ModelInfo, SampleOptions, SamplingError,
                                    check_initial_latents, check_model_options,
                                    imagenet_to_model_label, resolve_cfg_mode, resolve_clip,
                                    sample_latents)

from . import writer
from .backends import Backend
from .backends.opener import default_backend, open_backend
from .decoders import open_vae

OUTPUT_TYPES = ("pil", "np", "latent")


@dataclass
class TerDiTPipelineOutput:
    """`images`: a list of PIL images ("pil"), float32 (N, H, W, C) in [0, 1] ("np"), or the
    final latents (N, C, H, W) ("latent")."""

    images: Union[list, np.ndarray]
    labels: list[int]


class TerDiTPipeline:
    """Class-conditional sampling with any backend: `from_pretrained(path)`, or an opened
    backend and an optional VAE decoder. Bad arguments raise runtime.UserError (a ValueError)
    with the CLI's message."""

    def __init__(self, backend: Backend, vae=None) -> None:
        if isinstance(backend, (str, os.PathLike)):
            raise UserError(f"TerDiTPipeline({str(backend)!r}): open a path with "
                            f"TerDiTPipeline.from_pretrained")
        if not (callable(getattr(backend, "forward", None))
                and isinstance(getattr(backend, "info", None), ModelInfo)):
            raise UserError(f"TerDiTPipeline({short(backend)}): pass a backend "
                            f"(runtime.open_backend), or open a path with "
                            f"TerDiTPipeline.from_pretrained")
        self.backend = backend
        self.info: ModelInfo = backend.info
        if vae is not None and self.info.pixel_space:
            raise UserError(f"vae: {self.info.source} is a pixel-space model; there are no "
                            f"latents to decode: drop the VAE")
        self.vae = vae

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
        UserError (BackendError). Under torchrun the torch backend takes cuda:LOCAL_RANK."""
        if env_int("WORLD_SIZE", 1) > 1:
            _ranks()                     # the process group and this rank's GPU, before opening
            if device is None and isinstance(path, (str, os.PathLike)) and (
                    backend or default_backend(path)) == "torch":
                import torch
                if torch.cuda.is_available():
                    device = f"cuda:{env_int('LOCAL_RANK', 0)}"
        if device is not None:
            backend_kwargs["device"] = device
        opened = open_backend(path, backend, **backend_kwargs)
        return cls(opened, open_vae(vae, export_dir_of(path), opened.info))

    # ---- labels ------------------------------------------------------------------------

    @property
    def labels(self) -> dict[str, int]:
        """Class name -> label id (names from the checkpoint's metadata; ids otherwise)."""
        names = self.info.class_names or [str(i) for i in range(self.info.num_classes)]
        return {name: i for i, name in enumerate(names)}

    def get_label_ids(self, names: Sequence[Union[str, int]], imagenet_ids: bool = False,
                      flag: str = "class_labels") -> list[int]:
        """Model label ids of `names` (ids or class names; ImageNet ids with imagenet_ids), each
        checked against the model (`flag` names them in messages)."""
        if not isinstance(imagenet_ids, bool):
            raise UserError(f"imagenet_ids={short(imagenet_ids)}: must be True or False")
        if imagenet_ids and self.info.num_classes != IMAGENET_CLASSES:
            what = "--imagenet-ids" if flag.startswith("--") else "imagenet_ids=True"
            raise UserError(f"{what} maps ImageNet ids to the labels of the official "
                            f"{IMAGENET_CLASSES}-class release; {self.info.source} has "
                            f"{self.info.num_classes} classes: pass its own labels")
        ids = []
        for name in _label_list(names, flag):
            if is_int(name):
                ids.append(imagenet_to_model_label(int(name)) if imagenet_ids else int(name))
            elif imagenet_ids:
                raise UserError(f"{flag}: {short(name)} is not an ImageNet id; with "
                                f"imagenet_ids=True pass integers in [0, 1000)")
            elif isinstance(name, str) and name in self.labels:
                ids.append(self.labels[name])
            else:
                raise UserError(f"class {short(name)} is not one of this model's classes: "
                                f"{', '.join(list(self.labels)[:12])}")
        hint = "; use --uncond" if flag.startswith("--") else ""
        for v in ids:
            if not 0 <= v < self.info.num_classes:
                raise UserError(f"{flag} {v}: outside [0, {self.info.num_classes}) for this "
                                f"model (the null label {self.info.null_class} is not a user "
                                f"label{hint})")
        return ids

    def labels_for(self, classes: Optional[Sequence[int]] = None, num: Optional[int] = None,
                   imagenet_ids: bool = False, uncond: bool = False) -> list[int]:
        """The label of every image of a run: `classes` (default: every class in order) cycled
        over `num` images, or `num` unconditional images (the null label)."""
        if num is not None:
            check_count("--num", num, 1, MAX_IMAGES, "images")
        if not isinstance(uncond, bool):
            raise UserError(f"uncond={short(uncond)}: must be True or False")
        if uncond:
            return [self.info.null_class] * (num or 1)
        ids = self.get_label_ids(range(self.info.num_classes) if classes is None else classes,
                                 imagenet_ids, "--classes")
        n = len(ids) if num is None else num
        return [ids[i % len(ids)] for i in range(n)]

    # ---- the low-level steps -------------------------------------------------------------

    def sample(self, indices: Sequence[int], labels: Sequence[int], options: SampleOptions,
               initial: Optional[np.ndarray] = None,
               on_step: Optional[Callable[[int], None]] = None) -> np.ndarray:
        """Final latents (B, C, H, W) of images `indices` (their noise seeds) with model labels
        `labels` (user classes or the null label)."""
        return sample_latents(self.backend.forward, self.info, indices, labels, options,
                              initial, on_step)

    def decode(self, latents: np.ndarray) -> Optional[np.ndarray]:
        """uint8 (N, H, W, C) images with the model's channel count (a grayscale model gives
        C = 1; only the ADM samples.npz repeats it to RGB), or None for a latent model without
        a VAE."""
        c, size = self.info.in_channels, self.info.input_size
        if not (isinstance(latents, np.ndarray) and latents.ndim == 4
                and latents.shape[1:] == (c, size, size)):
            raise UserError(f"latents {getattr(latents, 'shape', short(latents))}: pass a numpy "
                            f"array (N, {c}, {size}, {size}) of this model's latents")
        if self.info.pixel_space:
            return to_uint8(latents)
        if self.vae is None:
            return None
        return to_uint8(self.vae.decode(latents))

    # ---- a call and a run ----------------------------------------------------------------

    def __call__(self, class_labels: Sequence[Union[int, str]], num_inference_steps: int = 50,
                 guidance_scale: float = SampleOptions.cfg_scale, seed: int = 0,
                 sampler: str = "ddim", eta: float = 0.0, cfg_mode: Optional[str] = None,
                 clip_denoised: Optional[bool] = None, batch_size: int = 16,
                 output_type: str = "pil", imagenet_ids: bool = False, **unknown
                 ) -> TerDiTPipelineOutput:
        """One image per entry of `class_labels` (ids, class names, or ImageNet ids with
        imagenet_ids=True for the official release)."""
        if unknown:
            raise UserError(f"unknown argument {', '.join(sorted(unknown))} of the pipeline "
                            f"call; it takes class_labels, num_inference_steps, guidance_scale, "
                            f"seed, sampler, eta, cfg_mode, clip_denoised, batch_size, "
                            f"output_type and imagenet_ids")
        if output_type not in OUTPUT_TYPES:
            raise UserError(f"output_type={short(output_type)} is not one of "
                            f"{', '.join(OUTPUT_TYPES)}")
        labels = self.get_label_ids(class_labels, imagenet_ids)
        options = SampleOptions(steps=num_inference_steps, sampler=sampler, eta=eta,
                                cfg_scale=guidance_scale, cfg_mode=cfg_mode, seed=seed,
                                batch_size=batch_size, clip_denoised=clip_denoised)
        latents = np.concatenate([
            self.sample(range(i, min(i + batch_size, len(labels))), labels[i:i + batch_size],
                        options)
            for i in range(0, len(labels), batch_size)])
        if output_type == "latent":
            return TerDiTPipelineOutput(latents, labels)
        images = self.decode(latents)
        if images is None:
            raise UserError("this is a latent model without a VAE: pass vae=... to "
                            "from_pretrained or use output_type='latent'")
        if output_type == "np":
            return TerDiTPipelineOutput(images.astype(np.float32) / 255.0, labels)
        from PIL import Image
        return TerDiTPipelineOutput(
            [Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im) for im in images], labels)

    def run(self, out_dir: str | os.PathLike, labels: Sequence[int], options: SampleOptions, *,
            initial_latents: Optional[np.ndarray] = None, save_latents: bool = False,
            overwrite: bool = False, progress: bool = True, notes: Optional[dict] = None,
            input_files: Optional[dict] = None, log: Callable[[str], None] = print) -> dict:
        """Sample one image per label into `out_dir` (PNGs, grid, ADM npz, samples.json),
        resuming what a previous run with the same model, backend and settings wrote (see
        runtime.writer). Under torchrun every rank takes its share of the images. `notes`:
        settings recorded for the record's sake (e.g. that labels came from ImageNet ids).
        `input_files`: {flag: path} of other files the run reads (the --latents file), which
        `out_dir` must not be, contain or lie inside. Returns the final samples.json record on
        rank 0."""
        if not isinstance(options, SampleOptions):
            raise UserError(f"options={short(options)}: pass a runtime.SampleOptions (e.g. "
                            f"SampleOptions(steps=50))")
        if not isinstance(out_dir, (str, os.PathLike)):
            raise UserError(f"out_dir={short(out_dir)}: pass the path of the output directory")
        for name, value in (("save_latents", save_latents), ("overwrite", overwrite),
                            ("progress", progress)):
            if not isinstance(value, bool):
                raise UserError(f"{name}={short(value)}: must be True or False")
        for name, value in (("notes", notes), ("input_files", input_files)):
            if value is not None and not isinstance(value, dict):
                raise UserError(f"{name}={short(value)}: pass a dict (or None)")
        labels = _label_list(labels, "labels")
        bad = next((v for v in labels if not is_int(v)), None)
        if bad is not None:
            raise UserError(f"labels: {short(bad)} is not a label id; pass the model's label ids "
                            f"(TerDiTPipeline.labels_for or get_label_ids turn classes into ids)")
        labels = [int(v) for v in labels]
        n = len(labels)
        if not 1 <= n <= MAX_IMAGES:
            raise SamplingError(f"--num {n}: must be from 1 to {MAX_IMAGES} images")
        info = self.info
        check_model_options(info, options)
        shape = (info.in_channels, info.input_size, info.input_size)
        check_initial_latents(initial_latents, (n, *shape))
        latent_only = not info.pixel_space and self.vae is None
        save_latents = save_latents or latent_only
        record = self._record(labels, options, initial_latents, latent_only, save_latents,
                              notes or {})

        def sample_batch(indices: list[int]):
            initial = None if initial_latents is None else initial_latents[indices]
            latents = self.sample(indices, [labels[i] for i in indices], options, initial)
            return latents, None if latent_only else self.decode(latents)

        model = export_dir_of(info.source) or Path(info.source)
        vae = getattr(self.vae, "source", None)
        job = writer.Job(out=Path(out_dir), record=record, labels=labels,
                         captions=[info.caption(v) for v in labels[:writer.GRID_MAX]],
                         latent_shape=shape, latent_only=latent_only, save_latents=save_latents,
                         batch_size=options.batch_size,
                         inputs={"--model": model,
                                 "--vae": vae if vae and Path(vae).exists() else None,
                                 **(input_files or {})})
        rank, world, barrier = _ranks()
        return writer.write_run(job, sample_batch, overwrite=overwrite, rank=rank,
                                world_size=world, barrier=barrier,
                                progress=progress and rank == 0, log=log)

    def _record(self, labels: list[int], options: SampleOptions,
                initial: Optional[np.ndarray], latent_only: bool, save_latents: bool,
                notes: dict) -> dict:
        """samples.json as a run starts: what a resume must match (the model by sha256, the
        backend and its settings, every sampling setting) and what the run writes."""
        info = self.info
        settings = {**options.result_settings(),
                    "cfg_mode": resolve_cfg_mode(info, options)
                    if options.cfg_scale != 1.0 else None,
                    "clip_denoised": resolve_clip(info, options),
                    "labels": labels, "num_images": len(labels),
                    "initial_latents_sha256": None if initial is None else
                    hashlib.sha256(np.ascontiguousarray(initial).tobytes()).hexdigest(),
                    **self.backend.settings}
        clash = sorted(set(notes) & set(settings))
        if clash:
            raise UserError(f"notes: {', '.join(clash)} are settings of the run; give notes "
                            f"other names")
        settings.update(notes)
        return {"format": writer.SAMPLES_FORMAT, "version": writer.SAMPLES_VERSION,
                "model": {"path": info.source, "sha256": info.sha256,
                          "backend": self.backend.name, "config": info.config},
                "settings": settings,
                "vae": getattr(self.vae, "source", None),
                "outputs": {"images": None if latent_only else "images/NNNNNN.png",
                            "grid": None if latent_only else "grid.png",
                            "npz": None if latent_only else "samples.npz",
                            "latents": "latents.npy" if save_latents else None},
                "complete": False}


def _label_list(class_labels, flag: str) -> list:
    """`class_labels` as a non-empty list; a lone string or id is refused, not iterated."""
    if isinstance(class_labels, (str, bytes)):
        raise UserError(f"{flag}={short(class_labels)} is a string; pass a list of labels, "
                        f"e.g. [{class_labels!r}]")
    if is_int(class_labels) or not isinstance(class_labels, (list, tuple, range, np.ndarray)):
        raise UserError(f"{flag}={short(class_labels)}: pass a list of class ids or names, one "
                        f"per image")
    labels = list(class_labels.tolist() if isinstance(class_labels, np.ndarray)
                  else class_labels)
    if not labels:
        raise UserError(f"{flag} is empty: pass one class id or name per image")
    if len(labels) > MAX_IMAGES:
        raise UserError(f"{flag} holds {len(labels)} labels, more than {MAX_IMAGES} images "
                        f"(limits.MAX_IMAGES); sample in several calls")
    return labels


def _ranks():
    """(rank, world size, barrier) under torchrun; a single process needs no torch.distributed."""
    world = env_int("WORLD_SIZE", 1)
    if world <= 1:
        check_torchrun_env()
        return 0, 1, None
    import torch
    import torch.distributed as dist
    if not dist.is_initialized():
        check_torchrun_env()
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(env_int("LOCAL_RANK", 0))
    return dist.get_rank(), dist.get_world_size(), dist.barrier


__all__ = ["OUTPUT_TYPES", "TerDiTPipeline", "TerDiTPipelineOutput"]
