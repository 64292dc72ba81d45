"""The sampling pipeline: shared guidance and schedulers over any backend, VAE decode, outputs.

Reproducibility: image `i`'s initial noise and every per-step noise come from one generator
seeded with (seed, i) alone, so an image does not depend on the batch size, on the other images
or on the number of ranks.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from . import outputs
from .backends import CFG_MODES, Backend, BackendError, ModelInfo
from .io import atomic_write_json, sha256_file
from .schedulers import SAMPLERS, make_scheduler

SAMPLES_FILE = "samples.json"
SAMPLES_FORMAT = "terdit-samples"
VAE_SCALING = 0.18215


class SamplingError(RuntimeError):
    """Sampling cannot go on (bad input, NaN/Inf latents, ...); the message names the cause."""


@dataclass(frozen=True)
class SampleOptions:
    steps: int = 50
    sampler: str = "ddim"
    eta: float = 0.0
    cfg_scale: float = 4.0
    cfg_mode: Optional[str] = None          # None: the model's default (official for 4-ch latents)
    seed: int = 0
    batch_size: int = 16
    clip_denoised: Optional[bool] = None     # None: on for pixel-space models, off for latents

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler={self.sampler!r} is not one of {SAMPLERS}")
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be a positive count")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be a positive count")
        if self.cfg_mode is not None and self.cfg_mode not in CFG_MODES:
            raise ValueError(f"cfg_mode={self.cfg_mode!r} is not one of {CFG_MODES}")
        if self.eta < 0:
            raise ValueError(f"eta={self.eta} must be >= 0")

    def result_settings(self) -> dict:
        """Everything that changes the images (not the batch size)."""
        d = dataclasses.asdict(self)
        d.pop("batch_size")
        return d


def image_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, index])))


def imagenet_to_model_label(imagenet_id: int) -> int:
    """The official models were trained on ImageFolder dirs "0".."999", sorted as strings."""
    if not 0 <= imagenet_id < 1000:
        raise ValueError(f"ImageNet id {imagenet_id} is not in [0, 1000)")
    return sorted(str(i) for i in range(1000)).index(str(imagenet_id))


def guide(out: np.ndarray, scale: float, mode: str, channels: int) -> np.ndarray:
    """CFG over a [cond; uncond] batch (DESIGN section 2): 'official' guides eps channels 0..2,
    'standard' all C eps channels; the other channels keep the conditional half's values."""
    n = out.shape[0] // 2
    g = 3 if mode == "official" else channels
    cond, uncond = out[:n], out[n:]
    res = cond.copy()
    res[:, :g] = uncond[:, :g] + np.float32(scale) * (cond[:, :g] - uncond[:, :g])
    return res


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, MemoryError):
        return True
    text = f"{type(err).__name__} {err}".lower()
    return any(s in text for s in ("out of memory", "outofmemory", "failed to allocate",
                                   "cuda_error_out_of_memory"))


# ---- VAE decoders --------------------------------------------------------------------------

class OrtVae:
    def __init__(self, path: Path) -> None:
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.log_severity_level = 3
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                     if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(str(path), so, providers=providers)
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
        self.scaling = float(getattr(self.vae.config, "scaling_factor", VAE_SCALING) or VAE_SCALING)
        self.source = str(path)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.no_grad():
            z = torch.from_numpy(latents).to(self.device) / self.scaling
            return self.vae.decode(z).sample.float().cpu().numpy()


def open_vae(path: Optional[str | os.PathLike], export_dir: Optional[Path]):
    """An explicit --vae (ONNX file or diffusers dir), else the export's vae_decoder.onnx."""
    if path is not None:
        p = Path(path)
        if p.suffix == ".onnx" and p.is_file():
            return OrtVae(p)
        if (p / "config.json").is_file():
            return DiffusersVae(p)
        raise BackendError(f"--vae {p}: expected a vae_decoder.onnx file or a diffusers "
                           f"AutoencoderKL directory (with config.json)")
    if export_dir is not None and (export_dir / "vae_decoder.onnx").is_file():
        return OrtVae(export_dir / "vae_decoder.onnx")
    return None


# ---- the pipeline ----------------------------------------------------------------------------

class Pipeline:
    def __init__(self, backend: Backend, vae=None) -> None:
        self.backend = backend
        self.info: ModelInfo = backend.info
        self.vae = vae

    @property
    def pixel_space(self) -> bool:
        return self.info.in_channels in (1, 3)

    def cfg_mode(self, options: SampleOptions) -> str:
        folded = self.info.folded_cfg
        if folded and options.cfg_mode and options.cfg_mode != folded:
            raise SamplingError(f"this graph has {folded!r} guidance folded in; --cfg-mode "
                                f"{options.cfg_mode} needs a re-export with --cfg {options.cfg_mode} "
                                f"(or --cfg none)")
        return folded or options.cfg_mode or self.info.default_cfg_mode

    def model_output(self, x: np.ndarray, t: int, y: np.ndarray, options: SampleOptions) -> np.ndarray:
        """Guided model output for B images at timestep t."""
        n = x.shape[0]
        tt = np.full(n, t, dtype=np.float32)
        guided = options.cfg_scale != 1.0
        if self.info.folded_cfg:
            return self.backend.forward(x, tt, y, options.cfg_scale)
        if not guided:
            return self.backend.forward(x, tt, y)
        null = np.full(n, self.info.null_class, dtype=np.int64)
        out = self.backend.forward(np.concatenate([x, x]), np.concatenate([tt, tt]),
                                   np.concatenate([y, null]))
        return guide(out, options.cfg_scale, self.cfg_mode(options), self.info.in_channels)

    def sample(self, indices: Sequence[int], labels: Sequence[int], options: SampleOptions,
               initial: Optional[np.ndarray] = None,
               on_step: Optional[Callable[[int], None]] = None) -> np.ndarray:
        """Final latents (B, C, H, W) of images `indices` with model labels `labels`."""
        c, s = self.info.in_channels, self.info.input_size
        if options.cfg_scale != 1.0:
            self.cfg_mode(options)  # refuses a mode the graph cannot do
        rngs = [image_rng(options.seed, int(i)) for i in indices]
        x = np.stack([r.standard_normal((c, s, s), dtype=np.float32) for r in rngs])
        if initial is not None:
            if initial.shape != x.shape:
                raise SamplingError(f"initial latents have shape {initial.shape}, expected {x.shape}")
            x = np.ascontiguousarray(initial, dtype=np.float32)
        y = np.asarray(labels, dtype=np.int64)
        clip = options.clip_denoised if options.clip_denoised is not None else self.pixel_space
        sched = make_scheduler(options.sampler, options.eta, clip)
        sched.set_timesteps(options.steps)
        for k, t in enumerate(sched.timesteps):
            out = self.model_output(x, int(t), y, options)
            noise = (np.stack([r.standard_normal((c, s, s), dtype=np.float32) for r in rngs])
                     if sched.needs_noise else None)
            x = sched.step(out, k, x, noise)
            bad = ~np.isfinite(x).reshape(len(x), -1).all(axis=1)
            if bad.any():
                j = int(np.argmax(bad))
                raise SamplingError(f"image {int(indices[j])}: latents became NaN/Inf at step "
                                    f"{k + 1}/{len(sched.timesteps)} (t={int(t)}); check the model "
                                    f"weights, --cfg and the dtype")
            if on_step:
                on_step(k)
        return x

    def decode(self, latents: np.ndarray) -> Optional[np.ndarray]:
        """uint8 NHWC images, or None for a latent model without a VAE."""
        if self.pixel_space:
            return outputs.to_uint8(latents)
        if self.vae is None:
            return None
        return outputs.to_uint8(self.vae.decode(latents))

    # ---- a whole run with files ----
    def run(self, out_dir: str | os.PathLike, labels: Sequence[int], options: SampleOptions, *,
            initial_latents: Optional[np.ndarray] = None, save_latents: bool = False,
            overwrite: bool = False, rank: int = 0, world_size: int = 1,
            barrier: Optional[Callable[[], None]] = None, progress: bool = True,
            extra_settings: Optional[dict] = None, log: Callable[[str], None] = print) -> dict:
        out = Path(out_dir)
        n = len(labels)
        if n < 1:
            raise SamplingError("nothing to sample: give --classes or a positive --num")
        if initial_latents is not None:
            want = (n, self.info.in_channels, self.info.input_size, self.info.input_size)
            if initial_latents.shape != want:
                raise SamplingError(f"--latents has shape {initial_latents.shape}, expected {want} "
                                    f"(one latent per image)")
        latent_only = not self.pixel_space and self.vae is None
        save_latents = save_latents or latent_only
        settings = {**options.result_settings(), "cfg_mode": self.cfg_mode(options)
                    if options.cfg_scale != 1.0 else None,
                    "clip_denoised": options.clip_denoised if options.clip_denoised is not None
                    else self.pixel_space,
                    "labels": [int(v) for v in labels], "num_images": n,
                    "initial_latents_sha256": None if initial_latents is None else
                    hashlib.sha256(np.ascontiguousarray(initial_latents).tobytes()).hexdigest(),
                    **(extra_settings or {})}
        record = {"format": SAMPLES_FORMAT, "version": 1,
                  "model": {"path": self.info.source, "sha256": self.info.sha256,
                            "backend": self.backend.name, "config": self.info.config},
                  "settings": settings,
                  "vae": getattr(self.vae, "source", None),
                  "outputs": {"images": None if latent_only else "images/NNNNNN.png",
                              "grid": None if latent_only else "grid.png",
                              "npz": None if latent_only else "samples.npz",
                              "latents": "latents.npy" if save_latents else None},
                  "complete": False}
        if rank == 0:
            self._prepare_dir(out, record, overwrite)
        if barrier:
            barrier()
        if latent_only and rank == 0:
            log("note: latent-space model and no VAE (export with --vae or pass --vae DIR): "
                "writing latents only")

        mine = [i for i in range(rank, n, world_size) if not self._done(out, i, latent_only, save_latents)]
        skipped = len(range(rank, n, world_size)) - len(mine)
        if skipped and rank == 0:
            log(f"resuming: {skipped} image(s) already written")
        t0 = time.time()
        self._generate(out, mine, labels, options, initial_latents, latent_only, save_latents,
                       progress and rank == 0)
        elapsed = time.time() - t0
        if barrier:
            barrier()
        if rank != 0:
            return record
        record.update(self._finalize(out, n, labels, latent_only, save_latents))
        record["complete"] = True
        record["timing"] = {"seconds": round(elapsed, 3), "images_generated_rank0": len(mine),
                            "images_per_second_rank0": round(len(mine) / elapsed, 3) if elapsed else None,
                            "world_size": world_size}
        record["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        atomic_write_json(out / SAMPLES_FILE, record)
        return record

    def _prepare_dir(self, out: Path, record: dict, overwrite: bool) -> None:
        path = out / SAMPLES_FILE
        if path.is_file() and not overwrite:
            try:
                old = json.loads(path.read_text())
            except json.JSONDecodeError:
                old = None
            same = (old and old.get("settings") == record["settings"]
                    and old.get("model", {}).get("sha256") == record["model"]["sha256"])
            if not same:
                raise SamplingError(f"{out} holds samples of a different run (model or settings "
                                    f"differ); choose another --out or pass --overwrite")
        elif out.exists() and any(out.iterdir()) and not overwrite and not path.is_file():
            raise SamplingError(f"{out} exists and is not a sample directory; choose another --out "
                                f"or pass --overwrite")
        elif overwrite and out.exists():
            for name in ("images", "latents"):
                shutil.rmtree(out / name, ignore_errors=True)
            for name in (SAMPLES_FILE, "grid.png", "samples.npz", "latents.npy"):
                (out / name).unlink(missing_ok=True)
        try:
            (out / "images").mkdir(parents=True, exist_ok=True)
            (out / "latents").mkdir(parents=True, exist_ok=True)
            probe = out / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise SamplingError(f"{out}: not writable ({err.strerror})") from None
        atomic_write_json(path, record)

    @staticmethod
    def _latent_path(out: Path, i: int) -> Path:
        return out / "latents" / f"{i:06d}.npy"

    def _done(self, out: Path, i: int, latent_only: bool, save_latents: bool) -> bool:
        if save_latents:
            try:
                lat = np.load(self._latent_path(out, i))
            except (OSError, ValueError):
                return False
            if lat.shape != (self.info.in_channels, self.info.input_size, self.info.input_size):
                return False
        return latent_only or outputs.read_image(outputs.image_path(out, i)) is not None

    def _generate(self, out: Path, todo: list[int], labels, options: SampleOptions,
                  initial: Optional[np.ndarray], latent_only: bool, save_latents: bool,
                  progress: bool) -> None:
        bar = None
        if progress and todo:
            from tqdm import tqdm
            bar = tqdm(total=len(todo), unit="img", desc="sampling", dynamic_ncols=True)
        batch = options.batch_size
        pos = 0
        try:
            while pos < len(todo):
                idx = todo[pos:pos + batch]
                try:
                    lat = self.sample(idx, [labels[i] for i in idx], options,
                                      None if initial is None else initial[idx])
                    images = None if latent_only else self.decode(lat)
                except SamplingError:
                    raise
                except Exception as err:  # noqa: BLE001 - only OOM is retried
                    if _is_oom(err) and batch > 1:
                        batch = max(1, batch // 2)
                        msg = f"out of memory: batch size halved to {batch}"
                        (bar.write if bar else print)(msg)
                        continue
                    raise
                for j, i in enumerate(idx):
                    if save_latents:
                        outputs.write_npy(self._latent_path(out, i), lat[j])
                    if images is not None:
                        outputs.write_image(out, i, images[j])
                pos += len(idx)
                if bar:
                    bar.update(len(idx))
        finally:
            if bar:
                bar.close()

    def _finalize(self, out: Path, n: int, labels, latent_only: bool, save_latents: bool) -> dict:
        result: dict = {}
        if save_latents:
            lats = np.stack([np.load(self._latent_path(out, i)) for i in range(n)])
            outputs.write_npy(out / "latents.npy", lats)
        if latent_only:
            return result
        images = []
        for i in range(n):
            img = outputs.read_image(outputs.image_path(out, i))
            if img is None:
                raise SamplingError(f"image {i} is missing after sampling ({outputs.image_path(out, i)})")
            images.append(img)
        arr = np.stack(images)
        outputs.write_npz(out / "samples.npz", arr, np.asarray(labels, dtype=np.int64))
        names = self.info.class_names
        caps = [names[v] if names and 0 <= v < len(names) else
                ("uncond" if v == self.info.null_class else str(v)) for v in labels]
        shown = min(n, 256)
        ncols = None
        uniq = len(set(labels[:shown]))
        if 1 < uniq <= 16 and shown % uniq == 0:
            ncols = uniq
        outputs.write_grid(out / "grid.png", arr[:shown], caps[:shown], ncols=ncols)
        result["files"] = {name: sha256_file(out / name) for name in ("samples.npz", "grid.png")}
        return result
