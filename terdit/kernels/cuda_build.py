"""Finding and building libterdit_kernels.so: nvcc commands equal to the CMake target's (one
compile per source, in parallel, then the link), so the library can be built where CMake is not
at hand (and on a machine without a GPU: nvcc needs none)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import List, Optional

LIB_NAME = "libterdit_kernels.so"
REPO_ROOT = Path(__file__).resolve().parents[2]
KERNEL_SOURCE_DIR = REPO_ROOT / "plugins" / "kernels"
C_API_SOURCE = REPO_ROOT / "plugins" / "kernels_capi" / "terditKernelsC.cpp"
DEFAULT_GENCODE = ("-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a",
                   "-gencode=arch=compute_90,code=compute_90")
# Per-file additions (plugins/kernels/CMakeLists.txt sets the same): the tc kernel's W1.58A8
# variant is e4m3 mma.sync, which exists from sm_89.
EXTRA_GENCODE = {"ternaryTensorCore.cu": ("-gencode=arch=compute_89,code=sm_89",)}


class KernelLibraryError(RuntimeError):
    """The kernel library is missing, cannot be built, or cannot be loaded."""


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


def nvcc_commands(out: Path, gencode=DEFAULT_GENCODE, nvcc: Optional[str] = None,
                  obj_dir: Optional[Path] = None) -> List[List[str]]:
    """The nvcc invocations that build the shared library as the CMake target does: one compile
    per source (they can run in parallel) and the final link, last."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise KernelLibraryError("nvcc was not found (looked in $CUDA_HOME/bin, PATH and "
                                 "/usr/local/cuda/bin); install the CUDA toolkit or point "
                                 "TERDIT_KERNELS_LIB at a prebuilt libterdit_kernels.so")
    obj_dir = Path(obj_dir) if obj_dir is not None else Path(out).parent
    common = [nvcc, "-O3", "-std=c++17", "-Xcompiler=-fPIC,-fvisibility=hidden", *gencode,
              f"-I{KERNEL_SOURCE_DIR}"]
    sources = sorted(KERNEL_SOURCE_DIR.glob("*.cu")) + [C_API_SOURCE]
    compiles, objects = [], []
    for src in sources:
        obj = obj_dir / (src.stem + ".o")
        objects.append(str(obj))
        compiles.append([*common, *EXTRA_GENCODE.get(src.name, ()), "-c", str(src), "-o", str(obj)])
    link = [nvcc, "-shared", *gencode, "-cudart=static",
            f"-Xlinker=--version-script={KERNEL_SOURCE_DIR / 'terditKernels.map'}",
            "-Xlinker=--no-undefined", "-Xcompiler=-static-libstdc++,-static-libgcc",
            *objects, "-o", str(out)]
    return [*compiles, link]


def build_library(out_dir: Optional[Path] = None, gencode=DEFAULT_GENCODE,
                  jobs: Optional[int] = None) -> Path:
    """Builds libterdit_kernels.so into `out_dir` (default: the user cache) with nvcc, `jobs`
    sources at a time (default: the CPU count), and returns its path. About two and a half
    minutes on two cores."""
    out_dir = Path(out_dir) if out_dir is not None else cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / LIB_NAME
    tmp = out_dir / (LIB_NAME + f".tmp{os.getpid()}")
    import concurrent.futures
    import tempfile
    with tempfile.TemporaryDirectory(dir=out_dir) as obj_dir:
        *compiles, link = nvcc_commands(tmp, gencode, obj_dir=Path(obj_dir))

        def run(cmd):
            return cmd, subprocess.run(cmd, capture_output=True, text=True)

        workers = jobs or os.cpu_count() or 2
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(run, compiles))
        for cmd, proc in [*results, run(link)]:
            if proc.returncode != 0:
                raise KernelLibraryError(f"building {LIB_NAME} failed (exit {proc.returncode}):\n"
                                         f"{' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    os.replace(tmp, out)
    return out
