"""GPU tests of the TernaryMatMul CUDA kernels (bf16 / fp16 / fp32 activations) against the
reference (terdit.ternary); the error rule is in tests/kernel_gpu_common.py."""
from __future__ import annotations

import zlib

import pytest
import torch

from terdit.kernels import cuda as kernels
from terdit.formats import pack_k16
from tests.kernel_gpu_common import *  # noqa: F401,F403 - the shared helpers and constants
from tests.kernel_gpu_common import GPU_MARKS

pytestmark = GPU_MARKS


@pytest.fixture(scope="module", autouse=True)
def _kernels(loaded_kernels):
    yield


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


# ---- SwiGLU epilogue -----------------------------------------------------------------------------



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
