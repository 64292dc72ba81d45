"""The terdit CPU kernel library (plugins/cpu, `libterdit_cpu.so`): found, or built with the system
C++ compiler on first use, and loaded; numpy-free and torch-free, so the ONNX Runtime backend and
the torch binding (terdit.kernels.cpu_ops) share it.

One library holds the kernels (C ABI, plugins/cpu/terditCpu.h) and, when ONNX Runtime's C API
headers are found at build time, the ONNX Runtime custom op (`RegisterCustomOps`). Where it looks:
$TERDIT_CPU_LIB, else the user cache keyed by a hash of the sources and flags (so an edited source
is rebuilt, never run stale). The ONNX Runtime headers: $TERDIT_ORT_INCLUDE, else the checkout's
../shared/onnxruntime-headers/1.29/include when present.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Optional

from .errors import UserError
from .files import file_kind

LIB_NAME = "libterdit_cpu.so"
REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIR = REPO_ROOT / "plugins" / "cpu"
ABI_VERSION = 1
ACT_QUANT_CODES = {"none": 0, "int8": 1, "fp8": 2}
ISAS = ("avx512-vnni", "avx2", "portable")
COMMON_FLAGS = ("-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off")
X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
# per source: its ISA flags (the x86 vector units are only built on x86)
SOURCES = {"terditCpu.cpp": (), "cpuPortable.cpp": ()}
if X86:
    SOURCES.update({"cpuAvx2.cpp": ("-mavx2", "-mfma"),
                    "cpuAvx512.cpp": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni",
                                      "-mavx2", "-mfma")})
ORT_SOURCE = "terditOrt.cpp"
HEADERS = ("terditCpu.h", "cpuGemm.h", "cpuDriver.h", "terditCpu.map")


class CpuKernelError(UserError):
    """The CPU kernel library is missing, cannot be built here, or cannot be loaded."""


_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_lib_path: Optional[Path] = None
_failure: Optional[str] = None


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "terdit"


def ort_include_dir() -> Optional[Path]:
    """Where onnxruntime_c_api.h is: $TERDIT_ORT_INCLUDE, else ../shared beside the checkout."""
    env = os.environ.get("TERDIT_ORT_INCLUDE")
    candidates = [Path(env)] if env else []
    candidates.append(REPO_ROOT.parent / "shared" / "onnxruntime-headers" / "1.29" / "include")
    return next((c for c in candidates if (c / "onnxruntime_c_api.h").is_file()), None)


def find_compiler() -> Optional[str]:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def compile_commands(out: Path, obj_dir: Path, cxx: str, ort_include: Optional[Path]
                     ) -> list[list[str]]:
    """One compile per source (run in parallel), then the link, last (the commands the CMake
    target in plugins/cpu/CMakeLists.txt runs)."""
    defines = ["-DTERDIT_CPU_X86"] if X86 else []
    cmds, objects = [], []
    sources = dict(SOURCES)
    if ort_include is not None:
        sources[ORT_SOURCE] = (f"-I{ort_include}",)
    for name, flags in sources.items():
        obj = obj_dir / (Path(name).stem + ".o")
        objects.append(str(obj))
        cmds.append([cxx, *COMMON_FLAGS, *defines, f"-I{SOURCE_DIR}", *flags, "-c",
                     str(SOURCE_DIR / name), "-o", str(obj)])
    cmds.append([cxx, "-shared", "-pthread", *objects, "-o", str(out),
                 f"-Wl,--version-script={SOURCE_DIR / 'terditCpu.map'}", "-Wl,--no-undefined"])
    return cmds


def _build_key(cxx: str, ort_include: Optional[Path]) -> str:
    h = hashlib.sha256()
    for name in sorted([*SOURCES, ORT_SOURCE, *HEADERS]):
        h.update(name.encode() + b"\0" + (SOURCE_DIR / name).read_bytes())
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    h.update(repr((cxx, version, X86, COMMON_FLAGS, sorted(SOURCES.items()),
                   ort_include is not None)).encode())
    if ort_include is not None:
        h.update((ort_include / "onnxruntime_c_api.h").read_bytes())
    return h.hexdigest()[:16]


def build_library(out_dir: Optional[Path] = None, quiet: bool = False) -> Path:
    """Builds libterdit_cpu.so with the system C++ compiler into `out_dir` (default: the user
    cache, under a key of the sources, flags and compiler) and returns its path; an up-to-date
    build in the cache is reused. About 15 s on 2 cores."""
    cxx = find_compiler()
    if cxx is None:
        raise CpuKernelError("no C++ compiler found (looked for $CXX, g++, c++, clang++); install "
                             "g++ to build the terdit CPU kernels, or point TERDIT_CPU_LIB at a "
                             "prebuilt libterdit_cpu.so")
    if not (SOURCE_DIR / "terditCpu.cpp").is_file():
        raise CpuKernelError(f"the CPU kernel sources are not at {SOURCE_DIR} (an installed "
                             f"package without the checkout); build plugins/cpu with CMake and "
                             f"set TERDIT_CPU_LIB")
    ort_include = ort_include_dir()
    key = _build_key(cxx, ort_include)
    out_dir = Path(out_dir) if out_dir is not None else cache_dir() / f"cpu-{key}"
    out = out_dir / LIB_NAME
    if out.is_file():
        return out
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CpuKernelError(f"cannot create the build cache {out_dir} ({err.strerror or err}); "
                             f"set XDG_CACHE_HOME to a writable directory, or TERDIT_CPU_LIB to a "
                             f"prebuilt libterdit_cpu.so") from None
    if not quiet:
        print(f"building the terdit CPU kernels with {Path(cxx).name} into {out_dir} (once, about "
              f"15 s)", file=sys.stderr, flush=True)
    tmp = out_dir / f"{LIB_NAME}.tmp{os.getpid()}"
    with tempfile.TemporaryDirectory(dir=out_dir) as obj_dir:
        *compiles, link = compile_commands(tmp, Path(obj_dir), cxx, ort_include)

        def run(cmd):
            return cmd, subprocess.run(cmd, capture_output=True, text=True)

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            results = list(pool.map(run, compiles))
        for cmd, proc in [*results, run(link)]:
            if proc.returncode != 0:
                tmp.unlink(missing_ok=True)
                raise CpuKernelError(f"building {LIB_NAME} failed (exit {proc.returncode}): "
                                     f"{' '.join(cmd)}: {(proc.stderr or proc.stdout)[-2000:]}")
    os.replace(tmp, out)
    return out


def _open(path: Path) -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as err:
        raise CpuKernelError(f"cannot load {path}: {err}; rebuild it (delete it to rebuild on "
                             f"first use)") from None
    if not hasattr(lib, "terditCpuAbiVersion"):
        raise CpuKernelError(f"{path} is not the terdit CPU kernel library")
    lib.terditCpuAbiVersion.restype = ctypes.c_int
    if lib.terditCpuAbiVersion() != ABI_VERSION:
        raise CpuKernelError(f"{path} has C ABI version {lib.terditCpuAbiVersion()}, this module "
                             f"needs {ABI_VERSION}; rebuild it")
    vp, i32, i64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
    lib.terditCpuTernaryMatmul.argtypes = [vp, vp, vp, vp, vp, i64, i64, i64, i32, i32, vp, vp]
    lib.terditCpuTernaryMatmul.restype = ctypes.c_int
    lib.terditCpuQuantizeRowsInt8.argtypes = [vp, i64, i64, vp, vp]
    lib.terditCpuQuantizeRowsInt8.restype = ctypes.c_int
    for name in ("terditCpuIsa", "terditCpuBestIsa"):
        getattr(lib, name).argtypes = []
        getattr(lib, name).restype = ctypes.c_char_p
    lib.terditCpuSetIsa.argtypes = [ctypes.c_char_p]
    lib.terditCpuSetIsa.restype = ctypes.c_int
    lib.terditCpuStatusString.argtypes = [ctypes.c_int]
    lib.terditCpuStatusString.restype = ctypes.c_char_p
    return lib


def load(build: bool = True) -> ctypes.CDLL:
    """The loaded library (idempotent): $TERDIT_CPU_LIB, else the cached build, built first when
    `build` and missing. A failure is remembered: later calls raise it again at once."""
    global _lib, _lib_path, _failure
    with _lock:
        if _lib is not None:
            _check_env(_lib, _lib_path)           # the variables may have changed since
            return _lib
        if _failure is not None:
            raise CpuKernelError(_failure)
        try:
            env = os.environ.get("TERDIT_CPU_LIB")
            if env:
                path = Path(env)
                if not path.is_file():
                    what = (file_kind(path.lstat().st_mode) if os.path.lexists(path)
                            else "no such file")
                    raise CpuKernelError(f"TERDIT_CPU_LIB={env}: not a library file ({what}); "
                                         f"point it at a built libterdit_cpu.so or unset it")
            elif build:
                path = build_library()
            else:
                raise CpuKernelError("the terdit CPU kernels are not built (load(build=True) "
                                     "builds them)")
            _lib, _lib_path = _open(path), path
        except CpuKernelError as err:
            _failure = str(err)
            raise
        _check_env(_lib, _lib_path)
        return _lib


def _check_env(lib: ctypes.CDLL, path: Path) -> None:
    """TERDIT_CPU_LIB, when set, is the library in use, and TERDIT_CPU_ISA names a path this
    CPU and build run (the library would otherwise fall back to the best one without a
    word)."""
    env = os.environ.get("TERDIT_CPU_LIB")
    if env and Path(env) != path:
        what = file_kind(Path(env).lstat().st_mode) if os.path.lexists(env) else "no such file"
        raise CpuKernelError(f"TERDIT_CPU_LIB={env}: not the library in use ({path}; {what}); "
                             f"point it at a built libterdit_cpu.so or unset it")
    forced = os.environ.get("TERDIT_CPU_ISA")
    if not forced:
        return
    if forced not in ISAS:
        raise CpuKernelError(f"TERDIT_CPU_ISA={forced[:40]}: not one of {', '.join(ISAS)}; name "
                             f"one or unset it")
    if lib.terditCpuIsa().decode() != forced:
        raise CpuKernelError(f"TERDIT_CPU_ISA={forced}: this CPU or build cannot run it (best "
                             f"here: {lib.terditCpuBestIsa().decode()}); unset it or name that one")


def library_path() -> Path:
    load()
    assert _lib_path is not None
    return _lib_path


def isa() -> str:
    """The instruction set the kernels run now ("avx512-vnni", "avx2" or "portable")."""
    return load().terditCpuIsa().decode()


def best_isa() -> str:
    return load().terditCpuBestIsa().decode()


@contextlib.contextmanager
def force_isa(name: str) -> Iterator[None]:
    """Within the block, every call runs the `name` kernels (tests, benchmarks); raises
    CpuKernelError when this CPU or build lacks them."""
    lib = load()
    if name not in (*ISAS, "auto"):
        raise ValueError(f"isa {name!r} is not one of {', '.join(ISAS)}, auto")
    previous = isa()
    if lib.terditCpuSetIsa(name.encode()) != 0:
        raise CpuKernelError(f"this CPU or build cannot run the {name} kernels (best here: "
                             f"{best_isa()})")
    try:
        yield
    finally:
        lib.terditCpuSetIsa(previous.encode())


def describe() -> str:
    return f"terdit CPU kernels ({isa()})"


def register_ort(session_options) -> str:
    """Registers the custom op terdit::TernaryMatMul with an onnxruntime.SessionOptions and
    returns which path runs; CpuKernelError when the library is unavailable or was built without
    ONNX Runtime's headers."""
    lib = load()
    if not hasattr(lib, "RegisterCustomOps"):
        raise CpuKernelError(f"{library_path()} was built without ONNX Runtime's C API headers; "
                             f"set TERDIT_ORT_INCLUDE to an ONNX Runtime release's include/ "
                             f"directory and rebuild")
    session_options.register_custom_ops_library(str(library_path()))
    return describe()


def status_text(code: int) -> str:
    return load().terditCpuStatusString(code).decode()


def prefer_passive_openmp() -> None:
    """Call before torch is first imported in a process that will run these kernels from torch:
    OpenMP's idle threads then sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE, which torch's
    OpenMP runtime reads once, when torch loads). Spinning, torch's threads take the cores this
    library's pool runs on between torch's own ops: the random-weight 600M int8 forward with
    guidance took 1,230 ms spinning and 865 ms passive (2 threads, AMD EPYC Zen 4). A value the
    user set is kept; once torch is loaded this changes nothing."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
