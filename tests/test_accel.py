"""CPU checks of the fast path's Python side (the CUDA parts run in tests/test_accel_gpu.py)."""
import pytest
import torch

from terdit import TerDiTConfig, pack_model_
from terdit.kernels.accel import AcceleratedTerDiT, Fp8Linear, W2A8Linear, output_error
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


def _e4m3(v: torch.Tensor) -> torch.Tensor:
    """float64 values rounded to float8 e4m3fn by the format's definition (3 mantissa bits,
    exponent bias 7, subnormal step 2^-9, largest finite 448): nearest, ties to even."""
    a = v.abs()
    exponent = torch.floor(torch.log2(a.clamp_min(2.0 ** -9))).clamp_min(-6)  # subnormals: 2^-6's
    step = torch.exp2(exponent - 3)
    return torch.sign(v) * (torch.round(a / step) * step).clamp_max(448.0)  # round: half to even


def _w1_58a8(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias) -> torch.Tensor:
    """W1.58A8 from its definition, in float64: per token s = max(amax |x|, 1e-12) / 448,
    y = (e4m3(x / s) * s) @ (T * scale)^T + bias, T read from the k16 layout (weight k in word
    k // 16 at bits 2 (k % 16), stored as T + 1)."""
    k = x.shape[-1]
    t = ((codes.long().unsqueeze(-1) >> (2 * torch.arange(16))) & 3) - 1   # (N, K / 16, 16)
    w = t.reshape(codes.shape[0], -1)[:, :k].double() * scale.double()[:, None]
    xd = x.double()
    s = xd.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 448.0
    y = (_e4m3(xd / s) * s) @ w.t()
    return y if bias is None else y + bias.double()


def _row_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max over tokens of max |a - b| / max |b| within the token."""
    a, b = a.double().flatten(0, -2), b.double().flatten(0, -2)
    return float(((a - b).abs().amax(-1) / b.abs().amax(-1).clamp_min(1e-300)).max())


def test_e4m3_definition_on_hand_computed_values():
    v = torch.tensor([448.0, 464.0, 1.0625, 1.1875, 0.0, 2.0 ** -9, 3 * 2.0 ** -10, 2.0 ** -11,
                      -17.0, 0.3], dtype=torch.float64)
    # 464: 448 + 16, beyond the top: 448; 1.0625 ties 1 | 1.125: even 1; 1.1875 ties 1.125 |
    # 1.25: even 1.25; 3 * 2^-10 ties 2^-9 | 2^-8: even 2^-8; 2^-11 ties to 0; 17 ties 16 | 18:
    # 16; 0.3: the step at 2^-2 is 2^-5, 0.3 / 2^-5 = 9.6 -> 10 * 2^-5
    expect = [448.0, 448.0, 1.0, 1.25, 0.0, 2.0 ** -9, 2.0 ** -8, 0.0, -16.0, 0.3125]
    assert _e4m3(v).tolist() == expect
    assert torch.equal(_e4m3(v), v.float().to(torch.float8_e4m3fn).double())


def test_w2a8_linear_is_the_w1_58a8_definition_on_the_2bit_codes():
    layer = _fused().layers[0].qkv
    lin = W2A8Linear(layer)
    assert lin.codes.data_ptr() == layer.codes.data_ptr()  # no weight copy
    assert not any(b.dtype == torch.float8_e4m3fn for b in lin.buffers())
    x = torch.randn(2, 5, layer.in_features) * torch.logspace(-3, 3, 5).reshape(1, 5, 1)
    expect = _w1_58a8(x, layer.codes, layer.scale, layer.bias)
    # same quantized x; fp32 sums of K exact products against float64 ones
    assert _row_error(lin(x), expect) < 1e-6
    assert output_error(lin(x), layer(x)) < 0.1  # e4m3 keeps ~3 significant bits per token value
    w13 = _fused().layers[0].w13
    xs = torch.randn(3, w13.in_features)
    a = _w1_58a8(xs, w13.codes, w13.scale, None)
    h = a.shape[-1] // 2
    assert _row_error(W2A8Linear(w13).swiglu(xs), torch.nn.functional.silu(a[:, :h]) * a[:, h:]) \
        < 1e-6
    # The cuBLASLt comparison layer uses the same quantization (same result up to fp32 sums
    # and its bf16 output).
    assert _row_error(Fp8Linear(layer)(x), expect) < 1e-2


def test_w2a8_mode_runs_the_whole_model():
    x, t, y = _inputs()
    with torch.no_grad():
        ref = _fused()(x, t, y)
    fast = AcceleratedTerDiT(_fused(), compile=False, cuda_graphs=False, w2a8=True)
    assert all(isinstance(b.qkv, W2A8Linear) and isinstance(b.w2, W2A8Linear)
               for b in fast.model.layers)
    out = fast(x, t, y)
    assert 0 < output_error(out, ref) < 0.1
    with pytest.raises(TypeError, match="fp8"):          # the old alias is gone
        AcceleratedTerDiT(_fused(), compile=False, cuda_graphs=False, fp8=True)
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
