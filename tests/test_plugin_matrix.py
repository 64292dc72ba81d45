"""The TensorRT plugin against every TensorRT header release the project supports (DESIGN section 5).

The public headers of TensorRT 10.0.1, 10.7.0, 10.16 and 11.1 live in ../shared/tensorrt-headers
beside the repository (CI has them there; a user's clone may not, and then each version skips with
the path it looked at). Nothing here needs a GPU or libnvinfer.

- configure only: CMake reads each release's version from NvInferVersion.h (10.0-10.7 write the
  numbers followed by a //!< comment, 10.16 and 11.x through TRT_*_ENTERPRISE macros).
"""

import os
import re
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
