"""The reference ternary matmul, the registered ops and the ternary layers.

`ternary_linear_ref` is the oracle every fast path is tested against; `terdit::ternary_matmul` is
the registered op that the model, torch.compile and the ONNX exporter all see. The packed
formats are terdit.formats (docs/design.md section 3).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from terdit_common.op import k16_words

from .formats import ZERO_WORD, absmean, pack_k16, ternarize, ternarize_ste, unpack_k16

# ---- the reference matmul and the registered op --------------------------------------------

def ternary_linear_ref(x: Tensor, w: Tensor, scale: Tensor, bias: Optional[Tensor] = None
                       ) -> Tensor:
    """Y = X @ (scale * T)^T + bias, computed in fp32 and returned in X's dtype."""
    k, n = x.shape[-1], w.shape[0]
    xf = x.float()
    rows = max(1, (1 << 24) // max(k, 1))  # unpack at most ~16M weights at a time
    if n <= rows:
        y = (xf @ unpack_k16(w, k, torch.float32).t()) * scale.float()
    else:
        y = torch.cat([(xf @ unpack_k16(w[i:i + rows], k, torch.float32).t())
                       * scale[i:i + rows].float() for i in range(0, n, rows)], dim=-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def check_op_args(x: Tensor, w: Tensor, scale: Tensor, bias: Optional[Tensor]) -> None:
    k = x.shape[-1]
    if w.dtype != torch.int32 or w.dim() != 2 or w.shape[1] != k16_words(k):
        raise ValueError(f"ternary_matmul: W must be int32 [N, {k16_words(k)}] for K={k}, got "
                         f"{w.dtype} {tuple(w.shape)}")
    n = w.shape[0]
    if scale.shape != (n,):
        raise ValueError(f"ternary_matmul: scale must have shape ({n},), got {tuple(scale.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"ternary_matmul: bias must have shape ({n},), got {tuple(bias.shape)}")


@torch.library.custom_op("terdit::ternary_matmul", mutates_args=())
def ternary_matmul(x: Tensor, w: Tensor, scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """terdit::ternary_matmul: the reference implementation; `terdit.kernels.cuda.load()` registers
    the CUDA kernels for CUDA tensors."""
    check_op_args(x, w, scale, bias)
    return ternary_linear_ref(x, w, scale, bias)


@ternary_matmul.register_fake
def _(x, w, scale, bias=None):
    return x.new_empty(*x.shape[:-1], w.shape[0])


def _mm_setup_context(ctx, inputs, output):
    x, w, scale, bias = inputs
    ctx.save_for_backward(w, scale)
    ctx.k, ctx.x_dtype = x.shape[-1], x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _mm_backward(ctx, grad):
    """Gradients for X and bias (packed weights are frozen): dX = dY @ (scale * T)."""
    w, scale = ctx.saved_tensors
    gx = gb = None
    if ctx.needs_input_grad[0]:
        eff = unpack_k16(w, ctx.k, torch.float32) * scale.float()[:, None]
        gx = (grad.float() @ eff).to(ctx.x_dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
        gb = grad.float().reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return gx, None, None, gb


ternary_matmul.register_autograd(_mm_backward, setup_context=_mm_setup_context)


def swiglu_ref(x: Tensor, w: Tensor, scale: Tensor) -> Tensor:
    """silu(A[..., :H]) * A[..., H:] for A = X @ (scale * T)^T over a concatenated w1|w3."""
    a = ternary_linear_ref(x, w, scale).float()
    h = a.shape[-1] // 2
    return (F.silu(a[..., :h]) * a[..., h:]).to(x.dtype)


@torch.library.custom_op("terdit::ternary_matmul_swiglu", mutates_args=())
def ternary_matmul_swiglu(x: Tensor, w: Tensor, scale: Tensor) -> Tensor:
    """SwiGLU over a fused w1|w3 TernaryMatMul (the kernels fuse the gate in the epilogue)."""
    check_op_args(x, w, scale, None)
    if w.shape[0] % 2:
        raise ValueError(f"ternary_matmul_swiglu: N={w.shape[0]} must be even (w1|w3)")
    return swiglu_ref(x, w, scale)


@ternary_matmul_swiglu.register_fake
def _(x, w, scale):
    return x.new_empty(*x.shape[:-1], w.shape[0] // 2)


# ---- the layer -------------------------------------------------------------------------------

def apply_keep_fp32(module: nn.Module, fn, recurse: bool, buffers=(), params=()) -> nn.Module:
    """nn.Module._apply that moves the named buffers / parameters to fn's device but keeps
    their dtype (fp32 tables and scales must survive model.to(bfloat16))."""
    kept = {name: module._buffers.pop(name) for name in buffers if name in module._buffers}
    kept_p = {name: module._parameters.pop(name) for name in params
              if module._parameters.get(name) is not None}
    try:
        nn.Module._apply(module, fn, recurse)
    finally:
        ref = next((t for t in list(kept.values()) + list(kept_p.values()) if t is not None), None)
        device = fn(torch.empty(0, device=ref.device)).device if ref is not None else None
        for name, t in kept.items():
            module._buffers[name] = None if t is None else t.to(device)
        for name, p in kept_p.items():
            module._parameters[name] = nn.Parameter(p.data.to(device), requires_grad=p.requires_grad)
    return module


class TernaryLinear(nn.Module):
    """The trainable (latent) ternary linear layer of QAT: an fp `weight` [N, K] and one
    learnable scalar `alphas` (shape (1,), the official name). The forward multiplies by
    alphas * ternarize(weight) with a straight-through gradient; `to_packed()` gives the
    inference layer."""

    packed = False

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device,
                                               dtype=dtype))
        self.alphas = nn.Parameter(torch.ones(1, device=device, dtype=dtype))
        self.bias = (nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
                     if bias else None)
        if self.weight.device.type != "meta":
            nn.init.xavier_uniform_(self.weight)
            self.reset_alpha()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")

    @torch.no_grad()
    def reset_alpha(self) -> None:
        """alpha = gamma (the absmean of the latent weight), or 1/sqrt(K) for an all-zero weight
        (a zero alpha would stop the weight's straight-through gradient)."""
        gamma = absmean(self.weight.float())
        fallback = torch.full_like(gamma, 1.0 / math.sqrt(self.in_features))
        self.alphas.copy_(torch.where(gamma > 0, gamma, fallback).expand_as(self.alphas))

    def forward(self, x: Tensor) -> Tensor:
        w = self.alphas * ternarize_ste(self.weight)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def ternary_values(self) -> Tensor:
        """The ternary matrix T [N, K] as int8."""
        return ternarize(self.weight).to(torch.int8)

    @torch.no_grad()
    def effective_weight(self) -> Tensor:
        """alpha * T as fp32 [N, K] (what the layer multiplies by)."""
        return self.alphas.float() * ternarize(self.weight).float()

    @torch.no_grad()
    def to_packed(self) -> "PackedTernaryLinear":
        """The inference layer: k16 codes of ternarize(weight), the scalar alpha as a per-channel
        scale, the bias in fp32."""
        return PackedTernaryLinear.from_tensors(
            pack_k16(ternarize(self.weight)), self.alphas.float().expand(self.out_features),
            None if self.bias is None else self.bias.float(), self.in_features)


class PackedTernaryLinear(nn.Module):
    """The inference ternary linear layer: `codes` k16 int32 [N, ceil(K/16)], `scale` fp32 [N]
    and an optional fp32 `bias` (scale and bias stay fp32 whatever dtype the model is cast to:
    the kernel contract). The forward is the registered op `terdit::ternary_matmul`."""

    packed = True
    # activation mode of the product (terdit.kernels.int8.set_act_quant_): "none" runs
    # terdit::ternary_matmul, "int8" terdit::ternary_matmul_int8; not saved with the weights
    act_quant = "none"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 device=None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("codes", torch.full((out_features, k16_words(in_features)),
                                                 ZERO_WORD, dtype=torch.int32, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32,
                                                 device=device))
        self.bias = (nn.Parameter(torch.zeros(out_features, device=device, dtype=torch.float32))
                     if bias else None)

    @classmethod
    def from_tensors(cls, codes: Tensor, scale: Tensor, bias: Optional[Tensor],
                     in_features: int) -> "PackedTernaryLinear":
        """A layer holding the given k16 codes, scale [N] and optional bias (no copies of
        codes that are already contiguous)."""
        layer = cls(in_features, codes.shape[0], bias is not None, device="meta")
        layer.codes = codes.contiguous()
        layer.scale = scale.float().contiguous()
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=bias.requires_grad)
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")

    def _apply(self, fn, recurse=True):
        return apply_keep_fp32(self, fn, recurse, buffers=("scale",), params=("bias",))

    def forward(self, x: Tensor) -> Tensor:
        if self.act_quant == "int8":
            return torch.ops.terdit.ternary_matmul_int8(x, self.codes, self.scale, self.bias)
        return ternary_matmul(x, self.codes, self.scale, self.bias)

    def swiglu(self, x: Tensor) -> Tensor:
        """silu(A[..., :H]) * A[..., H:] of this layer's output A (a fused w1|w3 layer)."""
        if self.bias is not None:
            raise ValueError("swiglu() needs a layer without bias (a fused w1|w3)")
        if self.act_quant == "int8":
            return torch.ops.terdit.ternary_matmul_int8_swiglu(x, self.codes, self.scale)
        return ternary_matmul_swiglu(x, self.codes, self.scale)

    @torch.no_grad()
    def ternary_values(self) -> Tensor:
        """The ternary matrix T [N, K] as int8."""
        return unpack_k16(self.codes, self.in_features)

    @torch.no_grad()
    def effective_weight(self) -> Tensor:
        """scale * T as fp32 [N, K] (what the layer multiplies by)."""
        return unpack_k16(self.codes, self.in_features, torch.float32) * self.scale[:, None]


TERNARY_LAYERS = (TernaryLinear, PackedTernaryLinear)


def ternary_linear(in_features: int, out_features: int, bias: bool, packed: bool) -> nn.Module:
    """The latent (training) or packed (inference) layer."""
    cls = PackedTernaryLinear if packed else TernaryLinear
    return cls(in_features, out_features, bias)


def pack_model_(model: nn.Module) -> nn.Module:
    """Replace every latent TernaryLinear in `model` by its packed form, in place."""
    for name, child in list(model.named_children()):
        if isinstance(child, TernaryLinear):
            setattr(model, name, child.to_packed())
        elif not isinstance(child, PackedTernaryLinear):
            pack_model_(child)
    return model
