"""W1.58A8 (weights 1.58 bits, activations 8 bits): the definition of the mode and its ops.

`quantize_rows_e4m3_ref(x)` quantizes each token to float8 e4m3 with the scale amax / 448;
`ternary_matmul_e4m3(xq, x_scale, w, scale, bias, out_dtype)` multiplies those bytes by the 2-bit
codes (exact in e4m3) with fp32 sums and applies x_scale[m] * scale[n] + bias[n]. The CPU
implementations here are the definition that the CUDA kernels (terdit.kernels.cuda registers
them for CUDA tensors), the ONNX emulation (exporter.contract) and the accuracy benchmark are
checked against. Pure torch: importing this module makes no CUDA call.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import ternary as _ternary
from ..formats import FLOAT_DTYPES, unpack_k16

E4M3_MAX = 448.0
E4M3_MIN_AMAX = 1e-12


def quantize_rows_e4m3_ref(x: Tensor) -> tuple[Tensor, Tensor]:
    """The definition of the per-token quantization: s = max(amax |x|, 1e-12) / 448 per row,
    xq = e4m3(x / s) (round to nearest even; |x / s| <= 448 by construction). Returns (xq as
    float8_e4m3fn [..., K], s as float32 [...]). A NaN in a row makes its s and xq NaN. Pure
    torch ops: inside torch.compile the quantization fuses into whatever produces x."""
    xf = x.float()
    s = xf.abs().amax(dim=-1, keepdim=True).clamp_min(E4M3_MIN_AMAX) / E4M3_MAX  # (..., 1)
    return (xf / s).to(torch.float8_e4m3fn), s.squeeze(-1)


def ternary_linear_e4m3_ref(xq: Tensor, x_scale: Tensor, w: Tensor, scale: Tensor,
                            bias: Optional[Tensor] = None,
                            out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """The definition of the W1.58A8 product: (xq @ T^T) with exact products and fp32 sums, times
    x_scale[m] * scale[n], plus bias[n], in out_dtype."""
    k, n = xq.shape[-1], w.shape[0]
    xf = xq.float()
    rows = max(1, (1 << 24) // max(k, 1))  # unpack at most ~16M weights at a time
    acc = torch.cat([xf @ unpack_k16(w[i:i + rows], k, torch.float32).t()
                     for i in range(0, n, rows)], dim=-1)                # (..., N) fp32
    y = acc * x_scale.float().unsqueeze(-1) * scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def _e4m3_swiglu_ref(xq, x_scale, w, scale, out_dtype):
    a = ternary_linear_e4m3_ref(xq, x_scale, w, scale, None, torch.float32)
    h = a.shape[-1] // 2
    return (torch.nn.functional.silu(a[..., :h]) * a[..., h:]).to(out_dtype)


def check_e4m3_args(op: str, xq: Tensor, x_scale: Tensor, w: Tensor, scale: Tensor,
                     bias: Optional[Tensor], out_dtype: torch.dtype) -> None:
    if xq.dtype != torch.float8_e4m3fn:
        raise TypeError(f"{op}: xq has dtype {xq.dtype}; quantize X with quantize_rows_e4m3 "
                        f"(float8_e4m3fn)")
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: out_dtype={out_dtype} is not float32, float16 or bfloat16")
    if tuple(x_scale.shape) != tuple(xq.shape[:-1]):
        raise ValueError(f"{op}: x_scale must have shape {tuple(xq.shape[:-1])} (one scale per "
                         f"token), got {tuple(x_scale.shape)}")
    _ternary.check_op_args(xq, w, scale, bias)


@torch.library.custom_op("terdit::quantize_rows_e4m3", mutates_args=())
def quantize_rows_e4m3(x: Tensor) -> tuple[Tensor, Tensor]:
    """terdit::quantize_rows_e4m3: quantize_rows_e4m3_ref; `load()` registers the CUDA kernel
    (launchQuantizeRowsE4m3) for CUDA tensors."""
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"quantize_rows_e4m3: x has dtype {x.dtype}; float32, float16 or bfloat16")
    xq, s = quantize_rows_e4m3_ref(x)
    return xq, s


@quantize_rows_e4m3.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty(x.shape[:-1],
                                                                       dtype=torch.float32)


@torch.library.custom_op("terdit::ternary_matmul_e4m3", mutates_args=())
def ternary_matmul_e4m3(xq: Tensor, x_scale: Tensor, w: Tensor, scale: Tensor,
                        bias: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    """terdit::ternary_matmul_e4m3 (W1.58A8): ternary_linear_e4m3_ref; `load()` registers the CUDA
    kernels (FP8 tensor cores on sm_89+) for CUDA tensors."""
    check_e4m3_args("ternary_matmul_e4m3", xq, x_scale, w, scale, bias, out_dtype)
    return ternary_linear_e4m3_ref(xq, x_scale, w, scale, bias, out_dtype)


@ternary_matmul_e4m3.register_fake
def _(xq, x_scale, w, scale, bias, out_dtype):
    return xq.new_empty(*xq.shape[:-1], w.shape[0], dtype=out_dtype)


@torch.library.custom_op("terdit::ternary_matmul_e4m3_swiglu", mutates_args=())
def ternary_matmul_e4m3_swiglu(xq: Tensor, x_scale: Tensor, w: Tensor, scale: Tensor,
                               out_dtype: torch.dtype) -> Tensor:
    """SwiGLU over a fused w1|w3 W1.58A8 product (the kernels fuse the gate in the epilogue)."""
    check_e4m3_args("ternary_matmul_e4m3_swiglu", xq, x_scale, w, scale, None, out_dtype)
    if w.shape[0] % 2:
        raise ValueError(f"ternary_matmul_e4m3_swiglu: N={w.shape[0]} must be even (w1|w3)")
    return _e4m3_swiglu_ref(xq, x_scale, w, scale, out_dtype)


@ternary_matmul_e4m3_swiglu.register_fake
def _(xq, x_scale, w, scale, out_dtype):
    return xq.new_empty(*xq.shape[:-1], w.shape[0] // 2, dtype=out_dtype)
