"""The TensorRT plugin against every TensorRT header release the project supports (DESIGN section 5).

The public headers of TensorRT 10.0.1, 10.7.0, 10.16 and 11.1 live in ../shared/tensorrt-headers
beside the repository (CI has them there; a user's clone may not, and then each version skips with
the path it looked at). Nothing here needs a GPU or libnvinfer.

- configure only: CMake reads each release's version from NvInferVersion.h (10.0-10.7 write the
  numbers followed by a //!< comment, 10.16 and 11.x through TRT_*_ENTERPRISE macros).
- build matrix: the kernels are compiled once per session (the slow part, about a minute on two
  cores) into libterdit_kernels_static.a; per release only the plugin, its logic and host tests are
  compiled against that release's headers with -Wall -Wextra -Werror, linked with that archive
  (TERDIT_KERNELS_PREBUILT), and ctest runs the logic test, the exports check and the dlopen host
  test of the real plugin library. The act_quant="fp8" branch, which is compiled in only once the
  kernels define launchQuantizeRowsE4m3, is compiled (syntax only) from the same compile commands.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEADERS = ROOT.parent / "shared" / "tensorrt-headers"
# Header folder -> the version CMake must print for it.
VERSIONS = {
    "10.0.1": r"10\.0\.1",
    "10.7.0": r"10\.7\.0",
    "10.16": r"10\.16\.\d+",
    "11.1": r"11\.1\.\d+",
}

JOBS = str(max(1, min(4, os.cpu_count() or 1)))
PLUGIN_DIR = ROOT / "plugins" / "ternaryMatMulPlugin"

pytestmark = pytest.mark.skipif(
    shutil.which("cmake") is None or shutil.which("c++") is None and shutil.which("g++") is None,
    reason="needs cmake and a C++ compiler",
)


def _run(cmd, timeout, env=None):
    result = subprocess.run(
        [str(c) for c in cmd], check=False, capture_output=True, text=True, timeout=timeout, env=env
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{output[-6000:]}"
    return output


def _headers(version):
    include = HEADERS / version / "include"
    if not (include / "NvInferRuntime.h").is_file():
        pytest.skip(
            f"TensorRT {version} headers not found at {include} (CI keeps the four releases in "
            "../shared/tensorrt-headers beside the clone)"
        )
    return include


@pytest.mark.parametrize("version", list(VERSIONS))
def test_configure_reports_the_tensorrt_version(version, tmp_path):
    include = _headers(version)
    output = _run(
        [
            "cmake",
            "-S",
            ROOT,
            "-B",
            tmp_path,
            "-DTERDIT_BUILD_KERNELS=OFF",
            f"-DTensorRT_INCLUDE_DIR={include}",
        ],
        timeout=120,
    )
    found = re.findall(r"-- TensorRT headers: (\S+) in (\S+)", output)
    assert len(found) == 1, output
    printed, where = found[0]
    assert re.fullmatch(VERSIONS[version], printed), f"headers {version} printed as {printed!r}"
    assert Path(where) == include
    assert "Could not read the TensorRT version" not in output


def _nvcc():
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").is_file() else None)
    if nvcc is None:
        pytest.skip("nvcc not found: the plugin library links the CUDA kernels")
    return nvcc


@pytest.fixture(scope="session")
def kernels_archive(tmp_path_factory):
    """libterdit_kernels_static.a, compiled once for every test here (default -gencode list)."""
    _nvcc()
    build = tmp_path_factory.mktemp("kernels")
    _run(["cmake", "-S", ROOT / "plugins" / "kernels", "-B", build], timeout=300)
    _run(["cmake", "--build", build, "-j", JOBS, "--target", "terdit_kernels_static"], timeout=1200)
    archive = build / "libterdit_kernels_static.a"
    assert archive.is_file()
    return archive


def _configure_plugin(build, include, archive, *extra, env=None):
    return _run(
        [
            "cmake",
            "-S",
            ROOT,
            "-B",
            build,
            f"-DTensorRT_INCLUDE_DIR={include}",
            f"-DTERDIT_KERNELS_PREBUILT={archive}",
            "-DTERDIT_WARNINGS_AS_ERRORS=ON",
            "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON",
            *extra,
        ],
        timeout=300,
        env=env,
    )


def _defined_dynamic_symbols(library):
    out = subprocess.run(
        ["nm", "-D", "--defined-only", library], capture_output=True, text=True, check=True
    ).stdout
    return sorted(line.split()[-1] for line in out.splitlines() if line.strip())


@pytest.mark.parametrize("version", list(VERSIONS))
def test_plugin_builds_and_passes_host_tests(version, request, tmp_path):
    include = _headers(version)
    archive = request.getfixturevalue("kernels_archive")
    configure = _configure_plugin(tmp_path, include, archive)
    assert re.search(
        r"-- TernaryMatMul TensorRT plugin: building against TensorRT headers " + VERSIONS[version] + " in ",
        configure,
    ), configure
    assert "TerDiT kernels: prebuilt" in configure
    targets = ["terdit_trt_plugin", "ternaryMatMulHostTest", "ternaryMatMulLogicTest"]
    _run(["cmake", "--build", tmp_path, "-j", JOBS, "--target", *targets], timeout=900)
    output = _run(["ctest", "--test-dir", tmp_path, "--output-on-failure"], timeout=300)
    for name in ("ternaryMatMulLogicTest", "ternaryMatMulPluginExports", "ternaryMatMulHostTest"):
        assert re.search(rf"{name} \.+\s+Passed", output), output
    assert "100% tests passed, 0 tests failed out of 3" in output

    library = tmp_path / "libterdit_trt_plugin.so"
    assert _defined_dynamic_symbols(library) == ["getCreators", "setLoggerFinder"]
    # The kernels' device code (SASS and PTX fatbins) travels inside the plugin library.
    sections = subprocess.run(["objdump", "-h", library], capture_output=True, text=True, check=True).stdout
    assert ".nv_fatbin" in sections

    # The generated feature header agrees with the archive: fp8 only if the W1.58A8 launcher exists.
    symbols = subprocess.run(["nm", "--defined-only", archive], capture_output=True, text=True, check=True).stdout
    has_quantize = re.search(r" [TtWw] _ZN6terdit22launchQuantizeRowsE4m3E", symbols) is not None
    features = (tmp_path / "generated" / "ternaryMatMulKernelFeatures.h").read_text()
    assert f"#define TERDIT_KERNELS_HAVE_FP8 {int(has_quantize)}" in features

    # The fp8 branch compiles against these headers too (syntax only: without the kernels it cannot link).
    fp8_dir = tmp_path / "fp8-on"
    fp8_dir.mkdir()
    (fp8_dir / "ternaryMatMulKernelFeatures.h").write_text("#pragma once\n#define TERDIT_KERNELS_HAVE_FP8 1\n")
    commands = json.loads((tmp_path / "compile_commands.json").read_text())
    checked = 0
    for entry in commands:
        if Path(entry["file"]).name not in ("ternaryMatMulPlugin.cpp", "ternaryMatMulHostTest.cpp"):
            continue
        argv = shlex.split(entry["command"])
        _run([argv[0], f"-I{fp8_dir}", *argv[1:], "-fsyntax-only"], timeout=300)
        checked += 1
    assert checked == 2
