"""CUDA kernels for `terdit::ternary_matmul` and `terdit::ternary_matmul_swiglu`.

`load()` finds (or builds) `libterdit_kernels.so` (plugins/kernels), loads it with ctypes and
registers its CUDA implementations for both ops; CPU tensors keep the reference implementation.
The library is plain C ABI + static cudart, so one build made with nvcc on a machine without a GPU
runs under any torch with a CUDA 13 driver (no torch C++ extension, no version coupling).

Importing this module makes no CUDA call. Kernel choice: see plugins/kernels/README.md;
`force_path("skinny" | "skinny2" | "tc" | "generic" | "wgmma" | "wgmma2")` pins one kernel family
(tests, benchmarks).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Iterator, List, Optional

import torch
from torch import Tensor

from terdit import ternary as _ternary  # noqa: F401  (defines the ops we register kernels for)

LIB_NAME = "libterdit_kernels.so"
REPO_ROOT = Path(__file__).resolve().parent.parent
KERNEL_SOURCE_DIR = REPO_ROOT / "plugins" / "kernels"
C_API_SOURCE = REPO_ROOT / "plugins" / "torch" / "terditKernelsC.cpp"
DEFAULT_GENCODE = ("-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a",
                   "-gencode=arch=compute_90,code=compute_90")
C_SYMBOLS = ("terditTernaryMatmul", "terditTernaryMatmulEx", "terditCheck", "terditErrorString",
             "terditKernelsAbiVersion")
ABI_VERSION = 1

PATHS = {"auto": 0, "skinny": 1, "tc": 2, "generic": 3, "wgmma": 4, "wgmma2": 5, "skinny2": 6}
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_lib_path: Optional[Path] = None
_forced_path = 0


class KernelLibraryError(RuntimeError):
    """The kernel library is missing, cannot be built, or cannot be loaded."""


# ---- finding and building the library ----------------------------------------------------------

def candidate_paths() -> List[Path]:
    """Where `load()` looks, in order: $TERDIT_KERNELS_LIB, the standalone CMake build, the
    top-level CMake build, the user cache."""
    out = []
    env = os.environ.get("TERDIT_KERNELS_LIB")
    if env:
        out.append(Path(env))
    out += [REPO_ROOT / "build" / "kernels" / LIB_NAME,
            REPO_ROOT / "build" / "plugins" / "kernels" / LIB_NAME,
            cache_dir() / LIB_NAME]
    return out


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "terdit"


def find_nvcc() -> Optional[str]:
    """nvcc from $CUDA_HOME/bin, PATH, or /usr/local/cuda/bin; None when absent."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


def nvcc_command(out: Path, gencode=DEFAULT_GENCODE, nvcc: Optional[str] = None) -> List[str]:
    """One nvcc invocation that builds the shared library exactly as the CMake target does."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise KernelLibraryError("nvcc was not found (looked in $CUDA_HOME/bin, PATH and "
                                 "/usr/local/cuda/bin); install the CUDA toolkit or point "
                                 "TERDIT_KERNELS_LIB at a prebuilt libterdit_kernels.so")
    sources = sorted(str(p) for p in KERNEL_SOURCE_DIR.glob("*.cu")) + [str(C_API_SOURCE)]
    return [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler=-fPIC,-fvisibility=hidden",
            *gencode, "-cudart=static", f"-I{KERNEL_SOURCE_DIR}",
            f"-Xlinker=--version-script={KERNEL_SOURCE_DIR / 'terditKernels.map'}",
            "-Xlinker=--no-undefined", "-Xcompiler=-static-libstdc++,-static-libgcc",
            *sources, "-o", str(out)]


def build_library(out_dir: Optional[Path] = None, gencode=DEFAULT_GENCODE) -> Path:
    """Builds libterdit_kernels.so into `out_dir` (default: the user cache) with nvcc and
    returns its path. Takes about a minute on two cores."""
    out_dir = Path(out_dir) if out_dir is not None else cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / LIB_NAME
    tmp = out_dir / (LIB_NAME + f".tmp{os.getpid()}")
    cmd = nvcc_command(tmp, gencode)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise KernelLibraryError(f"building {LIB_NAME} failed (exit {proc.returncode}):\n"
                                 f"{' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    os.replace(tmp, out)
    return out


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


def open_library(path: Path) -> ctypes.CDLL:
    """dlopen + symbol/ABI check (no CUDA call)."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise KernelLibraryError(f"cannot load {path}: {e}") from e
    missing = [s for s in C_SYMBOLS if not hasattr(lib, s)]
    if missing:
        raise KernelLibraryError(f"{path} lacks {missing}; rebuild it from plugins/kernels")
    _declare(lib)
    if lib.terditKernelsAbiVersion() != ABI_VERSION:
        raise KernelLibraryError(f"{path} has C ABI version {lib.terditKernelsAbiVersion()}, "
                                 f"this module needs {ABI_VERSION}; rebuild it")
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
    """Within the block, run every call on one kernel family: "auto", "skinny", "skinny2", "tc",
    "generic", "wgmma" or "wgmma2" (float32 inputs always run "generic"; "wgmma" and "wgmma2" run
    "tc" on GPUs other than sm_90)."""
    global _forced_path
    if name not in PATHS:
        raise ValueError(f"kernel path {name!r} is not one of {sorted(PATHS)}")
    previous, _forced_path = _forced_path, PATHS[name]
    try:
        yield
    finally:
        _forced_path = previous


# ---- the CUDA implementations ------------------------------------------------------------------

def _prepare(op: str, x: Tensor, w: Tensor, scale: Tensor, bias: Optional[Tensor]):
    if x.dtype not in _DTYPES:
        raise TypeError(f"{op}: x has dtype {x.dtype}; the CUDA kernels take float32, float16 or "
                        f"bfloat16")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension [..., K]")
    k = x.shape[-1]
    if k == 0:
        raise ValueError(f"{op}: in_features K=0 is not supported by the CUDA kernels")
    for name, t in (("w", w), ("scale", scale), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}; move both to "
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
    # Activations are often views: compact them. scale / bias are N floats: cast if needed.
    x = x.contiguous()
    scale = scale.to(torch.float32).contiguous()
    if bias is not None:
        bias = bias.to(torch.float32).contiguous()
    return x, scale, bias, n, k


def _launch(op: str, x: Tensor, w: Tensor, scale: Tensor, bias: Optional[Tensor], out: Tensor,
            m: int, n: int, k: int, epilogue: int) -> None:
    lib = _lib
    assert lib is not None, "load() registers these implementations"
    with torch.cuda.device(x.device):
        stream = torch.cuda.current_stream(x.device).cuda_stream
        args = (x.data_ptr(), w.data_ptr(), scale.data_ptr(),
                None if bias is None else bias.data_ptr(), out.data_ptr(), m, n, k,
                _DTYPES[x.dtype], epilogue, _forced_path)
        rc = lib.terditTernaryMatmulEx(*args, stream)
    if rc != 0:
        reason = lib.terditCheck(*args)
        detail = f": {reason.decode()}" if reason else ""
        raise RuntimeError(f"{op}: CUDA kernel failed with {lib.terditErrorString(rc).decode()} "
                           f"(cudaError {rc}){detail}")


def matmul_into(out: Tensor, x: Tensor, w: Tensor, scale: Tensor, bias: Optional[Tensor] = None,
                *, swiglu: bool = False) -> Tensor:
    """Writes terdit::ternary_matmul(x, w, scale, bias) (or, with `swiglu`, the fused SwiGLU of
    a w1|w3 weight) into the preallocated CUDA tensor `out` ([..., N] or [..., N / 2], x's dtype,
    contiguous) and returns it. For CUDA graphs, benchmarks and tests; needs `load()` first."""
    if _lib is None:
        raise KernelLibraryError("call terdit.kernels.load() before matmul_into()")
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
