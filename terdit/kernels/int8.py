"""W1.58A8 with int8 activations (BitNet b1.58's A8): the definition of the mode and its ops.

`quantize_rows_int8_ref(x)` quantizes each token to int8 with the scale s = amax / 127;
`ternary_linear_int8_ref(xq, s, w, scale, bias, out_dtype)` multiplies those integers by the
ternary weights (integer sums, exact in fp32 below 2^24) and applies, as separate fp32 steps in
this order, (acc * s[m]) * scale[n] + bias[n]. These CPU implementations are the definition that
the native CPU kernels (registered for CPU tensors on the ops below), the ONNX function
(exporter.contract, act_quant="int8") and the reference OpRun reproduce bit for bit.
Pure torch: importing this module makes no CUDA call.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ternary as _ternary
from ..formats import FLOAT_DTYPES, unpack_k16
from ..ternary import PackedTernaryLinear

INT8_MAX = 127.0
INT8_MIN_AMAX = 1e-12
ACT_QUANT_MODES = ("none", "int8")       # what set_act_quant_ accepts


def quantize_rows_int8_ref(x: Tensor) -> tuple[Tensor, Tensor]:
    """The definition of the per-token quantization: s = max(amax_k |x|, 1e-12) / 127 per row
    in fp32, xq = clamp(round_half_even(x / s), -127, 127) with a true fp32 division. Returns
    (xq as int8 [..., K], s as float32 [...])."""
    xf = x.float()
    s = xf.abs().amax(dim=-1, keepdim=True).clamp_min(INT8_MIN_AMAX) / INT8_MAX  # (..., 1)
    xq = torch.round(xf / s).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)           # (..., K)
    return xq, s.squeeze(-1)


def ternary_linear_int8_ref(xq: Tensor, s: Tensor, w: Tensor, scale: Tensor,
                            bias: Optional[Tensor] = None,
                            out_dtype: torch.dtype = torch.float32) -> Tensor:
    """The definition of the int8 product: acc = xq @ T^T (integers, exact in fp32), then
    y = (acc * s[m]) * scale[n], then y + bias[n], each a separate fp32 op, in out_dtype."""
    k, n = xq.shape[-1], w.shape[0]
    xf = xq.float()
    rows = max(1, (1 << 24) // max(k, 1))  # unpack at most ~16M weights at a time
    acc = torch.cat([xf @ unpack_k16(w[i:i + rows], k, torch.float32).t()
                     for i in range(0, n, rows)], dim=-1)                # (..., N) fp32
    y = (acc * s.float().unsqueeze(-1)) * scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def check_x(op: str, x: Tensor) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: x has dtype {x.dtype}; float32, float16 or bfloat16")


@torch.library.custom_op("terdit::ternary_matmul_int8", mutates_args=())
def ternary_matmul_int8(x: Tensor, w: Tensor, scale: Tensor,
                        bias: Optional[Tensor] = None) -> Tensor:
    """terdit::ternary_matmul_int8: quantize_rows_int8_ref then ternary_linear_int8_ref, in
    x's dtype (the reference; native CPU kernels register themselves for CPU tensors)."""
    check_x("ternary_matmul_int8", x)
    _ternary.check_op_args(x, w, scale, bias)
    xq, s = quantize_rows_int8_ref(x)
    return ternary_linear_int8_ref(xq, s, w, scale, bias, x.dtype)


@ternary_matmul_int8.register_fake
def _(x, w, scale, bias=None):
    return x.new_empty(*x.shape[:-1], w.shape[0])


@torch.library.custom_op("terdit::ternary_matmul_int8_swiglu", mutates_args=())
def ternary_matmul_int8_swiglu(x: Tensor, w: Tensor, scale: Tensor) -> Tensor:
    """silu(A[..., :H]) * A[..., H:] in fp32 over the fp32 int8 product A of a fused w1|w3."""
    check_x("ternary_matmul_int8_swiglu", x)
    _ternary.check_op_args(x, w, scale, None)
    if w.shape[0] % 2:
        raise ValueError(f"ternary_matmul_int8_swiglu: N={w.shape[0]} must be even (w1|w3)")
    xq, s = quantize_rows_int8_ref(x)
    a = ternary_linear_int8_ref(xq, s, w, scale, None, torch.float32)    # (..., 2H) fp32
    h = a.shape[-1] // 2
    return (F.silu(a[..., :h]) * a[..., h:]).to(x.dtype)


@ternary_matmul_int8_swiglu.register_fake
def _(x, w, scale):
    return x.new_empty(*x.shape[:-1], w.shape[0] // 2)


def set_act_quant_(model: nn.Module, mode: str) -> nn.Module:
    """Set the activation mode of every PackedTernaryLinear in `model` (fused ones included), in
    place: "none" (weight-only) or "int8" (terdit::ternary_matmul_int8). The mode is not saved
    with the weights, and a FusedTerDiT built afterwards starts at "none": set it on the module
    that runs."""
    if mode not in ACT_QUANT_MODES:
        hint = ("; fp8 (W1.58A8 e4m3) runs through "
                "terdit.kernels.accel.AcceleratedTerDiT(w2a8=True)" if mode == "fp8" else "")
        raise ValueError(f"act_quant={mode!r} is not one of {', '.join(ACT_QUANT_MODES)}{hint}")
    for m in model.modules():
        if isinstance(m, PackedTernaryLinear):
            m.act_quant = mode
    return model
