"""Shared pieces of the GPU kernel tests (test_kernels_gpu.py, test_kernels_w2a8_gpu.py).

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


import pytest
import torch
import torch.nn.functional as F

from terdit.kernels import cuda as kernels
from terdit.formats import pack_k16
from terdit.ternary import ternary_linear_ref
from tests.kernel_paths import expected_family

DRY_RUN = os.environ.get("TERDIT_KERNEL_TEST_DRY_RUN") == "1"
DEVICE = "cpu" if DRY_RUN else "cuda"

GPU_MARKS = [
    pytest.mark.gpu,
    pytest.mark.skipif(not DRY_RUN and not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (the kernels are built for sm_80, sm_89 and sm_90a)"),
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


ODD_NK = [(16, 16), (48, 48), (80, 80), (16, 272), (208, 80), (144, 1040), (96, 4112),
          (80, 576), (48, 2112)]  # the last two: K % 64 == 0 (16-byte weight loads, the TMA kernel)
ODD_M = [1, 3, 5, 8, 9, 17, 33, 65, 130]
SWIGLU_CASES = [(32, 16, ODD_M), (96, 80, ODD_M), (64, 1040, ODD_M),
                (2 * 4096, 1536, [2, 16, 33, 512]), (2 * 8192, 3072, [2, 16, 512, 2048])]
LAYERS = {"600M": model_layers(1536, 4096, 16), "4.2B": model_layers(3072, 8192, 32)}
LAYER_CASES = [(model, *layer) for model, layers in LAYERS.items() for layer in layers]


@pytest.fixture(scope="module")
def loaded_kernels():
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
    check_family(path, x, out, w, e4m3=False)
    return out


def check_family(path, x, out, w, *, e4m3):
    """The family that ran the last product (terdit::lastKernelPath) is the one the launcher's
    rules give for it (tests/kernel_paths.py): a forced path that fell back silently fails."""
    m = out.numel() // out.shape[-1] if out.shape[-1] else 0
    if DRY_RUN or m == 0:
        return
    props = torch.cuda.get_device_properties(out.device)
    expected = expected_family(
        path, m=m, n=w.shape[0], k=x.shape[-1], dtype=out.dtype if e4m3 else x.dtype,
        e4m3=e4m3, aligned_xy=x.data_ptr() % 16 == 0 and out.data_ptr() % 16 == 0,
        aligned_w=w.data_ptr() % 16 == 0, sms=props.multi_processor_count,
        cc=(props.major, props.minor))
    ran = kernels.last_kernel_path()
    assert ran == expected, (f"path={path}{'@e4m3' if e4m3 else ''} M={m} N={w.shape[0]} "
                             f"K={x.shape[-1]}: the {ran} kernel ran, the rules give {expected}")


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


def offset_view(shape, dtype, elems):
    """A contiguous tensor whose data pointer is `elems` elements past an aligned allocation."""
    numel = math.prod(shape)
    return torch.empty(numel + elems, dtype=dtype, device=DEVICE)[elems:].view(shape)
