"""CPU checks of the fast path's Python side (the CUDA parts run in tests/test_accel_gpu.py)."""
import pytest
import torch

from terdit import TerDiTConfig, pack_model_
from terdit import w2a8
from terdit.accel import AcceleratedTerDiT, Fp8Linear, W2A8Linear, output_error
from terdit.fused import FusedTerDiT
from tests.helpers import random_model


def _fused(seed=0):
    model = random_model(TerDiTConfig.from_name("TerDiT-tiny", qk_norm=True), seed=seed)
    return FusedTerDiT(pack_model_(model).eval())


def _inputs(n=3):
    return torch.randn(n, 4, 8, 8), torch.rand(n) * 999, torch.randint(0, 10, (n,))


def test_compiled_blocks_trace_in_one_graph_and_match():
    model = _fused()
    x, t, y = _inputs()
    with torch.no_grad():
        ref = model(x, t, y)
    fast = AcceleratedTerDiT(model, compile=True, cuda_graphs=False, compile_backend="aot_eager")
    assert output_error(fast(x, t, y), ref) < 1e-5


def test_fp8_linear_matches_its_definition():
    layer = _fused().layers[0].qkv
    f8 = Fp8Linear(layer)
    assert f8.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(f8.weight.float(), layer.ternary_values().float())  # exact in e4m3
    x = torch.randn(2, 5, layer.in_features)
    s = x.abs().amax(-1, keepdim=True) / 448.0
    xq = (x / s).to(torch.float8_e4m3fn).float() * s
    expect = (xq @ layer.effective_weight().t()).to(torch.bfloat16).float()
    assert output_error(f8(x), expect) < 1e-2
    assert output_error(f8(x), layer(x)) < 0.1  # e4m3 keeps ~3 significant bits per token value


def test_cublaslt_comparison_mode_runs_the_whole_model():
    x, t, y = _inputs()
    with torch.no_grad():
        ref = _fused()(x, t, y)
    fast = AcceleratedTerDiT(_fused(), compile=False, cuda_graphs=False, w2a8=True,
                             w2a8_gemm="cublaslt")
    assert all(isinstance(b.qkv, Fp8Linear) and isinstance(b.w13, Fp8Linear) for b in fast.model.layers)
    assert output_error(fast(x, t, y), ref) < 0.1


def test_w2a8_linear_is_the_emulated_definition_on_the_2bit_codes():
    layer = _fused().layers[0].qkv
    lin = W2A8Linear(layer)
    assert lin.codes.data_ptr() == layer.codes.data_ptr()  # no weight copy
    assert not any(b.dtype == torch.float8_e4m3fn for b in lin.buffers())
    x = torch.randn(2, 5, layer.in_features)
    xq, s = w2a8.quantize_rows_e4m3_ref(x)
    expect = w2a8.ternary_linear_e4m3_ref(xq, s, layer.codes, layer.scale, layer.bias, x.dtype)
    assert torch.equal(lin(x), expect)
    assert output_error(lin(x), layer(x)) < 0.1  # e4m3 keeps ~3 significant bits per token value
    w13 = _fused().layers[0].w13
    xs = torch.randn(3, w13.in_features)
    assert output_error(W2A8Linear(w13).swiglu(xs), w13.swiglu(xs)) < 0.1
    # The cuBLASLt comparison layer uses the same quantization (same result up to fp32 sums).
    assert output_error(Fp8Linear(layer)(x), expect) < 1e-2


def test_w2a8_mode_runs_the_whole_model_and_fp8_is_its_deprecated_name():
    x, t, y = _inputs()
    with torch.no_grad():
        ref = _fused()(x, t, y)
    fast = AcceleratedTerDiT(_fused(), compile=False, cuda_graphs=False, w2a8=True)
    assert all(isinstance(b.qkv, W2A8Linear) and isinstance(b.w2, W2A8Linear)
               for b in fast.model.layers)
    out = fast(x, t, y)
    assert 0 < output_error(out, ref) < 0.1
    with pytest.warns(DeprecationWarning, match="w2a8=True"):
        old = AcceleratedTerDiT(_fused(), compile=False, cuda_graphs=False, fp8=True)
    assert old.w2a8 and torch.equal(old(x, t, y), out)
    with pytest.raises(ValueError, match="w2a8_gemm"):
        AcceleratedTerDiT(_fused(), compile=False, cuda_graphs=False, w2a8=True, w2a8_gemm="int8")


def test_w2a8_blocks_compile_in_one_graph():
    x, t, y = _inputs()
    eager = AcceleratedTerDiT(_fused(), compile=False, cuda_graphs=False, w2a8=True)
    fast = AcceleratedTerDiT(_fused(), compile=True, cuda_graphs=False, w2a8=True,
                             compile_backend="aot_eager")
    assert output_error(fast(x, t, y), eager(x, t, y)) < 1e-5


def test_cuda_graphs_need_cuda():
    with pytest.raises(ValueError, match="CUDA graphs need"):
        AcceleratedTerDiT(_fused(), compile=False, cuda_graphs=True)
