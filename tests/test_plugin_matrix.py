"""The TensorRT plugin against every TensorRT header release the project supports (docs/design.md section 5).

The public headers of TensorRT 10.0.1, 10.7.0, 10.16 and 11.1 live in ../shared/tensorrt-headers
beside the repository (CI has them there; a user's clone may not, and then each version skips with
the path it looked at). Nothing here needs a GPU or libnvinfer.

- configure only: CMake reads each release's version from NvInferVersion.h (10.0-10.7 write the
  numbers followed by a //!< comment, 10.16 and 11.x through TRT_*_ENTERPRISE macros).
- build matrix: the kernels are compiled once per session (the slow part; tests/native_build.py,
  shared with tests/test_kernels_build.py and the TensorRT tests) into libterdit_kernels_static.a;
  per release only the plugin, its logic and host tests are compiled against that release's headers
  with -Wall -Wextra -Werror, linked with that archive (TERDIT_KERNELS_PREBUILT), once per session
  (the TensorRT stand-in tests load the same 10.16 and 11.1 libraries), and ctest runs the logic
  test, the exports check and the dlopen host test of the real plugin library. The act_quant="fp8" branch, which is compiled in only once the
  kernels define launchQuantizeRowsE4m3, is compiled (syntax only) from the same compile commands.
- static registration: a stand-in libnvinfer.so.<major> (test/nvinferStub.cpp, built here) in a
  TensorRT_ROOT/lib or a pip-style site-packages/tensorrt_libs folder; CMake must find and link it,
  and the plugin must load with ctypes.CDLL (as polygraphy --plugins does) and register its creator
  through the stub's registry. This proves the find / link / load chain, not TensorRT's behaviour.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.native_build import ROOT, configure_plugin
from tests.native_build import nvcc as _nvcc
from tests.native_build import run as _run
from tests.native_build import tensorrt_include as _headers

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


def _defined_dynamic_symbols(library):
    out = subprocess.run(
        ["nm", "-D", "--defined-only", library], capture_output=True, text=True, check=True
    ).stdout
    return sorted(line.split()[-1] for line in out.splitlines() if line.strip())


@pytest.mark.parametrize("version", list(VERSIONS))
def test_plugin_builds_and_passes_host_tests(version, trt_plugin_build, tmp_path):
    _headers(version)
    build = trt_plugin_build(version)      # shared with the TensorRT stand-in tests
    configure, archive, build_dir = build.configure, build.archive, build.directory
    assert re.search(
        r"-- TernaryMatMul TensorRT plugin: building against TensorRT headers " + VERSIONS[version] + " in ",
        configure,
    ), configure
    assert "TerDiT kernels: prebuilt" in configure
    output = _run(["ctest", "--test-dir", build_dir, "--output-on-failure"], timeout=300)
    for name in ("ternaryMatMulLogicTest", "ternaryMatMulPluginExports", "ternaryMatMulHostTest"):
        assert re.search(rf"{name} \.+\s+Passed", output), output
    assert "100% tests passed, 0 tests failed out of 3" in output

    library = build.library
    assert _defined_dynamic_symbols(library) == ["getCreators", "setLoggerFinder"]
    # The kernels' device code (SASS and PTX fatbins) travels inside the plugin library.
    sections = subprocess.run(["objdump", "-h", library], capture_output=True, text=True, check=True).stdout
    assert ".nv_fatbin" in sections

    # The generated feature header agrees with the archive: fp8 only if the W1.58A8 launcher exists.
    symbols = subprocess.run(["nm", "--defined-only", archive], capture_output=True, text=True, check=True).stdout
    has_quantize = re.search(r" [TtWw] _ZN6terdit22launchQuantizeRowsE4m3E", symbols) is not None
    features = (build_dir / "generated" / "ternaryMatMulKernelFeatures.h").read_text()
    assert f"#define TERDIT_KERNELS_HAVE_FP8 {int(has_quantize)}" in features

    # The fp8 branch compiles against these headers too (syntax only: without the kernels it cannot link).
    fp8_dir = tmp_path / "fp8-on"
    fp8_dir.mkdir()
    (fp8_dir / "ternaryMatMulKernelFeatures.h").write_text("#pragma once\n#define TERDIT_KERNELS_HAVE_FP8 1\n")
    commands = json.loads((build_dir / "compile_commands.json").read_text())
    checked = 0
    for entry in commands:
        if Path(entry["file"]).name not in ("ternaryMatMulPlugin.cpp", "ternaryMatMulHostTest.cpp"):
            continue
        argv = shlex.split(entry["command"])
        _run([argv[0], f"-I{fp8_dir}", *argv[1:], "-fsyntax-only"], timeout=300)
        checked += 1
    assert checked == 2


def _build_nvinfer_stub(version, include, directory):
    """libnvinfer.so.<major> stand-in (test/nvinferStub.cpp) compiled against `include` into `directory`."""
    major = version.split(".")[0]
    cuda_include = Path(_nvcc()).resolve().parent.parent / "include"
    if not (cuda_include / "cuda_runtime_api.h").is_file():
        # /usr/local/bin/nvcc may be a wrapper script: ask nvcc where its headers are.
        dry = subprocess.run([_nvcc(), "--dryrun", "-x", "cu", "-c", "/dev/null"], capture_output=True, text=True)
        found = re.search(r"INCLUDES=\"?-I\"?([^\" ]+)", dry.stdout + dry.stderr)
        assert found, "cannot find the CUDA include directory"
        cuda_include = Path(found.group(1))
    directory.mkdir(parents=True, exist_ok=True)
    stub = directory / f"libnvinfer.so.{major}"
    _run(
        [
            shutil.which("c++") or shutil.which("g++"),
            "-std=c++17",
            "-shared",
            "-fPIC",
            "-O1",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-Wno-deprecated-declarations",
            f"-Wl,-soname,libnvinfer.so.{major}",
            "-Wl,--no-undefined",
            "-isystem",
            include,
            "-isystem",
            cuda_include,
            PLUGIN_DIR / "test" / "nvinferStub.cpp",
            "-o",
            stub,
        ],
        timeout=300,
    )
    return stub


LOAD_LIKE_POLYGRAPHY = textwrap.dedent(
    """
    import ctypes, sys
    plugin, stub_soname = sys.argv[1], sys.argv[2]
    ctypes.CDLL(plugin)                 # polygraphy --plugins: a plain dlopen, no getCreators call
    stub = ctypes.CDLL(stub_soname)     # the libnvinfer the plugin's NEEDED entry loaded
    buffer = ctypes.create_string_buffer(512)
    for i in range(stub.terditStubCreatorCount()):
        stub.terditStubCreatorEntry(i, buffer, len(buffer))
        print("registered:", buffer.value.decode())
    """
)


@pytest.mark.parametrize("version, layout", [("10.16", "TensorRT_ROOT"), ("11.1", "pip")])
def test_static_registration_links_a_versioned_nvinfer_and_loads_with_ctypes(version, layout, request, tmp_path):
    include = _headers(version)
    archive = request.getfixturevalue("cuda_kernels_any_arch").archive
    major = version.split(".")[0]
    env = dict(os.environ)
    if layout == "TensorRT_ROOT":
        # A TensorRT tarball: lib/libnvinfer.so.<major> only (no development symlink).
        root = tmp_path / "TensorRT"
        stub = _build_nvinfer_stub(version, include, root / "lib")
        extra = [f"-DTensorRT_ROOT={root}"]
    else:
        # pip install tensorrt-cu13-libs: site-packages/tensorrt_libs/libnvinfer.so.<major>.
        site = tmp_path / "site-packages"
        stub = _build_nvinfer_stub(version, include, site / "tensorrt_libs")
        (site / "tensorrt_libs" / "__init__.py").write_text("raise ImportError('must not be imported by CMake')\n")
        env["PYTHONPATH"] = str(site)
        extra = [f"-DPython3_EXECUTABLE={sys.executable}"]
    build = tmp_path / "build"
    configure = configure_plugin(build, include, archive, "-DTERDIT_PLUGIN_STATIC_REGISTRATION=ON", *extra, env=env)
    assert f"static registration ON (trtexec --staticPlugins, polygraphy --plugins); linked with {stub};" in configure
    if layout == "pip":
        assert f"pip package tensorrt_libs found in {stub.parent}" in configure
    _run(["cmake", "--build", build, "-j", JOBS, "--target", "terdit_trt_plugin"], timeout=900)
    exports = _run(["ctest", "--test-dir", build, "--output-on-failure", "-R", "Exports"], timeout=300)
    assert "100% tests passed, 0 tests failed out of 1" in exports

    library = build / "libterdit_trt_plugin.so"
    dynamic = subprocess.run(["readelf", "-d", library], capture_output=True, text=True, check=True).stdout
    assert f"Shared library: [libnvinfer.so.{major}]" in dynamic
    assert re.search(rf"(RUNPATH|RPATH).*\[{re.escape(str(stub.parent))}\]", dynamic), dynamic
    undefined = subprocess.run(["nm", "-D", "--undefined-only", library], capture_output=True, text=True, check=True)
    assert "getPluginRegistry" in undefined.stdout

    # Load it as polygraphy does; the build tree's RUNPATH finds the stub, whose registry records the call.
    loaded = _run([sys.executable, "-c", LOAD_LIKE_POLYGRAPHY, library, f"libnvinfer.so.{major}"], timeout=60, env=env)
    assert loaded.splitlines() == ["registered: PLUGIN CREATOR_V3ONE|TernaryMatMul|1||3"]


def test_static_registration_refuses_an_nvinfer_of_another_major(request, tmp_path):
    include = _headers("10.16")
    other = _headers("11.1")
    archive = request.getfixturevalue("cuda_kernels_any_arch").archive
    root = tmp_path / "TensorRT"
    stub = _build_nvinfer_stub("11.1", other, root / "lib")
    # Only TensorRT 11's soname: the 10.16 headers look for libnvinfer.so / libnvinfer.so.10 and find none.
    configure = configure_plugin(
        tmp_path / "b1", include, archive, "-DTERDIT_PLUGIN_STATIC_REGISTRATION=ON", f"-DTensorRT_ROOT={root}"
    )
    assert "libnvinfer not found, so getPluginRegistry is left for the host process to provide" in configure
    # A development symlink libnvinfer.so -> libnvinfer.so.11 is found, and refused for 10.x headers.
    (root / "lib" / "libnvinfer.so").symlink_to(stub.name)
    result = subprocess.run(
        [
            "cmake",
            "-S",
            ROOT,
            "-B",
            tmp_path / "b2",
            f"-DTensorRT_INCLUDE_DIR={include}",
            f"-DTERDIT_KERNELS_PREBUILT={archive}",
            "-DTERDIT_PLUGIN_STATIC_REGISTRATION=ON",
            f"-DTensorRT_ROOT={root}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    message = " ".join((result.stdout + result.stderr).split())
    assert "is TensorRT 11 (libnvinfer.so.11) but the headers" in message
    assert "are TensorRT 10.16.0" in message
