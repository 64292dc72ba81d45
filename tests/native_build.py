"""The native builds the tests share: the CUDA kernels (plugins/kernels, CMake) and the TensorRT
plugin library per header release. tests/conftest.py makes each one once per pytest session
(fixtures `cuda_kernels`, `cuda_kernels_any_arch`, `trt_plugin_build`); the kernels are the slow
part (about a minute and a half on two cores for every architecture).

One CMake build of plugins/kernels gives both libraries the tests need from one compile:
libterdit_kernels_static.a (linked into the TensorRT plugin) and libterdit_kernels.so (the C ABI
of plugins/kernels_capi over the same objects, for ctypes).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from terdit.kernels import cuda_build as kernel_build

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TENSORRT_HEADERS = SHARED / "tensorrt-headers"
JOBS = str(max(1, min(4, os.cpu_count() or 1)))
# One architecture, for tests that need the kernels linked but never look at their device code:
# compute_80 PTX only (no ptxas run, no sm_89 cubin for the tc kernel).
ONE_ARCH = ("-gencode=arch=compute_80,code=compute_80",)


def run(cmd, timeout, env=None) -> str:
    """Runs `cmd`; its stdout + stderr, or an assertion error that shows their end."""
    result = subprocess.run([str(c) for c in cmd], check=False, capture_output=True, text=True,
                            timeout=timeout, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{output[-6000:]}"
    return output


def skip_without_cmake() -> None:
    if shutil.which("cmake") is None or (shutil.which("c++") is None
                                         and shutil.which("g++") is None):
        pytest.skip("needs cmake and a C++ compiler")


def nvcc() -> str:
    """nvcc (terdit.kernels.cuda_build.find_nvcc's search), or a skip."""
    found = kernel_build.find_nvcc()
    if found is None:
        pytest.skip("nvcc not found (CUDA toolkit absent): cannot compile the kernels")
    return found


def tensorrt_include(version: str) -> Path:
    """The include folder of TensorRT `version`'s headers in ../shared, or a skip."""
    include = TENSORRT_HEADERS / version / "include"
    if not (include / "NvInferRuntime.h").is_file():
        pytest.skip(f"TensorRT {version} headers not found at {include} (CI keeps the releases in "
                    f"../shared/tensorrt-headers beside the clone)")
    return include


@dataclasses.dataclass(frozen=True)
class KernelBuild:
    directory: Path
    gencode: tuple[str, ...]

    @property
    def archive(self) -> Path:
        return self.directory / "libterdit_kernels_static.a"

    @property
    def library(self) -> Path:
        return self.directory / kernel_build.LIB_NAME


def build_kernels(directory: Path, gencode: tuple[str, ...] = kernel_build.DEFAULT_GENCODE
                  ) -> KernelBuild:
    """Configures plugins/kernels with `gencode` (the tc kernel's extra sm_89 cubin only with
    the default list) and builds libterdit_kernels.so, which links the static library."""
    skip_without_cmake()
    build = KernelBuild(Path(directory), tuple(gencode))
    extra = [] if build.gencode == kernel_build.DEFAULT_GENCODE else [
        f"-DTERDIT_CUDA_GENCODE={';'.join(build.gencode)}", "-DTERDIT_CUDA_GENCODE_FP8_MMA="]
    run(["cmake", "-S", ROOT / "plugins" / "kernels", "-B", build.directory,
         f"-DCMAKE_CUDA_COMPILER={nvcc()}", "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON", *extra],
        timeout=300)
    run(["cmake", "--build", build.directory, "-j", JOBS, "--target", "terdit_kernels"],
        timeout=1800)
    assert build.archive.is_file() and build.library.is_file()
    return build


def configure_plugin(build: Path, include: Path, archive: Path, *extra, env=None) -> str:
    """Configures the top-level project for the TensorRT plugin against `include`, linking the
    prebuilt kernels `archive`, with warnings as errors and compile_commands.json."""
    return run(["cmake", "-S", ROOT, "-B", build, f"-DTensorRT_INCLUDE_DIR={include}",
                f"-DTERDIT_KERNELS_PREBUILT={archive}", "-DTERDIT_WARNINGS_AS_ERRORS=ON",
                "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON", *extra], timeout=300, env=env)


PLUGIN_TARGETS = ("terdit_trt_plugin", "ternaryMatMulHostTest", "ternaryMatMulLogicTest")


@dataclasses.dataclass(frozen=True)
class PluginBuild:
    directory: Path
    configure: str          # the configure step's output
    archive: Path           # the kernels it links

    @property
    def library(self) -> Path:
        return self.directory / "libterdit_trt_plugin.so"


def build_plugin(directory: Path, version: str, archive: Path) -> PluginBuild:
    """The plugin library and its host tests against TensorRT `version`'s headers."""
    configure = configure_plugin(directory, tensorrt_include(version), archive)
    run(["cmake", "--build", directory, "-j", JOBS, "--target", *PLUGIN_TARGETS], timeout=900)
    return PluginBuild(Path(directory), configure, archive)
