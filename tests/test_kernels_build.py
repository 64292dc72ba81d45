"""CPU checks of the CUDA kernel library: it compiles (sm_80, sm_89 for tc, sm_90a SASS, compute_90
PTX for newer GPUs), exports only the C ABI, depends on glibc alone, rejects bad sizes without
touching a GPU, and the torch binding validates its inputs before any CUDA call. The library is
the session's one CMake build of plugins/kernels (tests/conftest.py, shared with the plugin
tests); cuobjdump comes from PATH, beside nvcc or the pip package nvidia-cuda-cuobjdump."""
from __future__ import annotations

import ctypes
import importlib.metadata
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from terdit.kernels import cuda_build as kernel_build
from terdit.kernels import cuda as kernels
from terdit.kernels import w2a8
from terdit.formats import pack_k16

GLIBC = {"libc.so.6", "ld-linux-x86-64.so.2", "libm.so.6", "libdl.so.2", "libpthread.so.0",
         "librt.so.1"}
INVALID_VALUE = 1  # cudaErrorInvalidValue


@pytest.fixture(scope="module")
def built_lib(cuda_kernels):
    """libterdit_kernels.so of the session's every-architecture CMake build (tests/conftest.py)."""
    return cuda_kernels.library


def _cuobjdump_from_pip():
    """cuobjdump of the pip package nvidia-cuda-cuobjdump (the test extra installs it), or None."""
    try:
        files = importlib.metadata.files("nvidia-cuda-cuobjdump") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    found = [f for f in files if f.name == "cuobjdump" and f.parent.name == "bin"]
    return str(found[0].locate()) if found else None


def _cuda_tool(name):
    """A CUDA binary utility on PATH, beside nvcc, or (cuobjdump) from its pip package; else a
    skip."""
    found = shutil.which(name)
    nvcc = kernel_build.find_nvcc()
    if found is None and nvcc is not None and (Path(nvcc).parent / name).is_file():
        found = str(Path(nvcc).parent / name)
    if found is None and name == "cuobjdump":
        found = _cuobjdump_from_pip()
    if found is None:
        pytest.skip(f"{name} not found on PATH or beside nvcc" + (
            " (pip install nvidia-cuda-cuobjdump, in the test extra)" if name == "cuobjdump"
            else " (CUDA toolkit binary utilities absent)"))
    return found


def test_library_holds_sm80_sm89_sm90a_sass_and_compute90_ptx(built_lib):
    cuobjdump = _cuda_tool("cuobjdump")
    elf = subprocess.run([cuobjdump, "--list-elf", str(built_lib)], capture_output=True, text=True,
                         check=True).stdout
    ptx = subprocess.run([cuobjdump, "--list-ptx", str(built_lib)], capture_output=True, text=True,
                         check=True).stdout
    # sm_89 SASS only for the tensor-core translation unit (its e4m3 mma.sync needs sm_89).
    assert set(re.findall(r"\.(sm_\w+)\.cubin", elf)) == {"sm_80", "sm_89", "sm_90a"}
    assert len(re.findall(r"\.sm_89\.cubin", elf)) == sum(len(extra) for extra in
                                                         kernel_build.EXTRA_GENCODE.values())
    # One PTX per translation unit with device code, all generic compute_90 (not sm_90a).
    assert set(re.findall(r"\.(sm_\w+)\.ptx", ptx)) == {"sm_90"}
    assert len(re.findall(r"\.ptx", ptx)) == len(list(kernel_build.KERNEL_SOURCE_DIR.glob("*.cu")))


def test_ptx_has_no_sm90a_instructions_and_assembles_for_a_newer_gpu(built_lib, tmp_path):
    """The driver JIT-compiles the compute_90 PTX on GPUs without matching SASS (sm_100, sm_120, ...).
    sm_90a instructions (wgmma) must not be in it: they are not forward compatible, and the launcher
    only picks the wgmma kernels on compute capability 9, where the sm_90a SASS runs. ptxas for
    sm_120 stands in for the driver's JIT here (no such GPU is at hand)."""
    cuobjdump = _cuda_tool("cuobjdump")
    ptxas = _cuda_tool("ptxas")
    subprocess.run([cuobjdump, "-xptx", "all", str(built_lib)], cwd=tmp_path, capture_output=True,
                   text=True, check=True)
    files = sorted(tmp_path.glob("*.ptx"))
    assert files
    text = {f.name: f.read_text() for f in files}
    for name, body in text.items():
        assert re.search(r"^\.target sm_90\s*$", body, re.M), name
        assert "wgmma" not in body and "setmaxnreg" not in body, name
    # The tensor-core kernels (skinny, tc) are in the PTX through their mma.sync paths.
    assert sum("mma.sync.aligned.m16n8k16" in body for body in text.values()) >= 2
    for f in files:
        proc = subprocess.run([ptxas, "-arch=sm_120", str(f), "-o", str(f.with_suffix(".cubin"))],
                              capture_output=True, text=True)
        assert proc.returncode == 0, f"{f.name}: {proc.stderr[-2000:]}"


def test_cmake_and_python_builds_use_the_same_gencode_list():
    cmake = (kernel_build.KERNEL_SOURCE_DIR / "CMakeLists.txt").read_text()
    match = re.search(r'set\(TERDIT_CUDA_GENCODE\s+"([^"]+)"', cmake)
    assert match, "TERDIT_CUDA_GENCODE default not found in plugins/kernels/CMakeLists.txt"
    assert tuple(match.group(1).split(";")) == kernel_build.DEFAULT_GENCODE
    assert "-gencode=arch=compute_90,code=compute_90" in kernel_build.DEFAULT_GENCODE


def test_library_exports_only_the_c_abi(built_lib):
    lib = kernels.open_library(built_lib)
    assert lib.terditKernelsAbiVersion() == kernels.ABI_VERSION
    if shutil.which("nm") is None:
        pytest.skip("nm not installed: exported-symbol list not checked")
    out = subprocess.run(["nm", "-D", "--defined-only", str(built_lib)], capture_output=True,
                         text=True, check=True).stdout
    exported = {line.split()[-1] for line in out.splitlines() if line.strip()}
    assert exported == set(kernels.C_SYMBOLS)


def test_library_depends_on_glibc_only(built_lib):
    if shutil.which("readelf") is None:
        pytest.skip("readelf not installed: dependencies not checked")
    out = subprocess.run(["readelf", "-d", str(built_lib)], capture_output=True, text=True,
                         check=True).stdout
    needed = {line.split("[")[1].split("]")[0] for line in out.splitlines() if "(NEEDED)" in line}
    assert needed <= GLIBC, f"unexpected dependencies {needed - GLIBC}"


def test_size_rules_rejected_without_gpu(built_lib):
    lib = kernels.open_library(built_lib)

    def check(m, n, k, epilogue=0, dtype=2):
        return lib.terditCheck(None, None, None, None, None, m, n, k, dtype, epilogue, 0)

    assert b"n=24" in check(2, 24, 32)
    assert b"k=40" in check(2, 32, 40)
    assert b"k=0" in check(2, 32, 0)
    assert b"m=-1" in check(-1, 32, 32)
    assert b"SwiGLU" in check(2, 48, 32, epilogue=1)
    assert b"dtype=7" in check(2, 32, 32, dtype=7)
    assert b"epilogue=5" in check(2, 32, 32, epilogue=5)
    assert b"path=6" in lib.terditCheck(None, None, None, None, None, 2, 32, 32, 2, 0, 6)  # skinny2
    assert b"null" in check(2, 32, 32)
    assert check(0, 64, 32, epilogue=1) is None
    # Rejected before any CUDA call, so this works on a machine without a GPU.
    rc = lib.terditTernaryMatmulEx(None, None, None, None, None, 2, 24, 32, 2, 0, 0, None)
    assert rc == INVALID_VALUE
    assert lib.terditErrorString(rc) == b"invalid argument"
    # m == 0 is a no-op.
    assert lib.terditTernaryMatmulEx(None, None, None, None, None, 0, 32, 32, 2, 0, 0, None) == 0
    # W1.58A8: the per-token scales are required, the size rules are the same.
    dummy = ctypes.c_void_p(16)
    assert b"xScale" in lib.terditCheckE4m3(dummy, None, dummy, dummy, None, dummy, 2, 32, 32, 2, 0, 0)
    assert b"k=40" in lib.terditCheckE4m3(dummy, dummy, dummy, dummy, None, dummy, 2, 32, 40, 2, 0, 0)
    assert lib.terditCheckE4m3(dummy, dummy, dummy, dummy, None, dummy, 2, 32, 32, 0, 1, 0) is None
    assert lib.terditTernaryMatmulE4m3(dummy, None, dummy, dummy, None, dummy, 2, 32, 32, 2, 0, 0,
                                       None) == INVALID_VALUE
    assert lib.terditQuantizeRowsE4m3(None, 2, 2, 16, None, None, None) == INVALID_VALUE
    assert lib.terditQuantizeRowsE4m3(None, 7, 0, 16, None, None, None) == 0  # m == 0: no-op


def test_binding_validates_before_launch():
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    w = pack_k16(torch.randint(-1, 2, (32, 64)))
    scale = torch.rand(32)
    with pytest.raises(ValueError, match="K=24 must be a multiple of 16"):
        kernels._prepare("op", torch.randn(2, 24), pack_k16(torch.zeros(32, 24)), scale, None)
    with pytest.raises(ValueError, match="N=24 must be a multiple of 16"):
        kernels._prepare("op", x, pack_k16(torch.zeros(24, 64)), torch.rand(24), None)
    with pytest.raises(ValueError, match=r"w must be k16 int32 \[N, 4\]"):
        kernels._prepare("op", x, w[:, :3].contiguous(), scale, None)
    with pytest.raises(ValueError, match="scale must have shape"):
        kernels._prepare("op", x, w, torch.rand(31), None)
    with pytest.raises(ValueError, match="bias must have shape"):
        kernels._prepare("op", x, w, scale, torch.rand(33))
    with pytest.raises(ValueError, match="contiguous"):
        kernels._prepare("op", x, torch.cat([w, w], 1)[:, ::2], scale, None)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        kernels._prepare("op", x.to(torch.float64), w, scale, None)
    xq, xs = w2a8.quantize_rows_e4m3_ref(x)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        kernels._prepare_e4m3("op", x, xs, w, scale, None, torch.bfloat16)
    with pytest.raises(ValueError, match="one scale per token"):
        kernels._prepare_e4m3("op", xq, xs[:2], w, scale, None, torch.bfloat16)
    with pytest.raises(TypeError, match="out_dtype"):
        kernels._prepare_e4m3("op", xq, xs, w, scale, None, torch.float64)
    xx, s, b, n, k = kernels._prepare("op", x.t().contiguous().t(), w, scale.double(),
                                      torch.rand(32, dtype=torch.bfloat16))
    assert xx.is_contiguous() and s.dtype == torch.float32 and b.dtype == torch.float32
    assert (n, k) == (32, 64)


def test_force_path_rejects_unknown_names():
    with pytest.raises(ValueError, match="not one of"):
        with kernels.force_path("fast"):
            pass
    with pytest.raises(ValueError, match="not one of"):
        with kernels.force_path("skinny2"):  # deleted: measured no faster than skinny
            pass
    with kernels.force_path("tc"):
        assert kernels._forced_path == kernels.PATHS["tc"]
    assert kernels._forced_path == 0


def test_build_commands_give_tc_its_sm89_cubin(tmp_path):
    if kernel_build.find_nvcc() is None:
        pytest.skip("nvcc not found")
    *compiles, link = kernel_build.nvcc_commands(tmp_path / "lib.so", obj_dir=tmp_path)
    by_source = {next(a for a in c if a.endswith((".cu", ".cpp"))).rsplit("/", 1)[-1]: c
                 for c in compiles}
    assert set(by_source) == {p.name for p in kernel_build.KERNEL_SOURCE_DIR.glob("*.cu")} | {
        kernel_build.C_API_SOURCE.name}
    sm89 = "-gencode=arch=compute_89,code=sm_89"
    assert sm89 in by_source["ternaryTensorCore.cu"]
    assert all(sm89 not in c for name, c in by_source.items() if name != "ternaryTensorCore.cu")
    assert link[-1] == str(tmp_path / "lib.so") and "-shared" in link


def test_python_build_compiles_each_source_as_the_cmake_build_does(cuda_kernels, tmp_path):
    """terdit.kernels.cuda_build (kernels.load(build=True) where CMake is not at hand) is not run here
    (a second compile of every source); its nvcc commands give each kernel source the -gencode
    flags and the -O3 / C++17 / hidden-visibility options of the CMake build the tests above
    check."""
    cmake = {Path(e["file"]).name: shlex.split(e["command"])
             for e in json.loads((cuda_kernels.directory / "compile_commands.json").read_text())}
    *compiles, _ = kernel_build.nvcc_commands(tmp_path / "lib.so", obj_dir=tmp_path)
    python = {next(a for a in c if a.endswith(".cu")).rsplit("/", 1)[-1]: c
              for c in compiles if any(a.endswith(".cu") for a in c)}
    assert set(python) == {name for name in cmake if name.endswith(".cu")}
    for name, command in python.items():
        gencode = [a for a in command if a.startswith("-gencode")]
        assert gencode == [a for a in cmake[name] if a.startswith("-gencode")], name
        assert "-O3" in cmake[name] and "-O3" in command
        assert "-std=c++17" in cmake[name] and "-std=c++17" in command
        assert "-Xcompiler=-fvisibility=hidden" in cmake[name], cmake[name]
        assert any("-fvisibility=hidden" in a for a in command)


def test_import_makes_no_cuda_call():
    code = ("import torch, terdit.kernels.cuda as k; "
            "assert not torch.cuda.is_initialized(); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=kernel_build.REPO_ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
