"""The terdit CPU kernels (plugins/cpu) as the CPU implementation of the ternary ops.

`load()` finds or builds `libterdit_cpu.so` (terdit_common.cpukernels) and registers its kernels
for CPU tensors on `terdit::ternary_matmul` and `terdit::ternary_matmul_swiglu` (exact: fp32 sums)
and on `terdit::ternary_matmul_int8` / `terdit::ternary_matmul_int8_swiglu` (terdit.kernels.int8's
definition, bit for bit). Other devices keep their implementations; the ops' reference bodies stay
the definition the kernels are tested against. `torch.compile` sees the same registered ops.

The kernels run on the library's own thread pool with `torch.get_num_threads()` threads; ctypes
releases the GIL during a call.
"""
from __future__ import annotations

import math
import sys
import threading
from typing import Optional

import torch
from torch import Tensor

from terdit_common import cpukernels
from terdit_common.cpukernels import ACT_QUANT_CODES, CpuKernelError

from .. import ternary as _ternary
from . import int8 as _int8

__all__ = ["CpuKernelError", "available", "describe", "force_isa", "load", "matmul"]

_lock = threading.Lock()
_registered = False
force_isa = cpukernels.force_isa


def matmul(x: Tensor, w: Tensor, scale: Tensor, bias: Optional[Tensor] = None,
           act_quant: str = "none") -> Tensor:
    """Y = X @ (scale * T)^T + bias on the CPU kernels in `act_quant` mode ("none" | "int8" |
    "fp8"), computed in fp32 and returned in X's dtype. Needs `load()`."""
    lib = cpukernels.load()
    _ternary.check_op_args(x, w, scale, bias)
    if act_quant not in ACT_QUANT_CODES:
        raise ValueError(f"act_quant={act_quant!r} is not one of {', '.join(ACT_QUANT_CODES)}")
    for name, t in (("x", x), ("w", w), ("scale", scale), ("bias", bias)):
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"terdit CPU kernels: {name} is on {t.device}; move it to the CPU")
    k, n = x.shape[-1], w.shape[0]
    xf = x.detach().to(torch.float32).contiguous()
    out = torch.empty(*x.shape[:-1], n, dtype=torch.float32)
    m = math.prod(x.shape[:-1])
    if m and n:
        if k == 0:
            out.zero_()
            if bias is not None:
                out += bias.float()
        else:
            w = w.contiguous()
            scale = scale.detach().to(torch.float32).contiguous()
            bias = None if bias is None else bias.detach().to(torch.float32).contiguous()
            rc = lib.terditCpuTernaryMatmul(
                xf.data_ptr(), w.data_ptr(), scale.data_ptr(),
                None if bias is None else bias.data_ptr(), out.data_ptr(), m, n, k,
                ACT_QUANT_CODES[act_quant], torch.get_num_threads(), None, None)
            if rc != 0:
                raise RuntimeError(f"terdit CPU kernels: {cpukernels.status_text(rc)} (x {tuple(x.shape)}, "
                                   f"w {tuple(w.shape)}, act_quant={act_quant})")
    return out.to(x.dtype)


def _swiglu(op: str, x: Tensor, w: Tensor, scale: Tensor, act_quant: str) -> Tensor:
    _ternary.check_op_args(x, w, scale, None)
    if w.shape[0] % 2:
        raise ValueError(f"{op}: N={w.shape[0]} must be even (w1|w3)")
    a = matmul(x.float(), w, scale, None, act_quant)
    h = a.shape[-1] // 2
    return (torch.nn.functional.silu(a[..., :h]) * a[..., h:]).to(x.dtype)


def _ternary_matmul_cpu(x, w, scale, bias=None):
    return matmul(x, w, scale, bias, "none")


def _ternary_matmul_swiglu_cpu(x, w, scale):
    return _swiglu("ternary_matmul_swiglu", x, w, scale, "none")


# the int8 ops check what their reference implementations check, with the same messages
def _ternary_matmul_int8_cpu(x, w, scale, bias=None):
    _int8.check_x("ternary_matmul_int8", x)
    return matmul(x, w, scale, bias, "int8")


def _ternary_matmul_int8_swiglu_cpu(x, w, scale):
    _int8.check_x("ternary_matmul_int8_swiglu", x)
    return _swiglu("ternary_matmul_int8_swiglu", x, w, scale, "int8")


def load(build: bool = True) -> str:
    """Loads (building on first use) the CPU kernels and registers them for CPU tensors
    (idempotent). Returns `describe()`; raises CpuKernelError when they are unavailable."""
    global _registered
    cpukernels.load(build=build)
    with _lock:
        if not _registered:
            ops = {"terdit::ternary_matmul": _ternary_matmul_cpu,
                   "terdit::ternary_matmul_swiglu": _ternary_matmul_swiglu_cpu,
                   "terdit::ternary_matmul_int8": _ternary_matmul_int8_cpu,
                   "terdit::ternary_matmul_int8_swiglu": _ternary_matmul_int8_swiglu_cpu}
            for name, fn in ops.items():
                torch.library.register_kernel(name, "cpu", fn)
            _registered = True
    return describe()


def available() -> bool:
    """True when the kernels load (building them if needed)."""
    try:
        load()
    except CpuKernelError:
        return False
    return True


def describe() -> str:
    return cpukernels.describe()


_said = False


def load_or_say(stream=sys.stderr) -> bool:
    """`load()`, saying once per process which path the ternary ops run on the CPU:
    `TernaryMatMul: terdit CPU kernels (avx2)` or the reference implementation and why."""
    global _said
    try:
        text, ok = load(), True
    except CpuKernelError as err:
        text, ok = f"PyTorch reference ops ({err})", False
    if not _said:
        print(f"TernaryMatMul: {text}", file=stream, flush=True)
        _said = True
    return ok
