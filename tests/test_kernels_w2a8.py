"""CPU checks of the W1.58A8 definition in terdit.kernels.w2a8: the per-token e4m3 quantization, the
product ops (terdit::ternary_matmul_e4m3[_swiglu], terdit::quantize_rows_e4m3) and their fake
implementations under torch.compile. The CUDA kernels are tested against these definitions (on
the CPU emulator in tests/test_kernels_emulated.py, on a GPU in tests/test_kernels_gpu.py)."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from terdit.kernels import w2a8
from terdit.formats import pack_k16


def e4m3_values() -> torch.Tensor:
    """Every finite e4m3fn value, decoded from its bits by the format's definition."""
    vals = []
    for sign, e, m in itertools.product((1.0, -1.0), range(16), range(8)):
        if e == 15 and m == 7:
            continue  # NaN
        vals.append(sign * (m / 8 * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)))
    return torch.tensor(sorted(set(vals)), dtype=torch.float64)


def test_quantization_is_round_to_nearest_e4m3_of_x_over_s():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 96, generator=gen) * torch.logspace(-4, 4, 6)[:, None]
    xq, s = w2a8.quantize_rows_e4m3_ref(x)
    assert xq.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (6,)
    assert torch.equal(s, x.abs().amax(-1) / 448.0)
    grid = e4m3_values()
    y = (x.double() / s.double()[:, None]).reshape(-1, 1)
    nearest = grid[(grid[None, :] - y).abs().argmin(-1)].reshape(x.shape)
    # x / s is computed in fp32 before rounding; a tie would be the only place the two differ.
    assert (xq.double() - nearest).abs().max() == 0
    assert xq.float().abs().amax(-1).eq(448.0).all()  # the largest |x| of a row maps to 448


def test_quantization_edge_rows():
    x = torch.zeros(3, 32)
    x[1, 5] = float("nan")
    x[2, :] = 1e-20
    xq, s = w2a8.quantize_rows_e4m3_ref(x)
    assert s[0] == torch.tensor(1e-12) / 448 and xq[0].float().eq(0).all()  # all-zero row
    assert torch.isnan(s[1]) and torch.isnan(xq[1].float()).all()  # NaN poisons its token only
    assert torch.isfinite(xq[2].float()).all() and xq[2].float().eq(0).all()  # underflow to 0
    assert torch.isfinite(s[[0, 2]]).all()


@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_ops_compute_the_definition(swiglu, out_dtype):
    gen = torch.Generator().manual_seed(1)
    n, k = 64, 80
    t = torch.randint(-1, 2, (n, k), generator=gen)
    w, scale = pack_k16(t), torch.rand(n, generator=gen) + 0.5
    bias = None if swiglu else torch.randn(n, generator=gen)
    x = torch.randn(2, 7, k, generator=gen)
    xq, s = torch.ops.terdit.quantize_rows_e4m3(x)
    ref_q, ref_s = w2a8.quantize_rows_e4m3_ref(x)
    assert torch.equal(xq.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(s, ref_s)
    a = (xq.double() @ t.double().t()) * s.double()[..., None] * scale.double()
    if bias is not None:
        a = a + bias.double()
    if swiglu:
        a = F.silu(a[..., :n // 2]) * a[..., n // 2:]
        y = torch.ops.terdit.ternary_matmul_e4m3_swiglu(xq, s, w, scale, out_dtype)
    else:
        y = torch.ops.terdit.ternary_matmul_e4m3(xq, s, w, scale, bias, out_dtype)
    assert y.dtype == out_dtype and y.shape == a.shape
    tol = 1e-6 if out_dtype == torch.float32 else 2 ** -8
    assert float((y.double() - a).abs().max() / a.abs().max()) <= tol


def test_ops_reject_bad_arguments():
    xq, s = w2a8.quantize_rows_e4m3_ref(torch.randn(3, 32))
    w, scale = pack_k16(torch.zeros(16, 32, dtype=torch.int8)), torch.ones(16)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        torch.ops.terdit.ternary_matmul_e4m3(xq.float(), s, w, scale, None, torch.bfloat16)
    with pytest.raises(ValueError, match="one scale per token"):
        torch.ops.terdit.ternary_matmul_e4m3(xq, s[:1], w, scale, None, torch.bfloat16)
    with pytest.raises(ValueError, match=r"W must be int32 \[N, 2\]"):
        torch.ops.terdit.ternary_matmul_e4m3(xq, s, w[:, :1], scale, None, torch.bfloat16)
    with pytest.raises(TypeError, match="float64"):
        torch.ops.terdit.ternary_matmul_e4m3(xq, s, w, scale, None, torch.float64)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        torch.ops.terdit.quantize_rows_e4m3(torch.randn(2, 16, dtype=torch.float64))


def test_ops_trace_in_one_graph():
    n, k = 32, 48
    w = pack_k16(torch.randint(-1, 2, (n, k)))
    w2 = pack_k16(torch.randint(-1, 2, (64, n)))
    scale = torch.rand(n)
    scale2 = torch.rand(64)

    def f(x):
        xq, s = torch.ops.terdit.quantize_rows_e4m3(x)
        y = torch.ops.terdit.ternary_matmul_e4m3(xq, s, w, scale, None, torch.bfloat16)
        xq2, s2 = w2a8.quantize_rows_e4m3_ref(y)
        return torch.ops.terdit.ternary_matmul_e4m3_swiglu(xq2, s2, w2, scale2, torch.float32)

    x = torch.randn(5, k)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), f(x))
