"""The fast CUDA path of a fused ternary DiT: our TernaryMatMul kernels for every ternary GEMM,
torch.compile'd blocks (RMSNorm + modulate, RoPE, gated residuals fused by inductor; attention
through SDPA's flash kernel), and the whole forward captured in one CUDA graph per batch size.

Optional FP8-activation mode (W1.58A8): the token GEMMs (qkv, wo, w1|w3, w2) quantize their input
per token to float8 e4m3 and run cuBLASLt FP8 (`torch._scaled_mm`, row-wise scales) against the
ternary weights stored as e4m3 (exact: -1, 0, +1); the per-channel ternary scale and the token
scale are applied in the GEMM epilogue. This mode keeps one byte per weight on the GPU (the
2-bit codes stay the checkpoint format); the small-M adaLN GEMM stays on the ternary kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fused import FusedTerDiT
from .ternary import TernaryLinear, apply_keep_fp32, unpack_k16

E4M3_MAX = 448.0


class Fp8Linear(nn.Module):
    """y = (q(x) @ T^T) * s_x * scale + bias with q = per-token e4m3 quantisation."""

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
        x2 = x.reshape(-1, shape[-1])
        amax = x2.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12)
        s_x = amax / E4M3_MAX                                              # (M, 1)
        xq = (x2.float() / s_x).to(torch.float8_e4m3fn)
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
    """Swap the token GEMMs of every block to FP8 activations (in place)."""
    for block in model.layers:
        for name in ("qkv", "wo", "w13", "w2"):
            setattr(block, name, Fp8Linear(getattr(block, name), fast_accum))
    return model


class AcceleratedTerDiT:
    """Callable (x, t, y) -> out for a FusedTerDiT on CUDA.

    compile: torch.compile each block (they share one compiled graph).
    cuda_graphs: capture embedding + blocks + final layer once per batch size and replay it.
    fp8: FP8 activations on the token GEMMs; fp8_fast_accum: cuBLASLt's fast accumulation.
    """

    def __init__(self, model: FusedTerDiT, compile: bool = True, cuda_graphs: bool = True,
                 fp8: bool = False, fp8_fast_accum: bool = False,
                 compile_backend: str = "inductor") -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device
        if self.device.type == "cuda":
            from . import kernels
            kernels.load()
        elif cuda_graphs:
            raise ValueError(f"CUDA graphs need the model on a CUDA device (it is on "
                             f"{self.device}); pass cuda_graphs=False")
        if fp8:
            to_fp8_(self.model, fp8_fast_accum)
            self.model.to(self.device)
        self.fp8 = fp8
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


__all__ = ["AcceleratedTerDiT", "Fp8Linear", "accelerate", "to_fp8_", "output_error"]
