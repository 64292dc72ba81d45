"""IDDPM Gaussian diffusion in torch: schedule, q(x_t | x_0), the posterior, the learned-range
variance, the training loss (eps MSE + VB), respacing and the DDPM / DDIM samplers.

This module is the independent reference that the runtime's schedulers are tested against, so it
follows the official TerDiT / DiT `diffusion/` package formula for formula (Ho et al. 2020, Nichol
& Dhariwal 2021, Song et al. 2021): schedule arrays are float64 (the official code keeps them as
numpy float64), a value is gathered per timestep and then cast to float32, and every per-sample
expression is evaluated in the same order as there.

Timesteps `t` passed to the methods of a (possibly respaced) `GaussianDiffusion` are indices into
its own schedule; `timestep_map` turns them into the original 0..999 timesteps the model sees.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from terdit_common import noise_schedule as schedule
from terdit_common.noise_schedule import space_timesteps

ModelFn = Callable[[Tensor, Tensor], Tensor]
SAMPLERS = ("ddpm", "ddim")


# ---- schedules ----------------------------------------------------------------------------------

def linear_betas(num_timesteps: int = 1000) -> Tensor:
    """Ho et al.'s linear schedule 1e-4..0.02, rescaled to `num_timesteps` (float64, the
    official numpy values)."""
    return torch.from_numpy(schedule.linear_betas(num_timesteps))


# ---- elementwise helpers ------------------------------------------------------------------------

def _sqrt(x: Tensor) -> Tensor:
    """float64 sqrt through numpy: the official schedule is numpy's, and torch's vectorised
    float64 sqrt / log differ from numpy's in the last bit for some inputs."""
    return torch.from_numpy(np.sqrt(x.numpy()))


def _log(x: Tensor) -> Tensor:
    return torch.from_numpy(np.log(x.numpy()))


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all non-batch dimensions."""
    return x.mean(dim=list(range(1, x.dim())))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + ((mean1 - mean2) ** 2) * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """The tanh approximation of the standard normal CDF used by the IDDPM decoder."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log p(x) of a Gaussian discretised to 256 bins over [-1, 1] (x: 8-bit data in [-1, 1])."""
    if not x.shape == means.shape == log_scales.shape:
        raise ValueError(f"shapes differ: x {tuple(x.shape)}, means {tuple(means.shape)}, "
                         f"log_scales {tuple(log_scales.shape)}")
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min,
                                   torch.log(cdf_delta.clamp(min=1e-12))))


# ---- the process --------------------------------------------------------------------------------

class GaussianDiffusion:
    """IDDPM with eps prediction and (by default) LEARNED_RANGE variance.

    betas: 1-D float64 schedule; `timestep_map[i]` is the original timestep of step i (identity
    unless the process was respaced with `respaced`)."""

    def __init__(self, betas: Tensor, learn_sigma: bool = True,
                 timestep_map: Optional[Sequence[int]] = None,
                 original_num_steps: Optional[int] = None) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64).clone()
        if betas.dim() != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1]")
        self.learn_sigma = learn_sigma
        self.betas = betas
        self.num_timesteps = n = int(betas.shape[0])
        self.timestep_map = torch.as_tensor(
            list(range(n)) if timestep_map is None else list(timestep_map), dtype=torch.long)
        if self.timestep_map.shape != (n,):
            raise ValueError(f"timestep_map has {len(self.timestep_map)} entries for {n} steps")
        self.original_num_steps = original_num_steps or n

        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        one = torch.ones(1, dtype=torch.float64)
        self.alphas_cumprod_prev = torch.cat([one, self.alphas_cumprod[:-1]])
        self.alphas_cumprod_next = torch.cat([self.alphas_cumprod[1:], torch.zeros_like(one)])

        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = _sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = _sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = _log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = _sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = _sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0); the variance is 0 at t = 0, so its log is clipped to the t = 1
        # value
        self.posterior_variance = (betas * (1.0 - self.alphas_cumprod_prev)
                                   / (1.0 - self.alphas_cumprod))
        if n > 1:
            self.posterior_log_variance_clipped = _log(
                torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        else:
            self.posterior_log_variance_clipped = torch.empty(0, dtype=torch.float64)
        self.posterior_mean_coef1 = (betas * _sqrt(self.alphas_cumprod_prev)
                                     / (1.0 - self.alphas_cumprod))
        self.posterior_mean_coef2 = ((1.0 - self.alphas_cumprod_prev) * _sqrt(alphas)
                                     / (1.0 - self.alphas_cumprod))
        self.log_betas = _log(betas)
        # FIXED_LARGE (the official default without learn_sigma): beta_t, with the t = 0 value
        # replaced by the posterior variance at t = 1 for a better decoder likelihood
        self.fixed_large_variance = torch.cat([self.posterior_variance[1:2], betas[1:]])
        self.log_fixed_large_variance = _log(self.fixed_large_variance)

    # ---- construction ----
    @classmethod
    def create(cls, respacing: Union[str, Sequence[int], None] = None,
               num_timesteps: int = 1000, learn_sigma: bool = True) -> "GaussianDiffusion":
        """The official `create_diffusion`: linear betas over `num_timesteps`, respaced by
        `respacing` ("250", "ddim50", "10,15,20", or None / "" for all steps)."""
        base = cls(linear_betas(num_timesteps), learn_sigma)
        if respacing is None or respacing == "":
            respacing = [num_timesteps]
        # Like the official code, even the full process goes through respacing: its betas are
        # re-derived from alphas_cumprod, which changes some of them in the last bit.
        return base.respaced(space_timesteps(num_timesteps, respacing))

    def respaced(self, use_timesteps: Iterable[int]) -> "GaussianDiffusion":
        """The process restricted to `use_timesteps`: beta_i = 1 - abar_i / abar_prev over the
        kept steps, so that abar of every kept step is unchanged."""
        keep = {int(t) for t in use_timesteps}
        if not keep or min(keep) < 0 or max(keep) >= self.num_timesteps:
            raise ValueError(f"use_timesteps must be a non-empty subset of "
                             f"0..{self.num_timesteps - 1}")
        last = 1.0
        new_betas, mapping = [], []
        for i, abar in enumerate(self.alphas_cumprod.tolist()):
            if i in keep:
                new_betas.append(1 - abar / last)
                last = abar
                mapping.append(int(self.timestep_map[i]))
        return GaussianDiffusion(torch.tensor(new_betas, dtype=torch.float64), self.learn_sigma,
                                 mapping, self.original_num_steps)

    # ---- gathering ----
    @staticmethod
    def _at(arr: Tensor, t: Tensor, x: Tensor) -> Tensor:
        """arr[t] as float32, shaped to broadcast over x (N, ...)."""
        v = arr.to(t.device)[t].float()
        return v.view(-1, *([1] * (x.dim() - 1)))

    def model_timesteps(self, t: Tensor) -> Tensor:
        """Original (0..999) timesteps the model is called with for schedule indices t."""
        return self.timestep_map.to(t.device)[t]

    # ---- forward process ----
    def q_mean_variance(self, x_start: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mean = self._at(self.sqrt_alphas_cumprod, t, x_start) * x_start
        variance = self._at(1.0 - self.alphas_cumprod, t, x_start).expand_as(x_start)
        log_variance = self._at(self.log_one_minus_alphas_cumprod, t, x_start).expand_as(x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (DDPM eq. 4)."""
        if noise.shape != x_start.shape:
            raise ValueError(f"noise {tuple(noise.shape)} and x_start {tuple(x_start.shape)} "
                             f"differ")
        return (self._at(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + self._at(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start: Tensor, x_t: Tensor, t: Tensor
                                  ) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (DDPM eq. 6-7)."""
        mean = (self._at(self.posterior_mean_coef1, t, x_t) * x_start
                + self._at(self.posterior_mean_coef2, t, x_t) * x_t)
        var = self._at(self.posterior_variance, t, x_t).expand_as(x_t)
        log_var = self._at(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        return mean, var, log_var

    def predict_xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return (self._at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - self._at(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

    def predict_eps_from_xstart(self, x_t: Tensor, t: Tensor, pred_xstart: Tensor) -> Tensor:
        return ((self._at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart)
                / self._at(self.sqrt_recipm1_alphas_cumprod, t, x_t))

    # ---- reverse process ----
    def p_mean_variance_from_output(self, model_output: Tensor, x: Tensor, t: Tensor,
                                    clip_denoised: bool = False) -> dict[str, Tensor]:
        """p(x_{t-1} | x_t) from a model output (N, 2C, ...) = [eps, v] with v in [-1, 1]
        interpolating the log-variance between the posterior's (v = -1) and beta_t (v = +1)
        (IDDPM eq. 15); without learn_sigma, the output is eps only and the variance is
        FIXED_LARGE (beta_t), as the official create_diffusion sets it."""
        n, c = x.shape[:2]
        if self.learn_sigma:
            if model_output.shape != (n, 2 * c, *x.shape[2:]):
                raise ValueError(f"model output {tuple(model_output.shape)}: expected "
                                 f"{(n, 2 * c, *x.shape[2:])} (eps and variance channels)")
            eps, var_values = torch.split(model_output, c, dim=1)
            min_log = self._at(self.posterior_log_variance_clipped, t, x)
            max_log = self._at(self.log_betas, t, x)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            eps = model_output
            variance = self._at(self.fixed_large_variance, t, x).expand_as(x)
            log_variance = self._at(self.log_fixed_large_variance, t, x).expand_as(x)
        pred_xstart = self.predict_xstart_from_eps(x, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance,
                "pred_xstart": pred_xstart}

    def p_mean_variance(self, model: ModelFn, x: Tensor, t: Tensor, clip_denoised: bool = False
                        ) -> dict[str, Tensor]:
        """Call model(x, original timesteps) and return p(x_{t-1} | x_t)."""
        out = model(x, self.model_timesteps(t))
        return self.p_mean_variance_from_output(out, x, t, clip_denoised)

    # ---- variational bound and the training loss ----
    def vb_terms_bpd(self, model_output: Tensor, x_start: Tensor, x_t: Tensor, t: Tensor
                     ) -> Tensor:
        """One term of the variational bound in bits per dim: KL(q(x_{t-1}|x_t,x_0) ||
        p(x_{t-1}|x_t)) for t > 0, the discretised decoder NLL at t = 0. Shape (N,)."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance_from_output(model_output, x_t, t, clip_denoised=False)
        kl = normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model: ModelFn, x_start: Tensor, t: Tensor, noise: Tensor
                        ) -> dict[str, Tensor]:
        """The IDDPM hybrid loss (loss type MSE): mse(eps) + vb, where vb trains only the
        variance channels (the eps half is detached, so the bound does not move the mean).
        Returns per-sample tensors {loss, mse[, vb]} of shape (N,)."""
        x_t = self.q_sample(x_start, t, noise)
        out = model(x_t, self.model_timesteps(t)).float()
        terms: dict[str, Tensor] = {}
        if self.learn_sigma:
            c = x_t.shape[1]
            eps, var_values = torch.split(out, c, dim=1)
            frozen = torch.cat([eps.detach(), var_values], dim=1)
            terms["vb"] = self.vb_terms_bpd(frozen, x_start, x_t, t)
        else:
            eps = out
        terms["mse"] = mean_flat((noise - eps) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    # ---- samplers ----
    def _noise(self, x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)

    def p_sample(self, model: ModelFn, x: Tensor, t: Tensor, clip_denoised: bool = False,
                 generator: Optional[torch.Generator] = None,
                 noise: Optional[Tensor] = None) -> dict[str, Tensor]:
        """One ancestral step x_t -> x_{t-1} = mean + exp(log_var / 2) * z (no noise at t = 0)."""
        out = self.p_mean_variance(model, x, t, clip_denoised)
        if noise is None:
            noise = self._noise(x, generator)
        nonzero = (t != 0).float().view(-1, *([1] * (x.dim() - 1)))
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample.to(x.dtype), "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model: ModelFn, x: Tensor, t: Tensor, clip_denoised: bool = False,
                    eta: float = 0.0, generator: Optional[torch.Generator] = None,
                    noise: Optional[Tensor] = None) -> dict[str, Tensor]:
        """One DDIM step (Song et al. eq. 12); eta = 0 is deterministic, eta = 1 is DDPM-like."""
        out = self.p_mean_variance(model, x, t, clip_denoised)
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        abar = self._at(self.alphas_cumprod, t, x)
        abar_prev = self._at(self.alphas_cumprod_prev, t, x)
        sigma = (eta * torch.sqrt((1 - abar_prev) / (1 - abar))
                 * torch.sqrt(1 - abar / abar_prev))
        if noise is None:
            noise = self._noise(x, generator)
        mean_pred = (out["pred_xstart"] * torch.sqrt(abar_prev)
                     + torch.sqrt(1 - abar_prev - sigma ** 2) * eps)
        nonzero = (t != 0).float().view(-1, *([1] * (x.dim() - 1)))
        return {"sample": mean_pred + nonzero * sigma * noise, "pred_xstart": out["pred_xstart"]}

    @torch.no_grad()
    def sample_loop(self, model: ModelFn, noise: Tensor, sampler: str = "ddpm",
                    clip_denoised: bool = False, eta: float = 0.0,
                    generator: Optional[torch.Generator] = None, progress: bool = False
                    ) -> Tensor:
        """Run the reverse process from `noise` (x_T) over every step of this (respaced)
        schedule. sampler: "ddpm" (ancestral, learned variance) or "ddim" (eta)."""
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler {sampler!r} is not one of {SAMPLERS}")
        img = noise
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm
            indices = tqdm(indices, desc=f"{sampler} x{self.num_timesteps}", leave=False)
        for i in indices:
            t = torch.full((img.shape[0],), i, dtype=torch.long, device=img.device)
            if sampler == "ddpm":
                out = self.p_sample(model, img, t, clip_denoised, generator)
            else:
                out = self.ddim_sample(model, img, t, clip_denoised, eta, generator)
            img = out["sample"]
        return img
