"""CUDA kernels for the TernaryMatMul ops and the W1.58A8 ops.

`load()` finds (or builds) `libterdit_kernels.so` (plugins/kernels), loads it with ctypes and
registers its CUDA implementations of `terdit::ternary_matmul`, `terdit::ternary_matmul_swiglu`
(defined in terdit.ternary), `terdit::ternary_matmul_e4m3`, `terdit::ternary_matmul_e4m3_swiglu`
and `terdit::quantize_rows_e4m3` (defined in terdit.kernels.w2a8); CPU tensors keep the reference
implementations. The library is plain C ABI + static cudart, so one build made with nvcc on a
machine without a GPU runs under any torch with a CUDA 13 driver (no torch C++ extension, no
version coupling).

Importing this module makes no CUDA call. Kernel choice: see plugins/kernels/README.md;
`force_path("skinny" | "tc" | "generic" | "wgmma" | "wgmma2")` pins one kernel family (tests,
benchmarks).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import Tensor

from .. import ternary as _ternary  # noqa: F401  (defines the ternary_matmul ops)
from ..formats import FLOAT_DTYPES
from . import w2a8 as _w2a8  # noqa: F401  (defines the W1.58A8 ops)
from .cuda_build import LIB_NAME, KernelLibraryError, build_library, candidate_paths
from .w2a8 import check_e4m3_args

C_SYMBOLS = ("terditTernaryMatmul", "terditTernaryMatmulEx", "terditCheck", "terditErrorString",
             "terditKernelsAbiVersion", "terditTernaryMatmulE4m3", "terditCheckE4m3",
             "terditQuantizeRowsE4m3", "terditLastKernelPath")
ABI_VERSION = 3

PATHS = {"auto": 0, "skinny": 1, "tc": 2, "generic": 3, "wgmma": 4, "wgmma2": 5}
FAMILIES = {code: name for name, code in PATHS.items()}       # 0 ("auto"): nothing ran yet
# The C ABI's dtype codes.
DTYPE_CODES = {dtype: code for code, dtype in enumerate(FLOAT_DTYPES)}

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_lib_path: Optional[Path] = None
_forced_path = 0


# ---- loading and registering ------------------------------------------------------------------

def _declare(lib: ctypes.CDLL) -> None:
    vp, i32, i64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
    lib.terditTernaryMatmulEx.argtypes = [vp, vp, vp, vp, vp, i64, i32, i32, i32, i32, i32, vp]
    lib.terditTernaryMatmulEx.restype = ctypes.c_int
    lib.terditCheck.argtypes = [vp, vp, vp, vp, vp, i64, i32, i32, i32, i32, i32]
    lib.terditCheck.restype = ctypes.c_char_p
    lib.terditErrorString.argtypes = [ctypes.c_int]
    lib.terditErrorString.restype = ctypes.c_char_p
    lib.terditKernelsAbiVersion.argtypes = []
    lib.terditKernelsAbiVersion.restype = ctypes.c_int
    e4m3 = [vp, vp, vp, vp, vp, vp, i64, i32, i32, i32, i32, i32]
    lib.terditTernaryMatmulE4m3.argtypes = [*e4m3, vp]
    lib.terditTernaryMatmulE4m3.restype = ctypes.c_int
    lib.terditCheckE4m3.argtypes = e4m3
    lib.terditCheckE4m3.restype = ctypes.c_char_p
    lib.terditQuantizeRowsE4m3.argtypes = [vp, i32, i64, i32, vp, vp, vp]
    lib.terditQuantizeRowsE4m3.restype = ctypes.c_int
    lib.terditLastKernelPath.argtypes = []
    lib.terditLastKernelPath.restype = ctypes.c_int


def open_library(path: Path) -> ctypes.CDLL:
    """dlopen + symbol/ABI check (no CUDA call)."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise KernelLibraryError(f"cannot load {path}: {e}") from e
    if not hasattr(lib, "terditKernelsAbiVersion"):
        raise KernelLibraryError(f"{path} is not a TernaryMatMul kernel library; rebuild it "
                                 f"from plugins/kernels")
    lib.terditKernelsAbiVersion.restype = ctypes.c_int
    if lib.terditKernelsAbiVersion() != ABI_VERSION:
        raise KernelLibraryError(f"{path} has C ABI version {lib.terditKernelsAbiVersion()}, "
                                 f"this module needs {ABI_VERSION}; rebuild it")
    missing = [s for s in C_SYMBOLS if not hasattr(lib, s)]
    if missing:
        raise KernelLibraryError(f"{path} lacks {missing}; rebuild it from plugins/kernels")
    _declare(lib)
    return lib


def load(lib_path: Optional[os.PathLike] = None, build: bool = True) -> ctypes.CDLL:
    """Loads the kernel library and registers the CUDA kernels of terdit::ternary_matmul and
    terdit::ternary_matmul_swiglu (idempotent). Looks at `lib_path`, then `candidate_paths()`;
    with `build=True` builds into the user cache when none exists."""
    global _lib, _lib_path
    with _lock:
        if _lib is not None:
            return _lib
        if lib_path is not None:
            path = Path(lib_path)
            if not path.exists():
                raise KernelLibraryError(f"{path} does not exist")
        else:
            path = next((p for p in candidate_paths() if p.exists()), None)
            if path is None:
                if not build:
                    raise KernelLibraryError(
                        f"{LIB_NAME} not found in {[str(p) for p in candidate_paths()]}; build it "
                        f"with `cmake -S plugins/kernels -B build/kernels && cmake --build "
                        f"build/kernels`, or call load(build=True) (needs nvcc)")
                path = build_library()
        lib = open_library(path)
        torch.library.register_kernel("terdit::ternary_matmul", "cuda", _ternary_matmul_cuda)
        torch.library.register_kernel("terdit::ternary_matmul_swiglu", "cuda",
                                      _ternary_matmul_swiglu_cuda)
        torch.library.register_kernel("terdit::ternary_matmul_e4m3", "cuda",
                                      _ternary_matmul_e4m3_cuda)
        torch.library.register_kernel("terdit::ternary_matmul_e4m3_swiglu", "cuda",
                                      _ternary_matmul_e4m3_swiglu_cuda)
        torch.library.register_kernel("terdit::quantize_rows_e4m3", "cuda",
                                      _quantize_rows_e4m3_cuda)
        _lib, _lib_path = lib, path
        return lib


def library_path() -> Optional[Path]:
    """Path of the loaded library, or None before `load()`."""
    return _lib_path


def is_available() -> bool:
    """True when a CUDA device is usable and the kernel library loads (no build attempted)."""
    if not torch.cuda.is_available():
        return False
    try:
        load(build=False)
    except KernelLibraryError:
        return False
    return True


@contextlib.contextmanager
def force_path(name: str) -> Iterator[None]:
    """Within the block, run every call on one kernel family: "auto", "skinny", "tc", "generic",
    "wgmma" or "wgmma2" (the launcher's rules still apply: float32 inputs run "generic", "wgmma*"
    runs "tc" off sm_90, W1.58A8 runs on wgmma / tc / generic; plugins/kernels/README.md)."""
    global _forced_path
    if name not in PATHS:
        raise ValueError(f"kernel path {name!r} is not one of {sorted(PATHS)}")
    previous, _forced_path = _forced_path, PATHS[name]
    try:
        yield
    finally:
        _forced_path = previous


def last_kernel_path() -> str:
    """The family ("skinny", "tc", "generic", "wgmma", "wgmma2") that this thread's last product
    ran on ("auto": none yet): the launcher falls back silently (force_path), so a test asserts
    the family it means to cover."""
    return FAMILIES[load(build=False).terditLastKernelPath()]


# ---- the CUDA implementations ------------------------------------------------------------------

def _prepare_weights(op: str, k: int, device: torch.device, w: Tensor, scale: Tensor,
                     bias: Optional[Tensor]):
    """Checks W / scale / bias against K and the activations' device; returns (scale, bias, N)
    with scale and bias as contiguous float32."""
    for name, t in (("w", w), ("scale", scale), ("bias", bias)):
        if t is not None and t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {device}; move both to "
                             f"the same CUDA device")
    if k % 16:
        raise ValueError(f"{op}: in_features K={k} must be a multiple of 16 for the CUDA kernels; "
                         f"pad the layer or run it on CPU (reference path)")
    if w.dtype != torch.int32 or w.dim() != 2 or w.shape[1] != k // 16:
        raise ValueError(f"{op}: w must be k16 int32 [N, {k // 16}] for K={k}, got {w.dtype} "
                         f"{tuple(w.shape)}")
    if not w.is_contiguous():
        raise ValueError(f"{op}: w must be contiguous (pack it once with .contiguous(); a copy per "
                         f"call would cost more than the matmul)")
    n = w.shape[0]
    if n % 16:
        raise ValueError(f"{op}: out_features N={n} must be a multiple of 16 for the CUDA kernels; "
                         f"pad the layer or run it on CPU (reference path)")
    if scale.shape != (n,):
        raise ValueError(f"{op}: scale must have shape ({n},), got {tuple(scale.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"{op}: bias must have shape ({n},), got {tuple(bias.shape)}")
    # scale / bias are N floats: cast if needed.
    scale = scale.to(torch.float32).contiguous()
    if bias is not None:
        bias = bias.to(torch.float32).contiguous()
    return scale, bias, n


def _prepare(op: str, x: Tensor, w: Tensor, scale: Tensor, bias: Optional[Tensor]):
    if x.dtype not in DTYPE_CODES:
        raise TypeError(f"{op}: x has dtype {x.dtype}; the CUDA kernels take float32, float16 or "
                        f"bfloat16")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension [..., K]")
    k = x.shape[-1]
    if k == 0:
        raise ValueError(f"{op}: in_features K=0 is not supported by the CUDA kernels")
    scale, bias, n = _prepare_weights(op, k, x.device, w, scale, bias)
    return x.contiguous(), scale, bias, n, k  # activations are often views: compact them


def _call(op: str, device: torch.device, entry: str, args: tuple, check: Optional[str] = None
          ) -> None:
    """Calls the C entry point `entry`(*args, stream) on `device`'s current stream; a failure
    raises naming the op, the CUDA error and (from `check`(*args)) the argument at fault."""
    lib = _lib
    assert lib is not None, "load() registers these implementations"
    with torch.cuda.device(device):
        rc = getattr(lib, entry)(*args, torch.cuda.current_stream(device).cuda_stream)
    if rc != 0:
        reason = getattr(lib, check)(*args) if check else None
        detail = f": {reason.decode()}" if reason else ""
        raise RuntimeError(f"{op}: CUDA kernel failed with {lib.terditErrorString(rc).decode()} "
                           f"(cudaError {rc}){detail}")


def _launch(op: str, x: Tensor, w: Tensor, scale: Tensor, bias: Optional[Tensor], out: Tensor,
            m: int, n: int, k: int, epilogue: int) -> None:
    args = (x.data_ptr(), w.data_ptr(), scale.data_ptr(),
            None if bias is None else bias.data_ptr(), out.data_ptr(), m, n, k,
            DTYPE_CODES[x.dtype], epilogue, _forced_path)
    _call(op, x.device, "terditTernaryMatmulEx", args, "terditCheck")


def matmul_into(out: Tensor, x: Tensor, w: Tensor, scale: Tensor, bias: Optional[Tensor] = None,
                *, swiglu: bool = False) -> Tensor:
    """Writes terdit::ternary_matmul(x, w, scale, bias) (or, with `swiglu`, the fused SwiGLU of
    a w1|w3 weight) into the preallocated CUDA tensor `out` ([..., N] or [..., N / 2], x's dtype,
    contiguous) and returns it. For CUDA graphs, benchmarks and tests; needs `load()` first."""
    if _lib is None:
        raise KernelLibraryError("call terdit.kernels.cuda.load() before matmul_into()")
    op = "matmul_into"
    x, scale, bias, n, k = _prepare(op, x, w, scale, bias)
    if swiglu and n % 32:
        raise ValueError(f"{op}: N={n} must be a multiple of 32 for the SwiGLU epilogue")
    cols = n // 2 if swiglu else n
    expected = (*x.shape[:-1], cols)
    if tuple(out.shape) != expected or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"{op}: out must be {x.dtype} {expected} on {x.device}, got {out.dtype} "
                         f"{tuple(out.shape)} on {out.device}")
    if not out.is_contiguous():
        raise ValueError(f"{op}: out must be contiguous")
    m = x.numel() // k
    if m:
        _launch(op, x, w, scale, bias, out, m, n, k, 1 if swiglu else 0)
    return out


def _ternary_matmul_cuda(x: Tensor, w: Tensor, scale: Tensor, bias: Optional[Tensor] = None
                         ) -> Tensor:
    op = "ternary_matmul"
    x, scale, bias, n, k = _prepare(op, x, w, scale, bias)
    out = x.new_empty(*x.shape[:-1], n)
    m = x.numel() // k
    if m:
        _launch(op, x, w, scale, bias, out, m, n, k, 0)
    return out


def _ternary_matmul_swiglu_cuda(x: Tensor, w: Tensor, scale: Tensor) -> Tensor:
    op = "ternary_matmul_swiglu"
    x, scale, _, n, k = _prepare(op, x, w, scale, None)
    if n % 32:
        raise ValueError(f"{op}: N={n} must be a multiple of 32 (w1|w3 halves of a multiple of 16 "
                         f"each) for the CUDA kernels")
    out = x.new_empty(*x.shape[:-1], n // 2)
    m = x.numel() // k
    if m:
        _launch(op, x, w, scale, None, out, m, n, k, 1)
    return out


def _launch_e4m3(op: str, xq: Tensor, x_scale: Tensor, w: Tensor, scale: Tensor,
                 bias: Optional[Tensor], out: Tensor, m: int, n: int, k: int,
                 epilogue: int) -> None:
    args = (xq.data_ptr(), x_scale.data_ptr(), w.data_ptr(), scale.data_ptr(),
            None if bias is None else bias.data_ptr(), out.data_ptr(), m, n, k,
            DTYPE_CODES[out.dtype], epilogue, _forced_path)
    _call(op, xq.device, "terditTernaryMatmulE4m3", args, "terditCheckE4m3")


def _prepare_e4m3(op: str, xq: Tensor, x_scale: Tensor, w: Tensor, scale: Tensor,
                  bias: Optional[Tensor], out_dtype: torch.dtype):
    check_e4m3_args(op, xq, x_scale, w, scale, bias, out_dtype)
    if x_scale.device != xq.device:
        raise ValueError(f"{op}: x_scale is on {x_scale.device} but xq is on {xq.device}")
    k = xq.shape[-1]
    scale, bias, n = _prepare_weights(op, k, xq.device, w, scale, bias)
    return xq.contiguous(), x_scale.to(torch.float32).contiguous(), scale, bias, n, k


def matmul_e4m3_into(out: Tensor, xq: Tensor, x_scale: Tensor, w: Tensor, scale: Tensor,
                     bias: Optional[Tensor] = None, *, swiglu: bool = False) -> Tensor:
    """Writes the W1.58A8 product (or its SwiGLU) of e4m3 activations xq [..., K] with per-token
    scales x_scale [...] into the preallocated CUDA tensor `out` (its dtype is the output type)
    and returns it. For CUDA graphs, benchmarks and tests; needs `load()` first."""
    if _lib is None:
        raise KernelLibraryError("call terdit.kernels.cuda.load() before matmul_e4m3_into()")
    op = "matmul_e4m3_into"
    xq, x_scale, scale, bias, n, k = _prepare_e4m3(op, xq, x_scale, w, scale, bias, out.dtype)
    if swiglu and n % 32:
        raise ValueError(f"{op}: N={n} must be a multiple of 32 for the SwiGLU epilogue")
    expected = (*xq.shape[:-1], n // 2 if swiglu else n)
    if tuple(out.shape) != expected or out.device != xq.device or not out.is_contiguous():
        raise ValueError(f"{op}: out must be contiguous {expected} on {xq.device}, got "
                         f"{tuple(out.shape)} on {out.device}")
    m = xq.numel() // k
    if m:
        _launch_e4m3(op, xq, x_scale, w, scale, bias, out, m, n, k, 1 if swiglu else 0)
    return out


def _ternary_matmul_e4m3_cuda(xq: Tensor, x_scale: Tensor, w: Tensor, scale: Tensor,
                              bias: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    op = "ternary_matmul_e4m3"
    xq, x_scale, scale, bias, n, k = _prepare_e4m3(op, xq, x_scale, w, scale, bias, out_dtype)
    out = torch.empty(*xq.shape[:-1], n, dtype=out_dtype, device=xq.device)
    m = xq.numel() // k
    if m:
        _launch_e4m3(op, xq, x_scale, w, scale, bias, out, m, n, k, 0)
    return out


def _ternary_matmul_e4m3_swiglu_cuda(xq: Tensor, x_scale: Tensor, w: Tensor, scale: Tensor,
                                     out_dtype: torch.dtype) -> Tensor:
    op = "ternary_matmul_e4m3_swiglu"
    xq, x_scale, scale, _, n, k = _prepare_e4m3(op, xq, x_scale, w, scale, None, out_dtype)
    if n % 32:
        raise ValueError(f"{op}: N={n} must be a multiple of 32 (w1|w3 halves of a multiple of 16 "
                         f"each) for the CUDA kernels")
    out = torch.empty(*xq.shape[:-1], n // 2, dtype=out_dtype, device=xq.device)
    m = xq.numel() // k
    if m:
        _launch_e4m3(op, xq, x_scale, w, scale, None, out, m, n, k, 1)
    return out


def _quantize_rows_e4m3_cuda(x: Tensor) -> tuple[Tensor, Tensor]:
    if x.dtype not in DTYPE_CODES:
        raise TypeError(f"quantize_rows_e4m3: x has dtype {x.dtype}; float32, float16 or bfloat16")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError("quantize_rows_e4m3: x must be [..., K] with K > 0")
    x = x.contiguous()
    k = x.shape[-1]
    m = x.numel() // k
    xq = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if m:
        _call("quantize_rows_e4m3", x.device, "terditQuantizeRowsE4m3",
              (x.data_ptr(), DTYPE_CODES[x.dtype], m, k, xq.data_ptr(), s.data_ptr()))
    return xq, s
