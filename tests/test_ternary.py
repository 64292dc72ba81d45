import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from terdit.formats import (ZERO_WORD, check_k16, codes_to_hqq, hqq_to_codes, hqq_to_k16,
                            k16_to_codes, k16_to_hqq, pack_k16, ternarize, unpack_k16)
from terdit.ternary import (TernaryLinear, k16_words, swiglu_ref, ternary_linear_ref,
                            ternary_matmul, ternary_matmul_swiglu)
from tests.official_layout import hqq_pack, hqq_unpack

shapes = st.tuples(st.integers(1, 40), st.integers(1, 70))


def _ternary(n, k, seed):
    return torch.randint(-1, 2, (n, k), generator=torch.Generator().manual_seed(seed)).to(torch.int8)


@settings(max_examples=60, deadline=None)
@given(shapes, st.integers(0, 2**31 - 1))
def test_k16_roundtrip_and_bit_positions(shape, seed):
    n, k = shape
    t = _ternary(n, k, seed)
    w = pack_k16(t)
    assert w.dtype == torch.int32 and w.shape == (n, k16_words(k))
    assert torch.equal(unpack_k16(w, k), t)
    # bit positions by definition: weight (n, k) at word k // 16, bits 2 * (k % 16)
    r, c = seed % n, (seed // 7) % k
    word = int(w[r, c // 16]) & 0xFFFFFFFF
    assert (word >> (2 * (c % 16))) & 3 == int(t[r, c]) + 1
    # padding holds code 1 (weight 0)
    codes = k16_to_codes(w, k16_words(k) * 16)
    assert bool((codes[:, k:] == 1).all())
    check_k16(w, k)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(1, 50), st.integers(0, 2**31 - 1))
def test_hqq_roundtrip_matches_official_bit_layout(n4, k, seed):
    t = _ternary(4 * n4, k, seed)
    codes = (t + 1).to(torch.uint8)
    official = hqq_pack(codes)  # the test's own packer, written from the layout spec
    assert torch.equal(codes_to_hqq(codes), official)
    assert torch.equal(hqq_to_codes(official), codes)
    assert torch.equal(hqq_unpack(official), codes)
    w = hqq_to_k16(official)
    assert torch.equal(w, pack_k16(t))
    assert torch.equal(k16_to_hqq(w, k), official)


def test_k16_is_bytewise_four_codes_per_byte():
    t = _ternary(3, 32, 1)
    b = pack_k16(t).view(torch.uint8)
    codes = (t + 1).to(torch.uint8)
    expect = codes[:, 0::4] | codes[:, 1::4] << 2 | codes[:, 2::4] << 4 | codes[:, 3::4] << 6
    assert torch.equal(b, expect)
    assert int(pack_k16(torch.zeros(1, 16))[0, 0]) == ZERO_WORD


def test_rejects_invalid_codes():
    with pytest.raises(ValueError, match="not ternary"):
        pack_k16(torch.tensor([[0.0, 2.0]]))
    bad = pack_k16(_ternary(2, 16, 0))
    bad[1, 0] |= 3 << 6   # code 3 at column 3
    with pytest.raises(ValueError, match="code 3 .* row 1, column 3"):
        check_k16(bad, 16)
    pad = pack_k16(_ternary(1, 10, 0))
    pad[0, 0] &= ~(3 << 24)  # column 12 (padding) -> code 0
    with pytest.raises(ValueError, match="padding"):
        check_k16(pad, 10)
    with pytest.raises(ValueError, match="code 3"):
        hqq_to_k16(torch.full((1, 4), 0xFF, dtype=torch.uint8))


def test_ternarize_rule_on_hand_computed_values():
    # gamma = mean |W| = 8 / 8 = 1 exactly; W / gamma rounds to nearest, ties to even, then clamps
    w = torch.tensor([0.5, -0.5, 1.5, -2.5, 0.25, 1.0, -0.75, 1.0])
    expect = [0.0, 0.0, 1.0, -1.0, 0.0, 1.0, -1.0, 1.0]
    assert ternarize(w).tolist() == expect
    assert ternarize(w, eps=0.0).tolist() == expect          # 0.5 and -0.5 are exact ties here
    # gamma 2: 0.5 -> 0 (tie to even; half-up would give 1), 1.5 -> 2 -> clamp 1
    assert ternarize(torch.tensor([1.0, 3.0, -1.0, -3.0]), eps=0.0).tolist() == [0, 1, 0, -1]
    # gamma 0.5 + eps: 0.5 / (0.5 + 1e-6) is just below 1, 0.25 / (0.5 + 1e-6) just below 0.5
    assert ternarize(torch.tensor([0.5, 0.25, -0.75, 0.5])).tolist() == [1.0, 0.0, -1.0, 1.0]
    assert ternarize(torch.zeros(4)).tolist() == [0.0] * 4  # eps keeps 0/0 away


def test_ternarize_is_the_absmean_rule_of_the_paper():
    """T = RoundClip(W / (mean |W| + eps), -1, 1) over the whole tensor, written here in float64
    as thresholds: |W / (gamma + eps)| > 1/2 gives sign(W), else 0."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 53, generator=g) * torch.rand(37, 1, generator=g)  # rows of any size
    q = w.double() / (w.double().abs().mean() + 1e-6)
    expect = torch.where(q.abs() > 0.5, torch.sign(q), torch.zeros_like(q))
    clear = (q.abs() - 0.5).abs() > 1e-5           # float32 and float64 agree off the 1/2 boundary
    got = ternarize(w)
    assert got.dtype == w.dtype and clear.float().mean() > 0.99
    assert torch.equal(got.double()[clear], expect[clear])
    assert set(got.unique().tolist()) == {-1.0, 0.0, 1.0}


def test_ste_gradient_is_identity_and_alpha_learns():
    layer = TernaryLinear(8, 4, bias=True)
    x = torch.randn(3, 8)
    layer(x).pow(2).sum().backward()
    w_eff = (layer.alphas * ternarize(layer.weight)).detach().requires_grad_(True)
    ref = torch.nn.functional.linear(x, w_eff, layer.bias.detach()).pow(2).sum()
    ref.backward()
    assert torch.allclose(layer.weight.grad, layer.alphas.detach() * w_eff.grad)
    assert layer.alphas.grad is not None and layer.alphas.grad.abs() > 0


def test_reset_alpha():
    layer = TernaryLinear(16, 8)
    assert torch.allclose(layer.alphas, layer.weight.abs().mean())
    torch.nn.init.zeros_(layer.weight)
    layer.reset_alpha()
    assert float(layer.alphas.detach()) == pytest.approx(0.25)  # 1/sqrt(16): zero alpha would kill the STE


@pytest.mark.parametrize("bias", [False, True])
def test_training_and_packed_layers_agree(bias):
    layer = TernaryLinear(48, 32, bias=bias)
    if bias:
        torch.nn.init.normal_(layer.bias)
    packed = layer.to_packed()
    assert packed.packed and packed.codes.shape == (32, 3) and packed.scale.dtype == torch.float32
    x = torch.randn(5, 7, 48)
    with torch.no_grad():
        assert torch.allclose(layer(x), packed(x), rtol=1e-6, atol=1e-6)
    assert torch.equal(layer.ternary_values(), packed.ternary_values())
    assert torch.allclose(layer.effective_weight(), packed.effective_weight())


def test_packed_scale_stays_fp32_under_dtype_casts():
    packed = TernaryLinear(32, 16).to_packed()
    packed.scale.fill_(0.123456789)
    for dt in (torch.float16, torch.bfloat16):
        p2 = packed.to(dt)
        assert p2.scale.dtype == torch.float32 and float(p2.scale[0]) == pytest.approx(0.123456789)
        assert p2.bias.dtype == torch.float32 and p2.codes.dtype == torch.int32
        assert p2(torch.randn(2, 32, dtype=dt)).dtype == dt


def test_reference_op_semantics():
    k, n = 40, 24
    t = _ternary(n, k, 3)
    w, scale, bias = pack_k16(t), torch.rand(n) + 0.5, torch.randn(n)
    x = torch.randn(2, 3, k, dtype=torch.float64)
    ref = (x @ (scale[:, None] * t.double()).t() + bias).float()
    y = ternary_linear_ref(x.float(), w, scale, bias)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(ternary_matmul(x.float(), w, scale, bias), y)
    assert torch.equal(torch.ops.terdit.ternary_matmul(x.float(), w, scale, bias), y)
    assert ternary_matmul(x.bfloat16(), w, scale).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"W must be int32 \[N, 4\] for K=50"):
        ternary_matmul(torch.randn(2, 50), w, scale)
    with pytest.raises(ValueError, match="scale must have shape"):
        ternary_matmul(x.float(), w, scale[:-1])


def test_swiglu_op():
    k, h = 32, 16
    t = _ternary(2 * h, k, 4)
    w, scale = pack_k16(t), torch.rand(2 * h) + 0.5
    x = torch.randn(3, k)
    a = ternary_linear_ref(x, w, scale)
    expect = torch.nn.functional.silu(a[:, :h]) * a[:, h:]
    assert torch.allclose(ternary_matmul_swiglu(x, w, scale), expect, atol=1e-6)
    assert torch.allclose(swiglu_ref(x, w, scale), expect, atol=1e-6)


def test_op_traces_under_torch_compile():
    layer = TernaryLinear(32, 16).to_packed()
    x = torch.randn(4, 32)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    assert torch.allclose(compiled(x), layer(x))


def test_packed_op_gradients():
    layer = TernaryLinear(32, 16).to_packed()
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(3, 32, requires_grad=True)
    layer(x).pow(2).sum().backward()
    eff = layer.effective_weight().requires_grad_(False)
    x2 = x.detach().clone().requires_grad_(True)
    b2 = layer.bias.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, eff, b2).pow(2).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    assert torch.allclose(layer.bias.grad, b2.grad, atol=1e-5)
