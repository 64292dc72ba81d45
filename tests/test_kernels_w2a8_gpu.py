"""GPU tests of the W1.58A8 kernels (per-token e4m3 activations x 2-bit weights) against the fp64
product of the same e4m3 values; the error rule is in tests/kernel_gpu_common.py."""
from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

from terdit.kernels import cuda as kernels
from terdit.kernels import w2a8
from tests.kernel_gpu_common import *  # noqa: F401,F403 - the shared helpers and constants
from tests.kernel_gpu_common import GPU_MARKS

pytestmark = GPU_MARKS


@pytest.fixture(scope="module", autouse=True)
def _kernels(loaded_kernels):
    yield


# ---- W1.58A8 ----------------------------------------------------------------------------------

def fp8_capable():
    return not DRY_RUN and torch.cuda.get_device_capability() >= (8, 9)


def run_w2a8(xq, xs, w, scale, bias=None, *, swiglu=False, out_dtype=torch.bfloat16, path="auto"):
    n = w.shape[0]
    out = torch.full((*xq.shape[:-1], n // 2 if swiglu else n), float("nan"), dtype=out_dtype,
                     device=xq.device)
    if DRY_RUN:
        if swiglu:
            out.copy_(torch.ops.terdit.ternary_matmul_e4m3_swiglu(xq, xs, w, scale, out_dtype))
        else:
            out.copy_(torch.ops.terdit.ternary_matmul_e4m3(xq, xs, w, scale, bias, out_dtype))
        return out
    with kernels.force_path(path):
        kernels.matmul_e4m3_into(out, xq, xs, w, scale, bias, swiglu=swiglu)
    check_family(path, xq, out, w, e4m3=True)
    return out


def reference_w2a8(xq, xs, t, scale, bias=None, *, swiglu=False):
    """fp64 product of the e4m3 values, and torch's own W1.58A8 result for the bound."""
    a = (xq.double() @ t.double().t()) * xs.double()[..., None] * scale.double()
    if bias is not None:
        a = a + bias.double()
    if fp8_capable():
        # cuBLASLt wants M in multiples of 16 here: zero rows (scale 1) pad it.
        m = xq.shape[0]
        pad = (-m) % 16
        xq_p = torch.cat([xq, xq.new_zeros(pad, xq.shape[1])]) if pad else xq
        xs_p = torch.cat([xs, xs.new_ones(pad)]) if pad else xs
        lowp = torch._scaled_mm(xq_p, t.to(torch.float8_e4m3fn).t(), scale_a=xs_p[:, None].float(),
                                scale_b=scale[None, :].float(), out_dtype=torch.bfloat16,
                                use_fast_accum=True).float()[:m]
        if bias is not None:
            lowp = lowp + bias
    else:
        lowp = None
    if swiglu:
        h = a.shape[-1] // 2
        a = F.silu(a[..., :h]) * a[..., h:]
        if lowp is not None:
            lowp = (F.silu(lowp[..., :h]) * lowp[..., h:])
    if lowp is None:
        lowp = a.to(torch.bfloat16)  # no FP8 here: the bf16 rounding of the exact result
    return a, lowp.to(torch.bfloat16)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_quantize_matches_definition(dtype):
    g = gen(9000 + list(DTYPES).index(dtype))
    for m, k, offset in [(1, 16, 0), (7, 1040, 0), (33, 3072, 0), (512, 8192, 0), (5, 24, 0),
                         (9, 80, 1), (2, 8, 3)]:
        x = offset_view((m, k), DTYPES[dtype], offset)
        x.copy_(torch.randn(m, k, generator=g, device=DEVICE) * 10)
        if m > 3:
            x[3, k // 2] = float("nan")
        xq, xs = torch.ops.terdit.quantize_rows_e4m3(x)
        ref_q, ref_s = w2a8.quantize_rows_e4m3_ref(x)
        same_q = (xq.view(torch.uint8) == ref_q.view(torch.uint8)) | (
            torch.isnan(xq.float()) & torch.isnan(ref_q.float()))
        same_s = (xs == ref_s) | (torch.isnan(xs) & torch.isnan(ref_s))
        assert bool(same_q.all()) and bool(same_s.all()), (
            f"{dtype} M={m} K={k}: {int((~same_q).sum())} bytes, {int((~same_s).sum())} scales "
            f"differ from quantize_rows_e4m3_ref")


def quantized(m, k, g):
    xq, xs = w2a8.quantize_rows_e4m3_ref(torch.randn(m, k, generator=g, device=DEVICE))
    return xq, xs


@pytest.mark.parametrize("model,layer,n,k,bias,ms", [c for c in LAYER_CASES if c[1] != "adaln_stacked"],
                         ids=[f"{c[0]}-{c[1]}" for c in LAYER_CASES if c[1] != "adaln_stacked"])
def test_w2a8_layer_shapes(model, layer, n, k, bias, ms):
    if DRY_RUN:
        if model != "600M":
            pytest.skip("dry run: large shapes only on the GPU")
        ms = [m for m in ms if m <= 33]
    g = gen(zlib.crc32(f"w2a8-{model}-{layer}".encode()))
    t, w, scale, b = make_weights(n, k, g, bias)
    for m in ms:
        xq, xs = quantized(m, k, g)
        ours = run_w2a8(xq, xs, w, scale, b)
        ref, lowp = reference_w2a8(xq, xs, t, scale, b)
        assert_close(ours, ref, lowp, f"W1.58A8 {model} {layer} N={n} K={k} M={m}")


@pytest.mark.parametrize("path", W2A8_PATHS)
@pytest.mark.parametrize("out", list(DTYPES))
def test_w2a8_paths_odd_shapes(path, out):
    # Bound: torch's W1.58A8 error at bf16 output, whatever Y's type (loose for fp16 / fp32
    # outputs, still far below what a wrong index or decode produces).
    g = gen(9500 + W2A8_PATHS.index(path) * 10 + list(DTYPES).index(out))
    for i, (n, k) in enumerate(ODD_NK + [(160, 576), (272, 128), (48, 2112)]):
        t, w, scale, b = make_weights(n, k, g, bias=bool(i % 2))
        for m in ODD_M:
            xq, xs = quantized(m, k, g)
            ours = run_w2a8(xq, xs, w, scale, b, out_dtype=DTYPES[out], path=path)
            ref, lowp = reference_w2a8(xq, xs, t, scale, b)
            assert_close(ours, ref, lowp,
                         f"W1.58A8 path={path} out={out} N={n} K={k} M={m}")
    for n, k, ms in SWIGLU_CASES:
        if DRY_RUN and n > 1024:
            continue
        t, w, scale, _ = make_weights(n, k, g)
        for m in ms:
            xq, xs = quantized(m, k, g)
            ours = run_w2a8(xq, xs, w, scale, swiglu=True, out_dtype=DTYPES[out], path=path)
            ref, lowp = reference_w2a8(xq, xs, t, scale, swiglu=True)
            assert_close(ours, ref, lowp, f"W1.58A8 swiglu path={path} out={out} N={n} K={k} M={m}")


def test_w2a8_nan_token_and_misaligned_pointers():
    g = gen(9800)
    n, k, m = 96, 192, 37
    t, w, scale, b = make_weights(n, k, g, bias=True)
    x = torch.randn(m, k, generator=g, device=DEVICE)
    x[5, 7] = float("nan")
    xq, xs = torch.ops.terdit.quantize_rows_e4m3(x)
    out = run_w2a8(xq, xs, w, scale, b)
    assert torch.isnan(out[5]).all(), "a NaN input must reach every output of its token"
    keep = torch.arange(m, device=DEVICE) != 5
    ref, lowp = reference_w2a8(xq[keep], xs[keep], t, scale, b)
    assert_close(out[keep], ref, lowp, "W1.58A8 tokens without NaN")
    xq, xs = quantized(m, k, g)
    ref, lowp = reference_w2a8(xq, xs, t, scale, b)
    xq_off = offset_view(xq.shape, torch.float8_e4m3fn, 3)  # X not 16-byte aligned: generic
    xq_off.copy_(xq)
    assert_close(run_w2a8(xq_off, xs, w, scale, b), ref, lowp, "W1.58A8 misaligned X")
    w_off = offset_view(w.shape, torch.int32, 1)  # W 4-byte aligned: tc instead of wgmma
    w_off.copy_(w)
    assert_close(run_w2a8(xq, xs, w_off, scale, b), ref, lowp, "W1.58A8 misaligned W")


@cuda_only
def test_w2a8_cuda_graph_capture():
    if not fp8_capable():
        pytest.skip("W1.58A8 tensor-core paths need sm_89+")
    g = gen(6100)
    n, k, m = 512, 1024, 300
    t, w, scale, b = make_weights(n, k, g, bias=True)
    x = make_x(m, k, torch.bfloat16, g)
    xq = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=DEVICE)
    xs = torch.empty(m, device=DEVICE)
    out = torch.empty(m, n, dtype=torch.bfloat16, device=DEVICE)

    def step():
        q, s = torch.ops.terdit.quantize_rows_e4m3(x)
        xq.copy_(q)
        xs.copy_(s)
        kernels.matmul_e4m3_into(out, xq, xs, w, scale, b)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(2):
        x.copy_(make_x(m, k, torch.bfloat16, g))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        q, s = w2a8.quantize_rows_e4m3_ref(x)
        ref, lowp = reference_w2a8(q, s, t, scale, b)
        assert_close(out, ref, lowp, "W1.58A8 graph replay")
