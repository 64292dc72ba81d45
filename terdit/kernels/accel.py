"""The fast CUDA path of a fused ternary DiT: our TernaryMatMul kernels for every ternary GEMM,
torch.compile'd blocks (RMSNorm + modulate, RoPE, gated residuals fused by inductor; attention
through SDPA's flash kernel), and the whole forward captured in one CUDA graph per batch size.

W1.58A8 mode (`w2a8=True`): the token GEMMs (qkv, wo, w1|w3, w2) quantize their input per token
to float8 e4m3 (terdit.kernels.w2a8.quantize_rows_e4m3_ref: pure torch ops, so inside the compiled
block inductor fuses the quantization into RMSNorm + modulate for qkv and w1|w3 (one kernel on
CPU inductor, torch 2.13; compiled and eager quantization agree bit for bit), and into one kernel
for the inputs of wo and w2) and multiply those bytes by the 2-bit codes on FP8 tensor
cores (`terdit::ternary_matmul_e4m3`; the codes are decoded to e4m3 in registers, exact for
-1, 0, +1), with the token scale and the per-channel ternary scale in the GEMM epilogue. The
weights stay 2-bit codes on the GPU: no e4m3 weight copy. The small-M adaLN GEMM stays weight-only.
On CPU the same ops run their reference implementations, an exact emulation of the quantization
(accuracy studies). It needs FP8 tensor cores (sm_89+) on CUDA; elsewhere the model runs
weight-only, with a warning.

The cuBLASLt FP8 comparison (an e4m3 weight copy through torch._scaled_mm, one byte per weight) is
`w2a8_gemm="cublaslt"`, kept until a GPU run decides it (bench/e2e.py).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..formats import unpack_k16
from ..fused import FusedTerDiT
from ..ternary import TernaryLinear, apply_keep_fp32
from .w2a8 import quantize_rows_e4m3_ref  # and the W1.58A8 ops (no CUDA call at import)

W2A8_GEMMS = ("ternary", "cublaslt")


class W2A8Linear(nn.Module):
    """y = (e4m3(x / s) @ T^T) * s * scale + bias with s the per-token scale (W1.58A8). Holds the
    layer's own 2-bit codes, scale and bias (shared, not copied)."""

    def __init__(self, layer: TernaryLinear) -> None:
        super().__init__()
        if not layer.packed:
            raise ValueError("W2A8Linear needs a packed TernaryLinear (terdit.pack_model_)")
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.register_buffer("codes", layer.codes)
        self.register_buffer("scale", layer.scale)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach())

    def _apply(self, fn, recurse=True):
        return apply_keep_fp32(self, fn, recurse, buffers=("scale", "bias"))

    def forward(self, x: Tensor) -> Tensor:
        xq, s = quantize_rows_e4m3_ref(x)                            # (..., K) e4m3, (...)
        return torch.ops.terdit.ternary_matmul_e4m3(xq, s, self.codes, self.scale, self.bias,
                                                    x.dtype)

    def swiglu(self, x: Tensor) -> Tensor:
        if self.bias is not None:
            raise ValueError("swiglu() needs a layer without bias (a fused w1|w3)")
        xq, s = quantize_rows_e4m3_ref(x)
        return torch.ops.terdit.ternary_matmul_e4m3_swiglu(xq, s, self.codes, self.scale, x.dtype)


def to_w2a8_(model: FusedTerDiT) -> FusedTerDiT:
    """Swap the token GEMMs of every block to W1.58A8 on the 2-bit codes (in place)."""
    for block in model.layers:
        for name in ("qkv", "wo", "w13", "w2"):
            setattr(block, name, W2A8Linear(getattr(block, name)))
    return model


class Fp8Linear(nn.Module):
    """y = (q(x) @ T^T) * s_x * scale + bias with q = per-token e4m3 quantisation, through
    cuBLASLt FP8 on an e4m3 copy of the weights (one byte per weight): the comparison for
    W2A8Linear (`w2a8_gemm="cublaslt"`)."""

    def __init__(self, layer: TernaryLinear, fast_accum: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.fast_accum = fast_accum  # cuBLASLt fast accumulation: faster, less exact sums
        t = unpack_k16(layer.codes, layer.in_features, torch.float32)
        self.register_buffer("weight", t.to(torch.float8_e4m3fn))       # (N, K), exact
        self.register_buffer("scale", layer.scale.float().reshape(1, -1).contiguous())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float())

    def _apply(self, fn, recurse=True):
        return apply_keep_fp32(self, fn, recurse, buffers=("weight", "scale", "bias"))

    def _mm(self, x: Tensor) -> Tensor:
        shape = x.shape
        xq, s = quantize_rows_e4m3_ref(x.reshape(-1, shape[-1]))           # same quantization
        s_x = s.unsqueeze(-1)                                              # (M, 1)
        y = torch._scaled_mm(xq, self.weight.t(), scale_a=s_x, scale_b=self.scale,
                             bias=None, out_dtype=torch.bfloat16, use_fast_accum=self.fast_accum)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self._mm(x)

    def swiglu(self, x: Tensor) -> Tensor:
        a = self._mm(x)
        h = self.out_features // 2
        return F.silu(a[..., :h]) * a[..., h:]


def to_fp8_(model: FusedTerDiT, fast_accum: bool = False) -> FusedTerDiT:
    """Swap the token GEMMs of every block to cuBLASLt FP8 on e4m3 weight copies (in place)."""
    for block in model.layers:
        for name in ("qkv", "wo", "w13", "w2"):
            setattr(block, name, Fp8Linear(getattr(block, name), fast_accum))
    return model


class AcceleratedTerDiT:
    """Callable (x, t, y) -> out for a FusedTerDiT on CUDA.

    compile: torch.compile each block (they share one compiled graph).
    cuda_graphs: capture embedding + blocks + final layer once per batch size and replay it.
    w2a8: W1.58A8 token GEMMs (per-token e4m3 activations x the 2-bit codes, FP8 tensor cores).
    w2a8_gemm: "ternary" (our kernels on the codes) or "cublaslt" (e4m3 weight copy, comparison).
    fp8_fast_accum: cuBLASLt's fast accumulation ("cublaslt").
    """

    def __init__(self, model: FusedTerDiT, compile: bool = True, cuda_graphs: bool = True,
                 fp8_fast_accum: bool = False,
                 compile_backend: str = "inductor", w2a8: bool = False,
                 w2a8_gemm: str = "ternary") -> None:
        if w2a8_gemm not in W2A8_GEMMS:
            raise ValueError(f"w2a8_gemm={w2a8_gemm!r} is not one of {W2A8_GEMMS}")
        self.model = model.eval()
        self.device = next(model.parameters()).device
        if self.device.type == "cuda":
            from . import cuda as kernels
            kernels.load()
        elif cuda_graphs:
            raise ValueError(f"CUDA graphs need the model on a CUDA device (it is on "
                             f"{self.device}); pass cuda_graphs=False")
        if w2a8 and self.device.type == "cuda" and torch.cuda.get_device_capability(
                self.device) < (8, 9):
            warnings.warn(f"W1.58A8 needs FP8 tensor cores (sm_89+); "
                          f"{torch.cuda.get_device_name(self.device)} runs the model weight-only",
                          RuntimeWarning, stacklevel=2)
            w2a8 = False
        if w2a8 and w2a8_gemm == "ternary":
            to_w2a8_(self.model)
        elif w2a8:
            to_fp8_(self.model, fp8_fast_accum)
        self.model.to(self.device)
        self.w2a8 = w2a8
        self.w2a8_gemm = w2a8_gemm
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[int, tuple] = {}
        self._forward = self._eager_forward
        if compile:
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            self._block = torch.compile(_block_forward, fullgraph=True, dynamic=False,
                                        backend=compile_backend)
        else:
            self._block = _block_forward

    @torch.no_grad()
    def _eager_forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        m = self.model
        h, c = m.embed(x, t, y)
        mod = m.modulation(c)
        for i, layer in enumerate(m.layers):
            h = self._block(layer, h, mod[:, i], m.rope_cos, m.rope_sin)
        return m.unpatchify(m.final_layer(h, c))

    @torch.no_grad()
    def __call__(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        if not self.cuda_graphs:
            return self._eager_forward(x, t, y)
        n = x.shape[0]
        if n not in self._graphs:
            self._graphs[n] = self._capture(x, t, y)
        graph, (sx, st, sy), out = self._graphs[n]
        sx.copy_(x)
        st.copy_(t)
        sy.copy_(y)
        graph.replay()
        return out

    def _capture(self, x: Tensor, t: Tensor, y: Tensor):
        static = (x.clone(), t.clone(), y.clone())
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # compile + autotune + allocator warm-up outside the capture
                self._eager_forward(*static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._eager_forward(*static)
        return graph, static, out


def _block_forward(layer, h: Tensor, mod: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return layer(h, mod, cos, sin)


def accelerate(model: FusedTerDiT, **kwargs) -> AcceleratedTerDiT:
    return AcceleratedTerDiT(model, **kwargs)


def output_error(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max |b| (the project's error measure)."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


__all__ = ["AcceleratedTerDiT", "Fp8Linear", "W2A8Linear", "accelerate", "to_fp8_", "to_w2a8_",
           "output_error"]
