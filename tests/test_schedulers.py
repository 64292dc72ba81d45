"""The runtime's numpy samplers against independent implementations: diffusers' schedulers and
(where written) terdit.diffusion, the torch port of the official IDDPM code."""
import numpy as np
import pytest
import torch

from terdit_common.noise_schedule import linear_betas, space_timesteps
from terdit_common.schedulers import (DDIMScheduler, DDPMScheduler, DPMSolverScheduler,
                                      RespacedSchedule)

diffusers = pytest.importorskip("diffusers")


def test_respaced_betas_keep_alphas_cumprod():
    base_ac = np.cumprod(1 - linear_betas())
    s = RespacedSchedule.create(space_timesteps(1000, "50"))
    assert np.allclose(s.alphas_cumprod, base_ac[s.timestep_map], rtol=1e-12)
    assert s.posterior_log_variance_clipped[0] == s.posterior_log_variance_clipped[1]


def _rel(a, b):
    """Max error relative to the output scale (float32 rounding: ~1e-6)."""
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))


def _model(x, t, channels_out):
    """A deterministic stand-in for a network: smooth in x and t."""
    g = np.sin(0.37 * x + t / 300.0).astype(np.float32)
    return np.concatenate([g, np.tanh(x[:, : channels_out - x.shape[1]])], axis=1) \
        if channels_out > x.shape[1] else g


@pytest.mark.parametrize("steps", [10, 50])
def test_ddim_matches_diffusers(steps):
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    ours = DDIMScheduler(eta=0.0)
    ours.set_timesteps(steps)
    ref = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                  beta_schedule="linear", clip_sample=False, set_alpha_to_one=True,
                                  steps_offset=0, timestep_spacing="leading")
    ref.set_timesteps(steps)
    assert np.array_equal(ours.timesteps, ref.timesteps.numpy())
    x, xr = x0.copy(), torch.from_numpy(x0.copy())
    for k, t in enumerate(ours.timesteps):
        x = ours.step(_model(x, t, 8), k, x)
        xr = ref.step(torch.from_numpy(_model(xr.numpy(), t, 4)), int(t), xr, eta=0.0).prev_sample
    assert _rel(x, xr.numpy()) < 1e-5


def test_ddpm_matches_diffusers_with_learned_range():
    steps = 25
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    noises = rng.standard_normal((steps, 2, 4, 8, 8)).astype(np.float32)
    ours = DDPMScheduler()
    ours.set_timesteps(steps)
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                  beta_schedule="linear", clip_sample=False,
                                  variance_type="learned_range")
    ref.set_timesteps(timesteps=[int(t) for t in ours.timesteps])
    x, xr = x0.copy(), torch.from_numpy(x0.copy())
    for k, t in enumerate(ours.timesteps):
        x = ours.step(_model(x, t, 8), k, x, noises[k])
        out = torch.from_numpy(_model(xr.numpy(), t, 8))

        class G:  # diffusers draws its noise from a generator; feed it ours
            def __init__(self, n):
                self.n = n

        import diffusers.schedulers.scheduling_ddpm as mod
        orig = mod.randn_tensor
        mod.randn_tensor = lambda shape, generator=None, device=None, dtype=None: torch.from_numpy(noises[k]).to(dtype)
        try:
            xr = ref.step(out, int(t), xr).prev_sample
        finally:
            mod.randn_tensor = orig
    assert _rel(x, xr.numpy()) < 1e-5


@pytest.mark.parametrize("steps", [8, 20])
def test_dpm_solver_matches_diffusers(steps):
    rng = np.random.default_rng(2)
    x0 = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    ours = DPMSolverScheduler()
    ours.set_timesteps(steps)
    ref = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
        algorithm_type="dpmsolver++", solver_order=2, prediction_type="epsilon",
        thresholding=False, lower_order_final=True, final_sigmas_type="zero",
        timestep_spacing="linspace")
    ref.set_timesteps(steps)
    assert np.array_equal(ours.timesteps, ref.timesteps.numpy())
    x, xr = x0.copy(), torch.from_numpy(x0.copy())
    for k, t in enumerate(ours.timesteps):
        x = ours.step(_model(x, t, 8), k, x)
        xr = ref.step(torch.from_numpy(_model(xr.numpy(), t, 4)), int(t), xr).prev_sample
    assert _rel(x, xr.numpy()) < 1e-5


def test_ddim_eta_needs_and_uses_noise():
    s = DDIMScheduler(eta=1.0)
    s.set_timesteps(10)
    x = np.ones((1, 4, 2, 2), np.float32)
    out = _model(x, s.timesteps[0], 8)
    a = s.step(out, 0, x, np.zeros_like(x))
    b = s.step(out, 0, x, np.ones_like(x))
    assert not np.allclose(a, b)
    with pytest.raises(ValueError, match="needs noise"):
        s.step(out, 0, x, None)


def test_ddpm_needs_learned_sigma():
    s = DDPMScheduler()
    s.set_timesteps(5)
    x = np.ones((1, 4, 2, 2), np.float32)
    with pytest.raises(ValueError, match="learned-sigma"):
        s.step(np.ones_like(x), 0, x, np.zeros_like(x))


@pytest.mark.parametrize("sampler, steps", [("ddpm", 250), ("ddpm", 20), ("ddim", 50), ("ddim", 10)])
def test_runtime_matches_the_official_port(sampler, steps):
    """Step for step against terdit.diffusion (the torch port of the official IDDPM code),
    with the same per-step noise; the model is called with the same original timesteps."""
    from terdit.diffusion import GaussianDiffusion
    ref = GaussianDiffusion.create(f"ddim{steps}" if sampler == "ddim" else str(steps))
    ours = DDIMScheduler() if sampler == "ddim" else DDPMScheduler()
    ours.set_timesteps(steps)
    assert np.array_equal(ours.timesteps, ref.timestep_map.numpy()[::-1])
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    xr = torch.from_numpy(x.copy())
    for k, t in enumerate(ours.timesteps):
        noise = rng.standard_normal(x.shape).astype(np.float32)
        x = ours.step(_model(x, t, 8), k, x, noise)
        i = torch.full((2,), steps - 1 - k, dtype=torch.long)
        assert int(ref.model_timesteps(i)[0]) == int(t)
        fn = lambda xx, tt: torch.from_numpy(_model(xx.numpy(), int(t), 8))  # noqa: E731
        step = ref.p_sample if sampler == "ddpm" else ref.ddim_sample
        xr = step(fn, xr, i, noise=torch.from_numpy(noise))["sample"]
    assert _rel(x, xr.numpy()) < 1e-5


def test_clip_denoised_matches_the_official_port():
    from terdit.diffusion import GaussianDiffusion
    ref = GaussianDiffusion.create("ddim10")
    ours = DDIMScheduler(clip_denoised=True)
    ours.set_timesteps(10)
    x = np.random.default_rng(5).standard_normal((1, 4, 4, 4)).astype(np.float32) * 3
    xr = torch.from_numpy(x.copy())
    for k, t in enumerate(ours.timesteps):
        x = ours.step(_model(x, t, 8) * 5, k, x)
        i = torch.full((1,), 9 - k, dtype=torch.long)
        fn = lambda xx, tt: torch.from_numpy(_model(xx.numpy(), int(t), 8) * 5)  # noqa: E731
        xr = ref.ddim_sample(fn, xr, i, clip_denoised=True)["sample"]
    assert _rel(x, xr.numpy()) < 1e-5
    assert np.abs(x).max() <= 1.0 + 1e-5  # the last step returns the clipped x_0
