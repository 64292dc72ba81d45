import pytest
import torch

from terdit import TerDiT, TerDiTConfig, guide, pack_model_
from terdit.model import apply_rope, rope_tables
from tests.helpers import random_model


def _model(name="TerDiT-tiny", **kw):
    return random_model(TerDiTConfig.from_name(name, **kw)).eval()


def _inputs(cfg, n=4):
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size)
    t = torch.rand(n) * 999
    y = torch.randint(0, cfg.num_classes, (n,))
    return x, t, y


def test_latent_and_packed_models_agree():
    model = _model()
    packed = TerDiT(model.cfg)
    packed.load_state_dict(model.state_dict())
    pack_model_(packed)
    assert packed.packed and not model.packed
    x, t, y = _inputs(model.cfg)
    with torch.no_grad():
        assert torch.allclose(model(x, t, y), packed(x, t, y), rtol=1e-5, atol=1e-5)


def test_packed_construction_allocates_no_latent_weights():
    model = TerDiT(TerDiTConfig.from_name("TerDiT-tiny"), packed=True)
    assert not any(name.endswith(".alphas") for name, _ in model.named_parameters())
    assert all(m.packed for m in model.ternary_layers())
    assert len(model.ternary_layers()) == 8 * model.cfg.n_layers


def test_output_shape_and_learned_sigma():
    model = _model()
    x, t, y = _inputs(model.cfg)
    out = model(x, t, y)
    assert out.shape == (4, 8, 8, 8)
    assert TerDiT(TerDiTConfig.from_name("TerDiT-tiny", learn_sigma=False))(x, t, y).shape[1] == 4


def test_patch_token_order_matches_official():
    model = _model()
    cfg = model.cfg
    x = torch.arange(2 * 4 * 8 * 8, dtype=torch.float32).view(2, 4, 8, 8)
    tokens = model.patchify(x)                           # (N, T, C*p*p) in (C, ph, pw) order
    assert tokens.shape == (2, 16, 16)
    # token 5 is patch row 1, col 1: pixels rows 2..3, cols 2..3
    assert tokens[0, 5].tolist() == x[0, :, 2:4, 2:4].reshape(-1).tolist()
    # unpatchify reads each token as (ph, pw, C)
    out = torch.arange(2 * 16 * 32, dtype=torch.float32).view(2, 16, 32)
    img = model.unpatchify(out)
    assert img[1, 3, 2, 3].item() == out[1, 5, (0 * 2 + 1) * 8 + 3].item()
    assert cfg.num_tokens == 16


def test_rope_is_interleaved_pair_rotation():
    cos, sin = rope_tables(8, 5)
    x = torch.randn(1, 5, 2, 8)
    out = apply_rope(x, cos, sin)
    xc = torch.view_as_complex(x.reshape(1, 5, 2, 4, 2))
    ref = torch.view_as_real(xc * torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))[None, :, None])
    assert torch.allclose(out, ref.flatten(3), atol=1e-6)
    assert torch.equal(out[:, 0], x[:, 0])  # position 0 is not rotated


def test_cfg_modes():
    model = _model("TerDiT-tiny")
    cfg = model.cfg
    x, t, _ = _inputs(cfg, 2)
    x = torch.cat([x[:1], x[:1]])
    t = torch.cat([t[:1], t[:1]])
    y = torch.tensor([3, cfg.null_class])
    with torch.no_grad():
        raw = model(x, t, y)
        off = model.forward_with_cfg(x, t, y, 4.0)
        std = model.forward_with_cfg(x, t, y, 4.0, mode="standard")
    cond, uncond = raw[:1], raw[1:]
    guided = uncond + 4.0 * (cond - uncond)
    assert torch.allclose(off[0, :3], guided[0, :3], atol=1e-6)
    assert torch.equal(off[0, 3:], raw[0, 3:])          # channel 3 and variance unguided
    assert torch.allclose(std[0, :4], guided[0, :4], atol=1e-6)
    assert torch.equal(std[0, 4:], raw[0, 4:])
    assert torch.equal(off[0, :3], off[1, :3]) and torch.equal(std[0, :4], std[1, :4])
    with pytest.raises(ValueError, match="cfg mode"):
        model.forward_with_cfg(x, t, y, 4.0, mode="all")
    assert torch.allclose(guide(raw, 1.0, "standard", 4)[:1, :4], cond[:, :4], atol=1e-6)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 5e-3), (torch.bfloat16, 4e-2)])
def test_low_precision_forward(dtype, tol):
    model = pack_model_(_model(qk_norm=True))
    x, t, y = _inputs(model.cfg)
    with torch.no_grad():
        ref = model(x, t, y)
        out = model.to(dtype)(x.to(dtype), t, y)
    assert out.dtype == dtype
    assert float((out.float() - ref).abs().max() / ref.abs().max()) < tol


def test_full_precision_config():
    model = TerDiT(TerDiTConfig.from_name("TerDiT-tiny", ternary=False))
    assert not model.ternary_layers()
    x, t, y = _inputs(model.cfg)
    assert model(x, t, y).shape == (4, 8, 8, 8)
    with pytest.raises(ValueError, match="no packed form"):
        TerDiT(model.cfg, packed=True)


def test_bad_input_shape():
    model = _model()
    with pytest.raises(ValueError, match=r"takes \(N, 4, 8, 8\)"):
        model(torch.randn(1, 4, 16, 16), torch.zeros(1), torch.zeros(1, dtype=torch.long))


def test_training_gradients_reach_every_parameter():
    model = TerDiT(TerDiTConfig.from_name("TerDiT-tiny")).train()
    x, t, y = _inputs(model.cfg)
    target = torch.randn(4, 8, 8, 8)
    for _ in range(3):  # zero-initialised layers pass gradients on from the following steps
        model.zero_grad()
        (model(x, t, y) - target).pow(2).mean().backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.sub_(1e-2 * p.grad.sign())
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
