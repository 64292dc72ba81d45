"""Ternary weights and their packed formats (docs/design.md section 3).

- The quantization of training: T = clamp(round(W / (mean |W| + eps)), -1, 1), round half to
  even, with a straight-through gradient.
- k16 (this project's canonical layout): int32 [N, ceil(K/16)]; weight (n, k) sits in word k // 16
  at bits 2*(k % 16)..+1 as code = w + 1; K is padded with code 1 (weight 0). Little-endian it is
  byte-identical to 4 codes per uint8 along K.
- HQQ (official release): uint8 [N/4, K]; with h = N/4, byte [i, j] holds rows i (bits 7-6),
  h+i (5-4), 2h+i (3-2), 3h+i (1-0). Code 3 is invalid in both.
"""
from __future__ import annotations

import sys

import torch
from torch import Tensor

from terdit_common.op import DTYPES, k16_words

EPS = 1e-6
# The activation / weight float dtypes by their command-line names (terdit_common.op.DTYPES),
# in the kernels' type-code order.
TORCH_DTYPES = dict(zip(DTYPES, (torch.float32, torch.float16, torch.bfloat16)))
FLOAT_DTYPES = tuple(TORCH_DTYPES.values())
ZERO_WORD = 0x55555555  # sixteen codes of 1: an all-zero k16 word

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("terdit's packed formats assume a little-endian host")


# ---- quantization ------------------------------------------------------------------------

def absmean(weight: Tensor) -> Tensor:
    """Per-tensor threshold gamma = mean(|W|) (TerDiT, as BitNet b1.58)."""
    return weight.abs().mean()


def ternarize(weight: Tensor, eps: float = EPS) -> Tensor:
    """T = clamp(round(W / (gamma + eps)), -1, 1) with round-half-even, in W's own dtype
    (exactly the official training forward). Returns a tensor of W's dtype with values -1/0/+1."""
    gamma = absmean(weight)
    return torch.clamp(torch.round(weight / (gamma + eps)), -1, 1)


class _TernarizeSTE(torch.autograd.Function):
    """Ternarize in the forward; identity gradient (straight-through) in the backward."""

    @staticmethod
    def forward(ctx, weight: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        return ternarize(weight, eps)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad, None


def ternarize_ste(weight: Tensor, eps: float = EPS) -> Tensor:
    return _TernarizeSTE.apply(weight, eps)


# ---- k16 packing -------------------------------------------------------------------------

def _check_ternary_values(t: Tensor, what: str) -> None:
    if t.dtype.is_floating_point:
        bad = ~((t == -1) | (t == 0) | (t == 1))
    else:
        bad = (t < -1) | (t > 1)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{what}: value {t[idx].item()} at index {idx} is not ternary "
                         f"(-1, 0 or +1)")


def codes_to_k16(codes: Tensor) -> Tensor:
    """uint8 codes [N, K] in {0, 1, 2} -> k16 int32 [N, ceil(K/16)]."""
    n, k = codes.shape
    kp = k16_words(k) * 16
    c = codes.to(torch.uint8)
    if kp != k:
        c = torch.cat([c, torch.ones(n, kp - k, dtype=torch.uint8, device=c.device)], dim=1)
    c = c.reshape(n, kp // 4, 4)
    packed = c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)
    return packed.contiguous().view(torch.int32)


def k16_to_codes(words: Tensor, k: int) -> Tensor:
    """k16 int32 [N, W] -> uint8 codes [N, k] (no validation; see `check_k16`)."""
    n, w = words.shape
    if w != k16_words(k):
        raise ValueError(f"k16 tensor has {w} words per row but K={k} needs {k16_words(k)}")
    b = words.contiguous().view(torch.uint8)  # [N, 4W], 4 codes per byte, low bits first
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=words.device)
    codes = (b.unsqueeze(-1) >> shifts) & 3
    return codes.reshape(n, w * 16)[:, :k]


def pack_k16(t: Tensor) -> Tensor:
    """Ternary values [N, K] (any real or integer dtype) -> k16 int32 [N, ceil(K/16)]."""
    if t.dim() != 2:
        raise ValueError(f"pack_k16 expects a 2-D [N, K] tensor, got shape {tuple(t.shape)}")
    _check_ternary_values(t, "pack_k16")
    return codes_to_k16((t.to(torch.int8) + 1).to(torch.uint8))


def unpack_k16(words: Tensor, k: int, dtype: torch.dtype = torch.int8) -> Tensor:
    """k16 int32 [N, ceil(k/16)] -> ternary values [N, k] in `dtype`."""
    return (k16_to_codes(words, k).to(torch.int8) - 1).to(dtype)


def check_k16(words: Tensor, k: int, what: str = "k16 weight") -> None:
    """Reject tensors that are not valid k16: wrong dtype/shape, code 3, non-zero padding."""
    if words.dtype != torch.int32 or words.dim() != 2:
        raise ValueError(f"{what}: expected int32 [N, {k16_words(k)}], got {words.dtype} "
                         f"{tuple(words.shape)}")
    if words.shape[1] != k16_words(k):
        raise ValueError(f"{what}: {words.shape[1]} words per row, K={k} needs "
                         f"{k16_words(k)}")
    codes = k16_to_codes(words, k16_words(k) * 16)
    bad = codes == 3
    if bool(bad.any()):
        n, kk = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{what}: code 3 (invalid) at row {n}, column {kk}; packed weights "
                         f"only use codes 0, 1, 2")
    if codes.shape[1] > k and bool((codes[:, k:] != 1).any()):
        raise ValueError(f"{what}: padding columns beyond K={k} must hold code 1 (weight 0)")


# ---- official HQQ layout -------------------------------------------------------------------

def hqq_to_codes(packed: Tensor) -> Tensor:
    """Official uint8 [N/4, K] -> uint8 codes [N, K]."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"HQQ weight: expected uint8 [N/4, K], got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    return torch.cat([(packed >> 6) & 3, (packed >> 4) & 3, (packed >> 2) & 3, packed & 3], 0)


def codes_to_hqq(codes: Tensor) -> Tensor:
    n, k = codes.shape
    if n % 4:
        raise ValueError(f"the official 2-bit layout needs out_features % 4 == 0, got {n}")
    c = codes.to(torch.uint8).reshape(4, n // 4, k)
    return (c[0] << 6) | (c[1] << 4) | (c[2] << 2) | c[3]


def hqq_to_k16(packed: Tensor, what: str = "HQQ weight") -> Tensor:
    codes = hqq_to_codes(packed)
    bad = codes == 3
    if bool(bad.any()):
        n, k = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{what}: code 3 (invalid) for output row {n}, input column {k}; "
                         f"the official 2-bit layout only uses codes 0, 1, 2")
    return codes_to_k16(codes)


def k16_to_hqq(words: Tensor, k: int) -> Tensor:
    return codes_to_hqq(k16_to_codes(words, k))
