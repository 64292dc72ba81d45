"""GPU tests of the TernaryMatMul CUDA kernels against the reference (terdit.ternary).

Error rule (FlashAttention style): ||ours - ref|| <= 2 * ||torch - ref|| + tiny, where ref is the
fp64 product of the same (low-precision) inputs and `torch` is torch's own F.linear in the same
dtype on the materialised weight scale * T. W1.58A8 (e4m3 activations): ref is the fp64 product of
the same e4m3 values and scales (the fp32 emulation's exact counterpart), `torch` is cuBLASLt FP8
(torch._scaled_mm, row-wise scales, fast accumulation, bf16 output) on an e4m3 copy of the
weights, or the bf16 rounding of ref where the GPU has no FP8. Outputs are poisoned with NaN
before every call, so an unwritten element fails, and a non-finite output never passes.

TERDIT_KERNEL_TEST_DRY_RUN=1 runs the same test logic on CPU with the reference standing in for
the kernels (smaller sizes): it checks the tests themselves on a machine without a GPU.
"""
from __future__ import annotations

import math
import os
import zlib

import pytest
import torch
import torch.nn.functional as F

from terdit import kernels
from terdit.ternary import pack_k16, ternary_linear_ref

DRY_RUN = os.environ.get("TERDIT_KERNEL_TEST_DRY_RUN") == "1"
DEVICE = "cpu" if DRY_RUN else "cuda"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not DRY_RUN and not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (the kernels are built for sm_80 and sm_90a)"),
]
cuda_only = pytest.mark.skipif(DRY_RUN, reason="CUDA-specific (dry run on CPU)")

PATHS = ["auto", "skinny", "tc", "generic", "wgmma", "wgmma2"]  # wgmma* run tc off sm_90
W2A8_PATHS = ["auto", "tc", "generic", "wgmma"]  # the launcher's rules pick among wgmma/tc/generic
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOKEN_M = [1, 2, 7, 16, 33, 128, 512, 1000, 2048]
COND_M = [1, 2, 7, 16, 33]  # adaLN layers see M = batch


def model_layers(dim, hidden, n_layers):
    """(name, N, K, bias, M values) of every ternary GEMM of one TerDiT model."""
    return [
        ("qkv", 3 * dim, dim, False, TOKEN_M),
        ("wo", dim, dim, False, TOKEN_M),
        ("w1w3", 2 * hidden, dim, False, TOKEN_M),
        ("w2", dim, hidden, False, TOKEN_M),
        ("adaln", 6 * dim, 1024, True, COND_M),
        ("adaln_stacked", n_layers * 6 * dim, 1024, True, COND_M),
    ]


LAYERS = {"600M": model_layers(1536, 4096, 16), "4.2B": model_layers(3072, 8192, 32)}
LAYER_CASES = [(model, *layer) for model, layers in LAYERS.items() for layer in layers]


@pytest.fixture(scope="module", autouse=True)
def _load_kernels():
    if not DRY_RUN:
        kernels.load()
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # torch's fp32 baseline must be real fp32
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def gen(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


def make_weights(n, k, g, bias=False):
    t = torch.randint(-1, 2, (n, k), generator=g, device=DEVICE, dtype=torch.int8)
    w = pack_k16(t)
    scale = (torch.rand(n, generator=g, device=DEVICE) + 0.5) / math.sqrt(k)
    b = torch.randn(n, generator=g, device=DEVICE) if bias else None
    return t, w, scale, b


def make_x(m, k, dtype, g):
    return torch.randn(m, k, generator=g, device=DEVICE).to(dtype)


def run(x, w, scale, bias=None, *, swiglu=False, path="auto"):
    """Our kernel into a NaN-poisoned output (dry run: the reference)."""
    n = w.shape[0]
    out = torch.full((*x.shape[:-1], n // 2 if swiglu else n), float("nan"), dtype=x.dtype,
                     device=x.device)
    if DRY_RUN:
        if swiglu:
            a = ternary_linear_ref(x.float(), w, scale, bias).float()
            out.copy_(F.silu(a[..., : n // 2]) * a[..., n // 2:])
        else:
            out.copy_(ternary_linear_ref(x, w, scale, bias))
        return out
    with kernels.force_path(path):
        kernels.matmul_into(out, x, w, scale, bias, swiglu=swiglu)
    return out


def reference(x, t, scale, bias=None, *, swiglu=False):
    """fp64 product of the given inputs, plus torch's own low-precision result for the bound."""
    a = (x.double() @ t.double().t()) * scale.double()
    if bias is not None:
        a = a + bias.double()
    w_lowp = (scale[:, None] * t.float()).to(x.dtype)
    lowp = F.linear(x, w_lowp, None if bias is None else bias.to(x.dtype))
    if swiglu:
        h = a.shape[-1] // 2
        a = F.silu(a[..., :h]) * a[..., h:]
        lowp = F.silu(lowp[..., :h]) * lowp[..., h:]
    return a, lowp


def assert_close(ours, ref, lowp, what):
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    bad = ~torch.isfinite(ours)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} non-finite outputs (unwritten or NaN), "
                             f"first at {idx}")
    err = float((ours.double() - ref).norm())
    base = float((lowp.double() - ref).norm())
    ref_norm = float(ref.norm())
    tiny = (1e-5 if ours.dtype == torch.float32 else 1e-6) * ref_norm + 1e-12
    assert err <= 2 * base + tiny, (
        f"{what}: ||ours - ref|| = {err:.4e} > 2 * ||torch - ref|| + tiny = {2 * base + tiny:.4e} "
        f"(relative {err / max(ref_norm, 1e-30):.2e})")


# ---- every TerDiT layer shape -------------------------------------------------------------------

@pytest.mark.parametrize("model,layer,n,k,bias,ms", LAYER_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in LAYER_CASES])
@pytest.mark.parametrize("dtype,path", [("bf16", "auto"), ("fp16", "auto"), ("fp32", "auto"),
                                        ("bf16", "wgmma"), ("bf16", "wgmma2"), ("bf16", "tc")])
def test_layer_shapes(model, layer, n, k, bias, ms, dtype, path):
    if path in ("wgmma", "wgmma2", "tc"):
        ms = [m for m in ms if m > 32]  # the large-M kernels
        if not ms:
            pytest.skip("no M > 32 for this layer")
    if dtype != "bf16" and model != "600M":
        pytest.skip("fp16 / fp32 are swept on the 600M shapes (bf16 covers 4.2B)")
    if dtype == "fp32" and layer not in ("wo", "adaln"):
        pytest.skip("fp32 (generic FFMA kernel) is checked on two shapes")
    if DRY_RUN:
        if model != "600M" or layer == "adaln_stacked":
            pytest.skip("dry run: large shapes only on the GPU")
        ms = [m for m in ms if m <= 33]
    g = gen(zlib.crc32(f"{model}-{layer}-{dtype}-{path}".encode()))
    t, w, scale, b = make_weights(n, k, g, bias)
    for m in ms:
        x = make_x(m, k, DTYPES[dtype], g)
        ours = run(x, w, scale, b, path=path)
        ref, lowp = reference(x, t, scale, b)
        assert_close(ours, ref, lowp, f"{model} {layer} N={n} K={k} M={m} {dtype} path={path}")


# ---- every kernel family on odd shapes -----------------------------------------------------------

ODD_NK = [(16, 16), (48, 48), (80, 80), (16, 272), (208, 80), (144, 1040), (96, 4112),
          (80, 576), (48, 2112)]  # the last two: K % 64 == 0 (16-byte weight loads, the TMA kernel)
ODD_M = [1, 3, 5, 8, 9, 17, 33, 65, 130]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_paths_odd_shapes(path, dtype):
    g = gen(1000 + PATHS.index(path) * 10 + list(DTYPES).index(dtype))
    for i, (n, k) in enumerate(ODD_NK):
        t, w, scale, b = make_weights(n, k, g, bias=bool(i % 2))
        for m in ODD_M:
            x = make_x(m, k, DTYPES[dtype], g)
            ours = run(x, w, scale, b, path=path)
            ref, lowp = reference(x, t, scale, b)
            assert_close(ours, ref, lowp, f"path={path} N={n} K={k} M={m} {dtype} "
                                          f"bias={b is not None}")


# ---- the persistent wgmma kernel: both token tiles, many tiles per CTA, SwiGLU -------------------

def test_wgmma_token_tiles_and_swiglu():
    # The launcher picks 128- or 256-token tiles with a wave model; these M values reach both on
    # 132 SMs (and walk several tiles per CTA at M = 4096), on the 4.2B token GEMMs and SwiGLU.
    g = gen(1500)
    cases = [(n, k, False, [33, 300, 512, 1000, 4096]) for _, n, k, _, _ in LAYERS["4.2B"][:4]]
    cases += [(2 * 8192, 3072, True, [512, 1000, 4096]), (96, 192, True, [33, 300])]
    if DRY_RUN:
        cases = [(n, k, sw, [m for m in ms if m <= 300]) for n, k, sw, ms in cases
                 if n * k <= 1 << 20]
    for i, (n, k, swiglu, ms) in enumerate(cases):
        t, w, scale, b = make_weights(n, k, g, bias=bool(i % 2) and not swiglu)
        for m in ms:
            x = make_x(m, k, torch.bfloat16, g)
            ours = run(x, w, scale, b, swiglu=swiglu, path="wgmma")
            ref, lowp = reference(x, t, scale, b, swiglu=swiglu)
            assert_close(ours, ref, lowp, f"wgmma N={n} K={k} M={m} swiglu={swiglu}")


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
        ref_q, ref_s = kernels.quantize_rows_e4m3_ref(x)
        same_q = (xq.view(torch.uint8) == ref_q.view(torch.uint8)) | (
            torch.isnan(xq.float()) & torch.isnan(ref_q.float()))
        same_s = (xs == ref_s) | (torch.isnan(xs) & torch.isnan(ref_s))
        assert bool(same_q.all()) and bool(same_s.all()), (
            f"{dtype} M={m} K={k}: {int((~same_q).sum())} bytes, {int((~same_s).sum())} scales "
            f"differ from quantize_rows_e4m3_ref")


def quantized(m, k, g):
    xq, xs = kernels.quantize_rows_e4m3_ref(torch.randn(m, k, generator=g, device=DEVICE))
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


# ---- SwiGLU epilogue -----------------------------------------------------------------------------

SWIGLU_CASES = [(32, 16, ODD_M), (96, 80, ODD_M), (64, 1040, ODD_M),
                (2 * 4096, 1536, [2, 16, 33, 512]), (2 * 8192, 3072, [2, 16, 512, 2048])]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_swiglu(path, dtype):
    g = gen(2000 + PATHS.index(path) * 10 + list(DTYPES).index(dtype))
    for i, (n, k, ms) in enumerate(SWIGLU_CASES):
        if (DRY_RUN or dtype == "fp32") and n > 1024:
            continue
        t, w, scale, b = make_weights(n, k, g, bias=bool(i % 2))
        for m in ms:
            x = make_x(m, k, DTYPES[dtype], g)
            ours = run(x, w, scale, b, swiglu=True, path=path)
            ref, lowp = reference(x, t, scale, b, swiglu=True)
            assert_close(ours, ref, lowp, f"swiglu path={path} N={n} K={k} M={m} {dtype}")


# ---- the registered ops --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_registered_ops(dtype):
    g = gen(3000)
    t, w, scale, b = make_weights(96, 160, g, bias=True)
    x = torch.randn(2, 5, 3, 160, generator=g, device=DEVICE).to(DTYPES[dtype])
    y = torch.ops.terdit.ternary_matmul(x, w, scale, b)
    assert y.shape == (2, 5, 3, 96) and y.dtype == x.dtype and y.device == x.device
    ref, lowp = reference(x.reshape(-1, 160), t, scale, b)
    assert_close(y.reshape(-1, 96), ref, lowp, "ternary_matmul op")
    # Non-contiguous activations (a transposed view) are compacted by the binding.
    xt = x.reshape(-1, 160).t().contiguous().t()
    assert_close(torch.ops.terdit.ternary_matmul(xt, w, scale, b), ref, lowp, "strided x")
    # A model-dtype bias (TernaryLinear under .to(bf16)) is accepted.
    y_bias = torch.ops.terdit.ternary_matmul(x, w, scale, b.to(x.dtype))
    assert torch.isfinite(y_bias).all()
    ys = torch.ops.terdit.ternary_matmul_swiglu(x, w, scale)
    assert ys.shape == (2, 5, 3, 48)
    ref_s, lowp_s = reference(x.reshape(-1, 160), t, scale, swiglu=True)
    assert_close(ys.reshape(-1, 48), ref_s, lowp_s, "ternary_matmul_swiglu op")
    # The op and the reference implementation agree in dtype and shape for M = 0.
    empty = torch.ops.terdit.ternary_matmul(x[:0], w, scale, b)
    assert empty.shape == (0, 5, 3, 96)
    assert torch.ops.terdit.ternary_matmul_swiglu(x[:, :0], w, scale).shape == (2, 0, 3, 48)


@cuda_only
def test_registered_op_matches_cpu_reference_op():
    g = gen(3100)
    _, w, scale, b = make_weights(64, 64, g, bias=True)
    x = make_x(9, 64, torch.bfloat16, g)
    gpu = torch.ops.terdit.ternary_matmul(x, w, scale, b).float().cpu()
    cpu = torch.ops.terdit.ternary_matmul(x.cpu(), w.cpu(), scale.cpu(), b.cpu()).float()
    assert (gpu - cpu).abs().max() <= 2 ** -6 * cpu.abs().max()


# ---- alignment fallbacks, NaN, streams, graphs, chunking -----------------------------------------

def offset_view(shape, dtype, elems):
    """A contiguous tensor whose data pointer is `elems` elements past an aligned allocation."""
    numel = math.prod(shape)
    return torch.empty(numel + elems, dtype=dtype, device=DEVICE)[elems:].view(shape)


@pytest.mark.parametrize("path", PATHS)
def test_misaligned_pointers(path):
    g = gen(4000)
    n, k, m = 80, 192, 37
    t, w, scale, b = make_weights(n, k, g, bias=True)
    x = make_x(m, k, torch.bfloat16, g)
    ref, lowp = reference(x, t, scale, b)
    # W 4-byte but not 16-byte aligned: the 4-byte weight loads.
    w_off = offset_view(w.shape, torch.int32, 1)
    w_off.copy_(w)
    assert_close(run(x, w_off, scale, b, path=path), ref, lowp, f"misaligned W path={path}")
    # X 2-byte aligned: the generic kernel takes over.
    x_off = offset_view(x.shape, x.dtype, 1)
    x_off.copy_(x)
    assert_close(run(x_off, w, scale, b, path=path), ref, lowp, f"misaligned X path={path}")
    if not DRY_RUN:
        out = offset_view((m, n), x.dtype, 3)
        out.fill_(float("nan"))
        with kernels.force_path(path):
            kernels.matmul_into(out, x, w, scale, b)
        assert_close(out, ref, lowp, f"misaligned Y path={path}")


@pytest.mark.parametrize("path", PATHS)
def test_nan_stays_in_its_token(path):
    g = gen(5000)
    n, k, m = 64, 128, 12
    t, w, scale, _ = make_weights(n, k, g)
    t[:, 0] = 1
    w = pack_k16(t)
    x = make_x(m, k, torch.bfloat16, g)
    x[5, 0] = float("nan")
    out = run(x, w, scale, path=path)
    assert torch.isnan(out[5]).all(), "a NaN input must reach every output of its token"
    keep = torch.arange(m, device=DEVICE) != 5
    ref, lowp = reference(x[keep], t, scale)
    assert_close(out[keep], ref, lowp, f"tokens without NaN, path={path}")


@cuda_only
def test_rejects_bad_sizes():
    x = torch.randn(4, 64, device=DEVICE, dtype=torch.bfloat16)
    w = pack_k16(torch.randint(-1, 2, (48, 64), device=DEVICE))
    scale = torch.rand(48, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of 16"):
        torch.ops.terdit.ternary_matmul(torch.randn(4, 40, device=DEVICE), w[:, :3].contiguous(),
                                        scale)
    with pytest.raises(ValueError, match="multiple of 16"):
        torch.ops.terdit.ternary_matmul(x, w[:40].contiguous(), scale[:40])
    with pytest.raises(ValueError, match="multiple of 32"):
        torch.ops.terdit.ternary_matmul_swiglu(x, w, scale)
    with pytest.raises(ValueError, match="same CUDA device"):
        torch.ops.terdit.ternary_matmul(x, w, scale.cpu())
    with pytest.raises(TypeError):
        torch.ops.terdit.ternary_matmul(x.double(), w, scale)
    # The C entry point applies the same rules (cudaErrorInvalidValue + a reason).
    lib = kernels.load()
    args = (x.data_ptr(), w.data_ptr(), scale.data_ptr(), None, x.data_ptr(), 4, 40, 64, 2, 0, 0)
    assert lib.terditTernaryMatmulEx(*args, None) == 1
    assert b"n=40" in lib.terditCheck(*args)


@cuda_only
@pytest.mark.parametrize("path,m", [("skinny", 2), ("skinny", 16), ("tc", 512), ("generic", 64),
                                    ("wgmma", 300), ("wgmma", 4096), ("wgmma2", 300)])
def test_cuda_graph_capture(path, m):
    g = gen(6000)
    n, k = 256, 512
    t, w, scale, b = make_weights(n, k, g, bias=True)
    x = make_x(m, k, torch.bfloat16, g)
    out = torch.empty(m, n, dtype=x.dtype, device=DEVICE)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), kernels.force_path(path):
        kernels.matmul_into(out, x, w, scale, b)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with kernels.force_path(path), torch.cuda.graph(graph):
        kernels.matmul_into(out, x, w, scale, b)
    for _ in range(2):
        x.copy_(make_x(m, k, torch.bfloat16, g))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref, lowp = reference(x, t, scale, b)
        assert_close(out, ref, lowp, f"graph replay path={path} M={m}")


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
        q, s = kernels.quantize_rows_e4m3_ref(x)
        ref, lowp = reference_w2a8(q, s, t, scale, b)
        assert_close(out, ref, lowp, "W1.58A8 graph replay")


@cuda_only
def test_side_stream():
    g = gen(7000)
    t, w, scale, b = make_weights(512, 1024, g, bias=True)
    for m in (2, 300):
        x = make_x(m, 1024, torch.bfloat16, g)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            y = torch.ops.terdit.ternary_matmul(x, w, scale, b)
        torch.cuda.current_stream().wait_stream(stream)
        ref, lowp = reference(x, t, scale, b)
        assert_close(y, ref, lowp, f"side stream M={m}")


@cuda_only
@pytest.mark.parametrize("path", ["tc", "generic", "wgmma", "wgmma2"])
def test_m_beyond_one_grid(path):
    # More token tiles than gridDim.y allows (65535 x 128 for tc / wgmma2 with 128-token tiles,
    # 65535 x 64 for generic): the launcher splits M; the persistent wgmma kernel (K = 64: its
    # smallest shape) walks them with SM-count CTAs.
    g = gen(8000)
    n, k = 16, 64
    m = 65535 * 128 + 37
    t, w, scale, b = make_weights(n, k, g, bias=True)
    x = make_x(m, k, torch.bfloat16, g)
    out = run(x, w, scale, b, path=path)
    ref = ((x.float() @ t.float().t()) * scale + b).to(torch.bfloat16)
    bad = ~torch.isfinite(out)
    assert not bool(bad.any()), f"{int(bad.sum())} unwritten outputs"
    diff = (out.float() - ref.float()).abs()
    assert float(diff.max()) <= 2 ** -6 * float(ref.float().abs().max()), float(diff.max())
