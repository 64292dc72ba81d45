"""The one sampling loop: seeded per-image noise, classifier-free guidance and a numpy scheduler
over any model that implements `forward(x, t, y, cfg_scale=None)` (an ONNX Runtime session, a
TensorRT engine or the PyTorch model). The runtime, `terdit.evaluate` and the trainer's previews
all sample through it, so their images are the same images.

Reproducibility: image `i`'s initial noise and every per-step noise come from one generator
seeded with (seed, i) alone, so an image does not depend on the batch size, on the other images
or on the number of ranks.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence

import numpy as np

from .errors import UserError
from .guidance import CFG_MODES, check_cfg_mode, default_cfg_mode, guide
from .limits import MAX_BATCH, MAX_CFG_SCALE, MAX_ETA, MAX_SEED, is_int, short
from .noise_schedule import NUM_TRAIN_STEPS, space_timesteps
from .schedulers import DIFFUSERS_PREFIX, ETA_SAMPLERS, SAMPLERS, check_sampler, make_scheduler


class SamplingError(UserError):
    """Sampling cannot go on (NaN/Inf latents, a mode the graph cannot do, ...)."""


class Forward(Protocol):
    def __call__(self, x: np.ndarray, t: np.ndarray, y: np.ndarray,
                 cfg_scale: Optional[float] = None) -> np.ndarray: ...


@dataclass(frozen=True)
class SampleOptions:
    """How to sample; every default of `python -m runtime sample`, `terdit.evaluate` and the
    trainer's previews lives here. Every field is checked on creation (UserError naming the
    flag); a setting that the sampler would ignore is refused, not dropped."""

    steps: int = 50
    sampler: str = "ddim"
    eta: float = 0.0
    cfg_scale: float = 4.0
    cfg_mode: Optional[str] = None          # None: the model's default (official for 4-ch latents)
    seed: int = 0
    batch_size: int = 16
    clip_denoised: Optional[bool] = None     # None: on for pixel-space models, off for latents

    def __post_init__(self) -> None:
        def bad(name: str, flag: str, rule: str) -> None:
            raise UserError(f"{flag} {getattr(self, name)!r}: {rule}")

        if not isinstance(self.sampler, str):
            bad("sampler", "--sampler", "must be a sampler name such as 'ddim'")
        if not is_int(self.steps) or not 1 <= self.steps <= NUM_TRAIN_STEPS:
            bad("steps", "--steps", f"must be an integer from 1 to {NUM_TRAIN_STEPS} (the "
                                    f"training timesteps)")
        if self.sampler == "ddim":
            try:
                space_timesteps(NUM_TRAIN_STEPS, f"ddim{self.steps}")
            except ValueError as err:
                raise UserError(f"--steps {self.steps}: {err}") from None
        if not is_int(self.batch_size) or not 1 <= self.batch_size <= MAX_BATCH:
            bad("batch_size", "--batch-size", f"must be an integer from 1 to {MAX_BATCH}")
        if not is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            bad("seed", "--seed", "must be a non-negative integer")
        if not _finite(self.cfg_scale) or abs(self.cfg_scale) > MAX_CFG_SCALE:
            bad("cfg_scale", "--cfg-scale", f"must be a number from {-MAX_CFG_SCALE:g} to "
                                            f"{MAX_CFG_SCALE:g} (limits.MAX_CFG_SCALE; 1 disables "
                                            f"guidance)")
        if not _finite(self.eta) or not 0 <= self.eta <= MAX_ETA:
            bad("eta", "--eta", f"must be a number from 0 to {MAX_ETA:g} (limits.MAX_ETA)")
        if self.cfg_mode is not None and self.cfg_mode not in CFG_MODES:
            bad("cfg_mode", "--cfg-mode", f"choose one of {', '.join(CFG_MODES)}")
        if self.cfg_mode is not None and self.cfg_scale == 1:
            bad("cfg_mode", "--cfg-mode", "has no effect with --cfg-scale 1 (no guidance); drop "
                                          "--cfg-mode or set a --cfg-scale above 1")
        if self.clip_denoised not in (None, True, False):
            bad("clip_denoised", "--clip-denoised", "must be True, False or None (the default)")
        if self.eta:
            check_eta_given(self.eta, self.sampler)
        if self.clip_denoised and self.sampler.startswith(DIFFUSERS_PREFIX):
            raise UserError(f"--clip-denoised: --sampler {self.sampler} does not clamp x_0 (a "
                            f"diffusers scheduler runs with its own clip_sample=False); drop "
                            f"--clip-denoised or use a built-in sampler")
        # last: a diffusers scheduler is built once to check that it can run these settings
        check_sampler(self.sampler, self.steps, self.eta)

    def replace(self, **changes) -> "SampleOptions":
        return dataclasses.replace(self, **changes)

    def result_settings(self) -> dict:
        """Everything that changes the images (not the batch size)."""
        d = dataclasses.asdict(self)
        d.pop("batch_size")
        return d


def check_eta_given(eta, sampler: str) -> None:
    """An --eta given (0 too) to a built-in sampler that has none is refused: it would have no
    effect (diffusers schedulers are checked against their step() when built)."""
    if sampler in SAMPLERS and sampler not in ETA_SAMPLERS:
        raise UserError(f"--eta {eta!r}: --sampler {sampler} has no eta (only "
                        f"{', '.join(ETA_SAMPLERS)} and diffusers schedulers whose step() takes "
                        f"one); drop --eta or use --sampler ddim")


def _finite(v) -> bool:
    return isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) \
        and math.isfinite(float(v))


@dataclass
class ModelInfo:
    """What the sampler needs to know about a model, whatever runs it."""

    config: dict
    source: str
    sha256: str
    folded_cfg: Optional[str] = None          # "official" | "standard" when guidance is in-graph
    metadata: dict = field(default_factory=dict)

    @property
    def in_channels(self) -> int:
        return int(self.config["in_channels"])

    @property
    def input_size(self) -> int:
        return int(self.config["input_size"])

    @property
    def num_classes(self) -> int:
        return int(self.config["num_classes"])

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def pixel_space(self) -> bool:
        return self.in_channels in (1, 3)

    @property
    def default_cfg_mode(self) -> str:
        return default_cfg_mode(self.in_channels)

    @property
    def class_names(self) -> Optional[list[str]]:
        names = self.metadata.get("class_names") if isinstance(self.metadata, dict) else None
        if isinstance(names, list) and all(isinstance(s, str) for s in names):
            return list(names)
        return None

    @property
    def num_timesteps(self) -> int:
        """The diffusion steps T the model was trained with (the trainer's --num-timesteps, kept
        in the metadata; the official models and checkpoints without a record: 1000)."""
        train = self.metadata.get("train_config") if isinstance(self.metadata, dict) else None
        value = train.get("num_timesteps") if isinstance(train, dict) else None
        return value if isinstance(value, int) and not isinstance(value, bool) \
            else NUM_TRAIN_STEPS

    def caption(self, label: int) -> str:
        names = self.class_names
        if names and 0 <= label < len(names):
            return names[label]
        return "uncond" if label == self.null_class else str(label)


def image_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, index])))


IMAGENET_CLASSES = 1000


def imagenet_to_model_label(imagenet_id: int) -> int:
    """The official models were trained on ImageFolder dirs "0".."999", sorted as strings."""
    if not is_int(imagenet_id) or not 0 <= imagenet_id < IMAGENET_CLASSES:
        raise UserError(f"ImageNet id {imagenet_id!r} (--classes with --imagenet-ids) is not an "
                        f"integer in [0, {IMAGENET_CLASSES}); pass ImageNet class ids, or drop "
                        f"--imagenet-ids to pass the model's own labels")
    return sorted(str(i) for i in range(IMAGENET_CLASSES)).index(str(imagenet_id))


def resolve_cfg_mode(info: ModelInfo, options: SampleOptions) -> str:
    folded = info.folded_cfg
    if folded and options.cfg_mode and options.cfg_mode != folded:
        raise SamplingError(f"this graph has {folded!r} guidance folded in; --cfg-mode "
                            f"{options.cfg_mode} needs a re-export with --cfg {options.cfg_mode} "
                            f"(or --cfg none)")
    return check_cfg_mode(folded or options.cfg_mode or info.default_cfg_mode, info.in_channels)


def resolve_clip(info: ModelInfo, options: SampleOptions) -> bool:
    """--clip-denoised as given, else on for pixel-space models; diffusers schedulers never clamp
    (their clip_sample is off; SampleOptions refuses --clip-denoised with them)."""
    if options.sampler.startswith(DIFFUSERS_PREFIX):
        return False
    return options.clip_denoised if options.clip_denoised is not None else info.pixel_space


def guided_forward(forward: Forward, info: ModelInfo, x: np.ndarray, t: int, y: np.ndarray,
                   options: SampleOptions) -> np.ndarray:
    """The guided model output for B images at timestep t."""
    n = x.shape[0]
    tt = np.full(n, t, dtype=np.float32)
    if info.folded_cfg:
        return forward(x, tt, y, options.cfg_scale)
    if options.cfg_scale == 1.0:
        return forward(x, tt, y)
    null = np.full(n, info.null_class, dtype=np.int64)
    out = forward(np.concatenate([x, x]), np.concatenate([tt, tt]), np.concatenate([y, null]))
    return guide(out, np.float32(options.cfg_scale), resolve_cfg_mode(info, options),
                 info.in_channels)


def check_model_options(info: ModelInfo, options: SampleOptions) -> None:
    """SamplingError unless `options` can sample this model: a guidance mode its graph can do, a
    sampler its outputs support, and the diffusion schedule it was trained on."""
    if options.cfg_scale != 1.0:
        resolve_cfg_mode(info, options)     # refuses a mode the graph cannot do
    if options.sampler == "ddpm" and not info.config.get("learn_sigma", True):
        raise SamplingError(f"--sampler ddpm needs a learned-sigma model (2C output channels); "
                            f"{info.source} has learn_sigma=false: use --sampler ddim or "
                            f"dpm-solver")
    if info.num_timesteps != NUM_TRAIN_STEPS:
        raise SamplingError(f"{info.source}: trained with --num-timesteps {info.num_timesteps}, "
                            f"but the samplers run the {NUM_TRAIN_STEPS}-step IDDPM schedule of "
                            f"the official models, so its images would be wrong; retrain with "
                            f"--num-timesteps {NUM_TRAIN_STEPS}")


def check_initial_latents(initial, shape: tuple, flag: str = "--latents") -> None:
    """None, or a finite float array of `shape` (one latent per image)."""
    if initial is None:
        return
    if not isinstance(initial, np.ndarray) or initial.dtype.kind != "f":
        raise SamplingError(f"{flag}: {short(initial)} is not a float numpy array; pass "
                            f"one of shape {shape}")
    if initial.shape != shape:
        raise SamplingError(f"{flag} has shape {initial.shape}, expected {shape} (one latent "
                            f"per image)")
    if not np.isfinite(initial).all():
        bad = int(np.argmax(~np.isfinite(initial).reshape(len(initial), -1).all(axis=1)))
        raise SamplingError(f"{flag}: latent {bad} holds NaN or Inf; pass finite latents")


def sample_latents(forward: Forward, info: ModelInfo, indices: Sequence[int],
                   labels: Sequence[int], options: SampleOptions,
                   initial: Optional[np.ndarray] = None,
                   on_step: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """Final latents (B, C, H, W) of images `indices` with model labels `labels`."""
    c, s = info.in_channels, info.input_size
    if not isinstance(options, SampleOptions):
        raise SamplingError(f"options={short(options)}: pass a SampleOptions")
    for name, values in (("indices", indices), ("labels", labels)):
        if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or \
                not all(is_int(v) for v in values):
            raise SamplingError(f"{name}={short(values)}: pass a list of integers, one per image")
    if len(indices) != len(labels):
        raise SamplingError(f"{len(indices)} image indices but {len(labels)} labels; give one "
                            f"label per image")
    if any(v < 0 for v in indices):
        raise SamplingError(f"indices: {min(indices)} is negative; image indices (their noise "
                            f"seeds) start at 0")
    for v in labels:
        if not 0 <= v <= info.num_classes:
            raise SamplingError(f"label {v} is outside [0, {info.num_classes}] (the last is the "
                                f"null label)")
    check_initial_latents(initial, (len(labels), c, s, s))
    if on_step is not None and not callable(on_step):
        raise SamplingError(f"on_step={short(on_step)}: pass a function of the step index")
    check_model_options(info, options)
    rngs = [image_rng(options.seed, int(i)) for i in indices]
    x = np.stack([r.standard_normal((c, s, s), dtype=np.float32) for r in rngs])
    if initial is not None:
        x = np.ascontiguousarray(initial, dtype=np.float32)
    y = np.asarray(labels, dtype=np.int64)
    sched = make_scheduler(options.sampler, options.eta, resolve_clip(info, options))
    sched.set_timesteps(options.steps)
    sigma = getattr(sched, "init_noise_sigma", 1.0)      # sigma-space schedulers (diffusers')
    if sigma != 1.0:
        x = (x * np.float32(sigma)).astype(np.float32)
    scale_input = getattr(sched, "scale_model_input", None)
    for k, t in enumerate(sched.timesteps):
        model_in = x if scale_input is None else scale_input(x, k)
        out = guided_forward(forward, info, model_in, int(t), y, options)
        noise = (np.stack([r.standard_normal((c, s, s), dtype=np.float32) for r in rngs])
                 if sched.needs_noise else None)
        x = sched.step(out, k, x, noise)
        bad = ~np.isfinite(x).reshape(len(x), -1).all(axis=1)
        if bad.any():
            j = int(np.argmax(bad))
            raise SamplingError(f"image {int(indices[j])}: latents became NaN/Inf at step "
                                f"{k + 1}/{len(sched.timesteps)} (t={int(t)}); check the model "
                                f"weights, --cfg-scale and the dtype")
        if on_step:
            on_step(k)
    return x
