"""terdit.diffusion against values computed by hand from the IDDPM / DDIM formulas."""
import math

import pytest
import torch

from terdit import TerDiT, TerDiTConfig
from terdit.diffusion import (GaussianDiffusion, approx_standard_normal_cdf, linear_betas,
                              normal_kl, space_timesteps)
from terdit.inference import sample_images
from terdit_common.sampling import SampleOptions


def test_linear_betas_match_the_ho_schedule():
    b = linear_betas(1000)
    assert b.dtype == torch.float64 and b.shape == (1000,)
    assert b[0].item() == 1e-4 and b[-1].item() == 0.02
    assert b[1].item() == 1e-4 + (0.02 - 1e-4) / 999
    # rescaled for other lengths: 1000 / T times the endpoints
    b100 = linear_betas(100)
    assert b100[0].item() == pytest.approx(1e-3) and b100[-1].item() == pytest.approx(0.2)


def test_space_timesteps_official_examples():
    # 300 steps in sections [10, 15, 20]: every section of 100 strided on its own
    steps = sorted(space_timesteps(300, [10, 15, 20]))
    assert steps[:10] == list(range(0, 100, 11))                        # stride 99 / 9 = 11
    assert len([s for s in steps if 100 <= s < 200]) == 15
    assert len([s for s in steps if 200 <= s < 300]) == 20
    assert steps[-1] == 299
    # "250" of 1000: fractional stride 999 / 249, rounded
    s250 = sorted(space_timesteps(1000, "250"))
    assert len(s250) == 250 and s250[0] == 0 and s250[-1] == 999
    assert s250[:4] == [round(k * 999 / 249) for k in range(4)] == [0, 4, 8, 12]
    # "ddim50": the smallest integer stride with exactly 50 steps (20)
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    # "10,15": two sections of 500
    s = sorted(space_timesteps(1000, "10,15"))
    assert s[:10] == [round(k * 499 / 9) for k in range(10)]
    assert s[10:] == [500 + round(k * 499 / 14) for k in range(15)]
    assert s[:3] == [0, 55, 111] and s[-1] == 999


@pytest.mark.parametrize("bad", ["ddim999", "2000", "a,b", "0"])
def test_space_timesteps_rejects_impossible_requests(bad):
    with pytest.raises(ValueError):
        space_timesteps(1000, bad)


def test_posterior_variance_by_hand():
    d = GaussianDiffusion.create(None)
    b0, b1 = 1e-4, 1e-4 + (0.02 - 1e-4) / 999
    abar0, abar1 = 1 - b0, (1 - b0) * (1 - b1)
    assert d.posterior_variance[0].item() == 0.0
    assert d.posterior_variance[1].item() == pytest.approx(b1 * (1 - abar0) / (1 - abar1),
                                                           rel=1e-12)
    # the log is clipped at t = 0 to the t = 1 value
    assert d.posterior_log_variance_clipped[0] == d.posterior_log_variance_clipped[1]
    assert d.posterior_log_variance_clipped[1].item() == pytest.approx(
        math.log(b1 * (1 - abar0) / (1 - abar1)), rel=1e-12)
    # posterior mean coefficients at t = 1
    assert d.posterior_mean_coef1[1].item() == pytest.approx(b1 * math.sqrt(abar0) / (1 - abar1))
    assert d.posterior_mean_coef2[1].item() == pytest.approx(
        (1 - abar0) * math.sqrt(1 - b1) / (1 - abar1))


def test_respacing_keeps_alphas_cumprod_of_kept_steps():
    full = GaussianDiffusion.create(None)
    sp = GaussianDiffusion.create("ddim50")
    kept = sorted(space_timesteps(1000, "ddim50"))
    assert sp.timestep_map.tolist() == kept
    assert torch.allclose(sp.alphas_cumprod, full.alphas_cumprod[kept], rtol=1e-12, atol=0)
    assert sp.betas[1].item() == pytest.approx(1 - full.alphas_cumprod[20].item()
                                               / full.alphas_cumprod[0].item(), rel=1e-12)


def test_q_sample_is_the_closed_form():
    d = GaussianDiffusion.create(None)
    x0, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 500, 999])
    ab = d.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    assert torch.allclose(d.q_sample(x0, t, eps), ab.sqrt() * x0 + (1 - ab).sqrt() * eps,
                          atol=1e-6)


def _perfect_eps(d, x0):
    """The exact eps predictor for data concentrated on x0, with variance channels `v`."""
    def fn(v):
        def model(x, t_model):
            # t_model is the original timestep; recover the schedule index
            idx = torch.searchsorted(d.timestep_map, t_model)
            ab = d.alphas_cumprod[idx].float().view(-1, 1, 1, 1)
            eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
            return torch.cat([eps, torch.full_like(eps, v)], 1)
        return model
    return fn


def test_vb_term_by_hand():
    d = GaussianDiffusion.create(None)
    x0 = torch.rand(2, 1, 4, 4) * 1.6 - 0.8
    noise = torch.randn_like(x0)
    t = torch.tensor([10, 700])
    xt = d.q_sample(x0, t, noise)
    # perfect eps: model mean = posterior mean; v = +1 puts the variance at beta_t
    out = torch.cat([noise, torch.ones_like(noise)], 1)
    vb = d.vb_terms_bpd(out, x0, xt, t)
    for i, ti in enumerate(t.tolist()):
        lv1 = math.log(d.posterior_variance[ti].item())
        lv2 = math.log(d.betas[ti].item())
        kl = 0.5 * (-1 + lv2 - lv1 + math.exp(lv1 - lv2))
        assert vb[i].item() == pytest.approx(kl / math.log(2), rel=1e-3, abs=1e-6)
    # v = -1: the posterior variance itself, KL = 0
    out = torch.cat([noise, -torch.ones_like(noise)], 1)
    assert torch.allclose(d.vb_terms_bpd(out, x0, xt, t), torch.zeros(2), atol=1e-4)


def test_decoder_nll_at_t0_by_hand():
    d = GaussianDiffusion.create(None)
    x0 = torch.full((1, 1, 2, 2), 0.25)
    noise = torch.randn_like(x0)
    t = torch.tensor([0])
    xt = d.q_sample(x0, t, noise)
    out = torch.cat([noise, -torch.ones_like(noise)], 1)   # mean = x0 exactly (coef2[0] = 0)
    sigma = math.exp(0.5 * d.posterior_log_variance_clipped[0].item())

    def cdf(v):
        return approx_standard_normal_cdf(torch.tensor(v, dtype=torch.float64)).item()
    nll = -math.log(cdf(1 / 255 / sigma) - cdf(-1 / 255 / sigma)) / math.log(2)
    assert d.vb_terms_bpd(out, x0, xt, t).item() == pytest.approx(nll, rel=1e-4)


def test_normal_kl_closed_form():
    m1, lv1, m2, lv2 = (torch.tensor(v) for v in (0.3, -1.0, -0.2, 0.5))
    ref = 0.5 * (-1 + 0.5 + 1.0 + math.exp(-1.5) + 0.25 * math.exp(-0.5))
    assert normal_kl(m1, lv1, m2, lv2).item() == pytest.approx(ref, rel=1e-6)


def test_training_losses_terms_and_frozen_mean():
    d = GaussianDiffusion.create(None)
    x0 = torch.rand(4, 2, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 1, 400, 999])
    out = torch.randn(4, 4, 4, 4, requires_grad=True)
    terms = d.training_losses(lambda x, tt: out, x0, t, noise)
    mse = ((noise - out[:, :2]) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(terms["mse"], mse)
    assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"])
    # the VB term reaches only the variance channels
    (g_eps,) = torch.autograd.grad(terms["vb"].sum(), out)
    assert torch.count_nonzero(g_eps[:, :2]) == 0 and torch.count_nonzero(g_eps[:, 2:]) > 0
    # and the model sees original timesteps
    seen = []
    d.training_losses(lambda x, tt: seen.append(tt) or out, x0, t, noise)
    assert torch.equal(seen[0], t)


@pytest.mark.parametrize("respacing,sampler", [("ddim10", "ddim"), ("25", "ddpm"),
                                               ("10,15", "ddpm")])
def test_samplers_recover_a_point_mass(respacing, sampler):
    d = GaussianDiffusion.create(respacing)
    x0 = torch.rand(2, 1, 4, 4) * 1.6 - 0.8
    g = torch.Generator().manual_seed(0)
    x = d.sample_loop(_perfect_eps(d, x0)(0.0), torch.randn(2, 1, 4, 4, generator=g), sampler,
                      generator=g)
    # the last step lands on the predicted x0 (coef2 = 0 at t = 0; DDIM's abar_prev = 1)
    assert torch.allclose(x, x0, atol=1e-4)


def test_ddim_step_by_hand():
    d = GaussianDiffusion.create("ddim10")
    x = torch.randn(1, 1, 2, 2)
    eps = torch.randn_like(x)
    t = torch.tensor([5])

    def model(xx, tt):
        return torch.cat([eps, torch.zeros_like(eps)], 1)
    ab, abp = d.alphas_cumprod[5].item(), d.alphas_cumprod[4].item()
    x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    ref = math.sqrt(abp) * x0 + math.sqrt(1 - abp) * eps
    out = d.ddim_sample(model, x, t, eta=0.0)
    assert torch.allclose(out["sample"], ref, atol=1e-5)
    noise = torch.randn_like(x)
    sigma = 0.7 * math.sqrt((1 - abp) / (1 - ab)) * math.sqrt(1 - ab / abp)
    ref = math.sqrt(abp) * x0 + math.sqrt(1 - abp - sigma ** 2) * eps + sigma * noise
    out = d.ddim_sample(model, x, t, eta=0.7, noise=noise)
    assert torch.allclose(out["sample"], ref, atol=1e-5)


def test_ddpm_step_uses_learned_range_variance():
    d = GaussianDiffusion.create("25")
    x = torch.randn(1, 1, 2, 2)
    eps, noise = torch.randn_like(x), torch.randn_like(x)
    t = torch.tensor([7])
    v = 0.4

    def model(xx, tt):
        return torch.cat([eps, torch.full_like(eps, v)], 1)
    frac = (v + 1) / 2
    log_var = frac * math.log(d.betas[7].item()) + (1 - frac) * \
        d.posterior_log_variance_clipped[7].item()
    ab = d.alphas_cumprod[7].item()
    x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    mean = d.posterior_mean_coef1[7].item() * x0 + d.posterior_mean_coef2[7].item() * x
    out = d.p_sample(model, x, t, noise=noise)
    assert torch.allclose(out["sample"], mean + math.exp(0.5 * log_var) * noise, atol=1e-5)


@pytest.mark.parametrize("mode", ["official", "standard"])
def test_sample_images_with_cfg_runs_the_doubled_batch(mode):
    cfg = TerDiTConfig.from_name("TerDiT-tiny").replace(ternary=False)
    model = TerDiT(cfg).eval()
    calls = []
    real = model.forward

    def spy(x, t, y):
        calls.append((x.shape[0], y.tolist()))
        return real(x, t, y)
    model.forward = spy
    out = sample_images(model, [1, 2, 3], SampleOptions(steps=4, sampler="ddim", cfg_scale=3.0,
                                                        cfg_mode=mode))
    assert out.shape == (3, cfg.input_size, cfg.input_size, 3)
    assert len(calls) == 4 and calls[0] == (6, [1, 2, 3, 10, 10, 10])
