import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---- native builds, once per session (tests/native_build.py) ------------------------------------

@pytest.fixture(scope="session")
def cuda_kernels(tmp_path_factory):
    """plugins/kernels built for every architecture of the default -gencode list: the static
    library and libterdit_kernels.so from one compile."""
    from tests import native_build
    return native_build.build_kernels(tmp_path_factory.mktemp("kernels-all-archs"))


@pytest.fixture(scope="session")
def cuda_kernels_any_arch(request, tmp_path_factory):
    """The kernels for tests that only link them: the every-architecture build when a test of
    this session needs that one anyway, else a build for one architecture."""
    from tests import native_build
    if any("cuda_kernels" in item.fixturenames for item in request.session.items):
        return request.getfixturevalue("cuda_kernels")
    return native_build.build_kernels(tmp_path_factory.mktemp("kernels-one-arch"),
                                      native_build.ONE_ARCH)


@pytest.fixture(scope="session")
def trt_plugin_build(request, tmp_path_factory):
    """trt_plugin_build(version): the TensorRT plugin library and its host tests built against
    that release's headers (skips without them), once per release and session."""
    from tests import native_build
    builds = {}

    def build(version):
        if version not in builds:
            native_build.tensorrt_include(version)
            archive = request.getfixturevalue("cuda_kernels_any_arch").archive
            builds[version] = native_build.build_plugin(
                tmp_path_factory.mktemp(f"trt-plugin-{version}"), version, archive)
        return builds[version]

    return build
