"""Samplers over the IDDPM noise schedule, in numpy (no torch needed by the ORT/TensorRT paths).

All three follow the diffusers scheduler shape: `set_timesteps(n)`, then for each entry of
`timesteps` call the model and `step(model_output, i, sample, noise)`.

- DDPM: the official IDDPM `p_sample` with LEARNED_RANGE variance over the respaced process
  (`space_timesteps(1000, "N")`), step for step; per-step noise is supplied by the caller.
- DDIM: the official `ddim_sample` over `"ddimN"` respacing (eta 0 = deterministic).
- DPM-Solver++(2M): multistep second order in data prediction (Lu et al. 2022, Alg. 2), on
  diffusers' "linspace" timestep schedule with a final step to sigma = 0.

Coefficients are computed in float64 and cast to float32 before use, as the official
`_extract_into_tensor` does, and the arithmetic is float32. terdit.diffusion (the torch port of
the official code) is the oracle these are tested against.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .entry import signals_held
from .errors import UserError
from .noise_schedule import NUM_TRAIN_STEPS, linear_betas, space_timesteps

SAMPLERS = ("ddpm", "ddim", "dpm-solver")
ETA_SAMPLERS = ("ddim",)                 # the built-in samplers that take --eta
DIFFUSERS_PREFIX = "diffusers:"
EXAMPLE = "UniPCMultistepScheduler"
# The IDDPM training schedule, for diffusers schedulers (they take the rest from their defaults).
DIFFUSERS_CONFIG = {"num_train_timesteps": NUM_TRAIN_STEPS, "beta_start": 1e-4, "beta_end": 0.02,
                    "beta_schedule": "linear", "prediction_type": "epsilon", "clip_sample": False,
                    "set_alpha_to_one": True, "steps_offset": 0, "timestep_spacing": "leading"}


@dataclass
class RespacedSchedule:
    """The respaced process: betas over the kept timesteps and the map to original indices."""

    timestep_map: np.ndarray   # original timestep of each respaced index (int64)
    betas: np.ndarray          # float64

    @classmethod
    def create(cls, use_timesteps, base_betas: Optional[np.ndarray] = None) -> "RespacedSchedule":
        base = linear_betas() if base_betas is None else base_betas
        alphas_cumprod = np.cumprod(1.0 - base)
        last, new_betas, tmap = 1.0, [], []
        for i, ac in enumerate(alphas_cumprod):
            if i in use_timesteps:
                new_betas.append(1 - ac / last)
                last = ac
                tmap.append(i)
        return cls(np.array(tmap, dtype=np.int64), np.array(new_betas, dtype=np.float64))

    def __post_init__(self) -> None:
        b = self.betas
        self.alphas_cumprod = np.cumprod(1.0 - b)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        ac, acp = self.alphas_cumprod, self.alphas_cumprod_prev
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac - 1)
        self.posterior_variance = b * (1.0 - acp) / (1.0 - ac)
        # log of the posterior variance, its 0 at t = 0 replaced by the next value
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = b * np.sqrt(acp) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - acp) * np.sqrt(1.0 - b) / (1.0 - ac)
        self.log_betas = np.log(b)

    def __len__(self) -> int:
        return len(self.betas)


def _f32(a: np.ndarray, i: int) -> np.float32:
    return np.float32(a[i])


def split_output(model_output: np.ndarray, channels: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(eps, variance values or None) of a model output with C or 2C channels."""
    if model_output.shape[1] == 2 * channels:
        return model_output[:, :channels], model_output[:, channels:]
    return model_output, None


class DDPMScheduler:
    """IDDPM ancestral sampling (`p_sample_loop`), learned-range variance. `clip_denoised`
    clamps the predicted x_0 to [-1, 1] (the official code's option; off for latents)."""

    name = "ddpm"
    needs_noise = True

    def __init__(self, clip_denoised: bool = False) -> None:
        self.schedule: Optional[RespacedSchedule] = None
        self.timesteps = np.zeros(0, np.int64)
        self.clip_denoised = clip_denoised

    def set_timesteps(self, num_steps: int) -> None:
        self.schedule = RespacedSchedule.create(space_timesteps(NUM_TRAIN_STEPS, str(num_steps)))
        self.timesteps = self.schedule.timestep_map[::-1].copy()   # model-facing timesteps
        self._indices = np.arange(len(self.schedule))[::-1]

    def pred_xstart(self, x: np.ndarray, eps: np.ndarray, i: int) -> np.ndarray:
        s = self.schedule
        x0 = _f32(s.sqrt_recip_alphas_cumprod, i) * x - _f32(s.sqrt_recipm1_alphas_cumprod, i) * eps
        return np.clip(x0, -1, 1) if self.clip_denoised else x0

    def step(self, model_output: np.ndarray, step_index: int, x: np.ndarray,
             noise: Optional[np.ndarray] = None) -> np.ndarray:
        s = self.schedule
        i = int(self._indices[step_index])
        eps, var = split_output(model_output, x.shape[1])
        if var is None:
            raise UserError("--sampler ddpm needs a learned-sigma model (2C output channels); "
                            "use --sampler ddim or dpm-solver")
        x0 = self.pred_xstart(x, eps, i)
        mean = _f32(s.posterior_mean_coef1, i) * x0 + _f32(s.posterior_mean_coef2, i) * x
        if i == 0:
            return mean.astype(np.float32)
        frac = (var + 1) / 2
        log_var = frac * _f32(s.log_betas, i) + (1 - frac) * _f32(s.posterior_log_variance_clipped, i)
        if noise is None:
            raise ValueError("DDPM steps need noise")
        return (mean + np.exp(0.5 * log_var) * noise).astype(np.float32)


class DDIMScheduler(DDPMScheduler):
    """The official `ddim_sample` on `"ddimN"` respacing; eta=0 is deterministic."""

    name = "ddim"

    def __init__(self, eta: float = 0.0, clip_denoised: bool = False) -> None:
        super().__init__(clip_denoised)
        if eta < 0:
            raise UserError(f"--eta {eta}: must be >= 0")
        self.eta = eta
        self.needs_noise = eta > 0

    def set_timesteps(self, num_steps: int) -> None:
        self.schedule = RespacedSchedule.create(space_timesteps(NUM_TRAIN_STEPS, f"ddim{num_steps}"))
        self.timesteps = self.schedule.timestep_map[::-1].copy()
        self._indices = np.arange(len(self.schedule))[::-1]

    def step(self, model_output: np.ndarray, step_index: int, x: np.ndarray,
             noise: Optional[np.ndarray] = None) -> np.ndarray:
        s = self.schedule
        i = int(self._indices[step_index])
        eps_model, _ = split_output(model_output, x.shape[1])
        x0 = self.pred_xstart(x, eps_model, i)
        # eps re-derived from x0, as the official code does
        eps = (_f32(s.sqrt_recip_alphas_cumprod, i) * x - x0) / _f32(s.sqrt_recipm1_alphas_cumprod, i)
        ab, abp = _f32(s.alphas_cumprod, i), _f32(s.alphas_cumprod_prev, i)
        sigma = np.float32(self.eta) * np.sqrt((1 - abp) / (1 - ab)) * np.sqrt(1 - ab / abp)
        mean = x0 * np.sqrt(abp) + np.sqrt(1 - abp - sigma ** 2) * eps
        if i == 0 or self.eta == 0:
            return mean.astype(np.float32)
        if noise is None:
            raise ValueError("DDIM with eta > 0 needs noise")
        return (mean + sigma * noise).astype(np.float32)


class DPMSolverScheduler:
    """DPM-Solver++(2M) in data prediction over the discrete schedule; first order at the first
    step and at the last (to sigma = 0, where the second-order term vanishes)."""

    name = "dpm-solver"
    needs_noise = False

    def __init__(self, clip_denoised: bool = False) -> None:
        self.clip_denoised = clip_denoised
        ac = np.cumprod(1.0 - linear_betas())
        self.alpha_t = np.sqrt(ac)
        self.sigma_t = np.sqrt(1 - ac)
        self.lambda_t = np.log(self.alpha_t) - np.log(self.sigma_t)
        self.timesteps = np.zeros(0, np.int64)

    def set_timesteps(self, num_steps: int) -> None:
        if num_steps < 1:
            raise ValueError("num_steps must be >= 1")
        ts = np.linspace(0, NUM_TRAIN_STEPS - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
        self.timesteps = ts
        self._prev_x0: Optional[np.ndarray] = None
        self._prev_lambda: Optional[float] = None

    def step(self, model_output: np.ndarray, step_index: int, x: np.ndarray,
             noise: Optional[np.ndarray] = None) -> np.ndarray:
        t = int(self.timesteps[step_index])
        last = step_index == len(self.timesteps) - 1
        eps, _ = split_output(model_output, x.shape[1])
        a_s, s_s = self.alpha_t[t], self.sigma_t[t]
        x0 = ((x - np.float32(s_s) * eps) / np.float32(a_s)).astype(np.float32)   # data prediction
        if self.clip_denoised:
            x0 = np.clip(x0, -1, 1)
        lam_s = self.lambda_t[t]
        if last:   # final step to sigma = 0: x_0 = x0 (alpha = 1, sigma = 0)
            out = x0
        else:
            t_next = int(self.timesteps[step_index + 1])
            a_t, s_t, lam_t = self.alpha_t[t_next], self.sigma_t[t_next], self.lambda_t[t_next]
            h = lam_t - lam_s
            if self._prev_x0 is None:
                d = x0
            else:
                r = (lam_s - self._prev_lambda) / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * self._prev_x0      # eq. (2M)
            out = np.float32(s_t / s_s) * x - np.float32(a_t * math.expm1(-h)) * d
        self._prev_x0, self._prev_lambda = x0, lam_s
        return out.astype(np.float32)


class DiffusersScheduler:
    """A diffusers scheduler class (e.g. UniPCMultistepScheduler, EulerDiscreteScheduler) on the
    IDDPM schedule, driven like the built-in samplers (needs diffusers and torch). Noise for
    stochastic schedulers comes from diffusers' own generator, not from the per-image seeds.
    Only schedulers that take the IDDPM betas and epsilon prediction and step with (model_output,
    timestep, sample) are accepted (`diffusers_scheduler_class`)."""

    needs_noise = False

    def __init__(self, class_name: str, eta: float = 0.0) -> None:
        import inspect
        cls = diffusers_scheduler_class(class_name)
        try:
            with signals_held():
                import torch
        except ImportError:
            raise UserError(f"--sampler {DIFFUSERS_PREFIX}{class_name} needs torch: pip install "
                            f"torch") from None
        params = inspect.signature(cls.__init__).parameters
        self.name = DIFFUSERS_PREFIX + class_name
        self.torch = torch
        try:
            self.scheduler = cls(**{k: v for k, v in DIFFUSERS_CONFIG.items() if k in params})
        except ValueError as err:              # diffusers refuses a config it cannot run
            raise _unusable(class_name, err) from None
        self.step_takes_eta = "eta" in _step_params(self.scheduler)
        if eta and not self.step_takes_eta:
            raise UserError(f"--eta {eta}: --sampler {self.name} has no eta (its step() takes "
                            f"none); drop --eta")
        self.eta = eta
        self.timesteps = np.zeros(0, np.int64)

    @property
    def init_noise_sigma(self) -> float:
        return float(self.scheduler.init_noise_sigma)

    def set_timesteps(self, num_steps: int) -> None:
        try:
            self.scheduler.set_timesteps(num_steps)
        except ValueError as err:
            raise _unusable(self.name[len(DIFFUSERS_PREFIX):], err, num_steps) from None
        self.timesteps = self.scheduler.timesteps.numpy().astype(np.int64)

    def scale_model_input(self, x: np.ndarray, step_index: int) -> np.ndarray:
        t = self.scheduler.timesteps[step_index]
        return self.scheduler.scale_model_input(self.torch.from_numpy(x), t).numpy()

    def step(self, model_output: np.ndarray, step_index: int, x: np.ndarray,
             noise: Optional[np.ndarray] = None) -> np.ndarray:
        eps, _ = split_output(model_output, x.shape[1])
        torch = self.torch
        kwargs = {"eta": self.eta} if self.step_takes_eta else {}
        out = self.scheduler.step(torch.from_numpy(np.ascontiguousarray(eps)),
                                  self.scheduler.timesteps[step_index],
                                  torch.from_numpy(np.ascontiguousarray(x)), **kwargs)
        return out.prev_sample.numpy().astype(np.float32)


def _step_params(scheduler) -> set:
    import inspect
    return set(inspect.signature(scheduler.step).parameters)


def _unusable(class_name: str, err: Exception, steps: Optional[int] = None) -> UserError:
    text = " ".join(str(err).split())[:200]
    with_steps = f" with --steps {steps}" if steps is not None else ""
    return UserError(f"--sampler {DIFFUSERS_PREFIX}{class_name}: diffusers cannot run it on the "
                     f"IDDPM schedule{with_steps} ({text}); use another scheduler, e.g. "
                     f"{DIFFUSERS_PREFIX}{EXAMPLE}")


def _required(params) -> list[str]:
    import inspect
    return [name for name, p in params.items()
            if name != "self" and p.default is inspect.Parameter.empty
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def diffusers_scheduler_class(class_name: str):
    """The diffusers scheduler class `class_name`, or a UserError saying what is wrong. A class
    is refused unless diffusers can build it from DIFFUSERS_CONFIG alone, it takes the IDDPM
    betas (`beta_schedule`) and epsilon prediction (`prediction_type`), it samples (noise ->
    image, not an inversion), and its interface is the one driven here: set_timesteps(n),
    scale_model_input(x, t), step(model_output, timestep, sample) and init_noise_sigma."""
    import inspect
    flag = f"--sampler {DIFFUSERS_PREFIX}{class_name}"
    if not class_name.isidentifier() or not class_name.endswith("Scheduler"):
        raise UserError(f"{flag}: not a diffusers scheduler class (e.g. "
                        f"{DIFFUSERS_PREFIX}{EXAMPLE})")
    try:
        with signals_held():
            import diffusers
    except ImportError:
        raise UserError(f"{flag} needs diffusers (and torch): pip install diffusers") from None
    try:
        cls = getattr(diffusers, class_name, None)
    except (ImportError, RuntimeError) as err:     # diffusers' lazy import of the module failed
        raise UserError(f"{flag}: diffusers cannot import it ({str(err).strip()[:160]})") from None
    if type(cls).__name__ == "DummyObject":        # diffusers' stand-in for a missing dependency
        try:
            cls()
            why = "this diffusers version holds only a placeholder for it"
        except ImportError as err:
            why = " ".join(str(err).replace("`", "").split())[:200]
        raise UserError(f"{flag}: not usable here ({why}); install what it needs or use e.g. "
                        f"{DIFFUSERS_PREFIX}{EXAMPLE}")
    if not isinstance(cls, type) or not issubclass(cls, diffusers.SchedulerMixin):
        raise UserError(f"{flag}: not a diffusers scheduler class (e.g. "
                        f"{DIFFUSERS_PREFIX}{EXAMPLE})")
    init = inspect.signature(cls.__init__).parameters
    needs = [n for n in _required(init) if n not in DIFFUSERS_CONFIG]
    if needs:
        raise UserError(f"{flag}: its constructor needs {', '.join(needs)}, which a diffusion "
                        f"model's sampler does not have (a scheduler for another kind of model); "
                        f"use e.g. {DIFFUSERS_PREFIX}{EXAMPLE}")
    if "beta_schedule" not in init or "prediction_type" not in init:
        raise UserError(f"{flag}: it does not take the IDDPM beta schedule and epsilon "
                        f"prediction this model was trained with (a flow-matching or other "
                        f"schedule), so its images would be wrong; use e.g. "
                        f"{DIFFUSERS_PREFIX}{EXAMPLE}")
    if "Inverse" in class_name:
        raise UserError(f"{flag}: an inversion scheduler (image -> noise), not a sampler; use "
                        f"{DIFFUSERS_PREFIX}{class_name.replace('Inverse', '')}")
    missing = [m for m in ("set_timesteps", "scale_model_input", "step") if not hasattr(cls, m)]
    what = f"it has no {', '.join(missing)}" if missing else ""
    if not missing:
        step_needs = [n for n in _required(inspect.signature(cls.step).parameters)
                      if n not in ("model_output", "timestep", "sample")]
        what = f"its step() also needs {', '.join(step_needs)}" if step_needs else ""
    if what:
        raise UserError(f"{flag}: {what}, so it cannot be driven like a sampler here; use e.g. "
                        f"{DIFFUSERS_PREFIX}{EXAMPLE}")
    return cls


def check_sampler(name: str, steps: Optional[int] = None, eta: float = 0.0) -> None:
    """UserError unless `name` is a sampler that can run `steps` steps with `eta` (a diffusers
    scheduler is built and its timesteps set once, cached, to find out before any work)."""
    if name in SAMPLERS:
        return
    if name.startswith(DIFFUSERS_PREFIX):
        _check_diffusers(name[len(DIFFUSERS_PREFIX):], steps, float(eta))
        return
    raise UserError(f"--sampler {name!r}: choose one of {', '.join(SAMPLERS)} or "
                    f"{DIFFUSERS_PREFIX}<a diffusers scheduler class>")


@functools.lru_cache(maxsize=64)
def _check_diffusers(class_name: str, steps: Optional[int], eta: float) -> None:
    scheduler = DiffusersScheduler(class_name, eta)
    if steps is not None:
        scheduler.set_timesteps(steps)
        if not len(scheduler.timesteps):
            raise UserError(f"--sampler {DIFFUSERS_PREFIX}{class_name} gives no timesteps for "
                            f"--steps {steps}; use more steps or another scheduler")
        scheduler.init_noise_sigma   # noqa: B018 - diffusers' interface: fail before any work


def make_scheduler(name: str, eta: float = 0.0, clip_denoised: bool = False):
    if name not in SAMPLERS and not name.startswith(DIFFUSERS_PREFIX):
        check_sampler(name)                      # the one message for an unknown sampler
    if name.startswith(DIFFUSERS_PREFIX):
        return DiffusersScheduler(name[len(DIFFUSERS_PREFIX):], eta)
    if name == "ddpm":
        return DDPMScheduler(clip_denoised)
    if name == "ddim":
        return DDIMScheduler(eta, clip_denoised)
    return DPMSolverScheduler(clip_denoised)
