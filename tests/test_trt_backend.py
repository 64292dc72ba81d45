"""`python -m runtime sample --backend trt` end to end through the stand-in `tensorrt` modules of
10.16 and 11.1 (tests/trt_standin) with the real plugin library (built once per session against
each release's headers, tests/conftest.py), and the refusals of a plan, a plugin library or an
export file that changed after `build-engine`. The stand-in engine runs the export's ONNX file in
ONNX Runtime, so the images must be those of `--backend ort --kernels function`; what this shows
is the CLI -> backend -> TensorRT call chain and its checks, not TensorRT's numerics. The one
piece of the backend that touches device memory (TorchCudaTransfer) is replaced by the stand-in's
host buffers (HostTransfer), and the GPU the build record names by a fixed one."""
from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

from exporter import ExportOptions, export
from runtime.runtime_cli import main as runtime_main
from runtime.tensorrt import backend as trt_backend
from runtime.tensorrt import engine_build as trt_build
from runtime.tensorrt import record as trt_record
from tests.helpers import pixel_checkpoint
from tests.trt_standin import VERSIONS, HostTransfer, make_tensorrt

GPU = ("NVIDIA H200", "9.0")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Two tiny pixel-space exports (1 channel, 8x8, 3 classes) of different weights, made
    before a stand-in `tensorrt` is installed (torch's exporter inspects sys.modules)."""
    root = tmp_path_factory.mktemp("trt-backend")
    for name, seed in (("onnx", 5), ("other", 6)):
        pixel_checkpoint(root / f"ck-{name}", seed=seed, num_classes=3)
        export(root / f"ck-{name}", root / name, ExportOptions(validate=False),
               log=lambda *_: None)
    export(root / "ck-onnx", root / "folded", ExportOptions(cfg="standard", validate=False),
           log=lambda *_: None)
    return root


@pytest.fixture(scope="module")
def plugins(trt_plugin_build):
    return {version: trt_plugin_build(version).library for version in VERSIONS}


@pytest.fixture(params=VERSIONS)
def release(request, monkeypatch):
    """The stand-in of one release installed as `tensorrt`, on a fixed GPU, with host buffers."""
    monkeypatch.setitem(sys.modules, "tensorrt", make_tensorrt(request.param))
    monkeypatch.setattr(trt_record, "_gpu_properties", lambda device: GPU)
    monkeypatch.setattr(trt_build, "_LOADED_PLUGINS", {})
    monkeypatch.setattr(trt_backend, "TorchCudaTransfer", lambda device: HostTransfer())
    return request.param


@pytest.fixture
def engine(release, plugins, exports, tmp_path, capsys):
    """(export directory with its model.plan, plugin library): a copy of the export, built with
    `python -m runtime build-engine`."""
    export_dir = tmp_path / "onnx"
    shutil.copytree(exports / "onnx", export_dir)
    plugin = plugins[release]
    assert runtime_main(["build-engine", str(export_dir), "--plugin", str(plugin),
                         "-o", str(export_dir / "model.plan")]) == 0, capsys.readouterr().err
    capsys.readouterr()
    return export_dir, plugin


def _sample(export_dir, out, *extra):
    return runtime_main(["sample", "--model", str(export_dir), "--classes", "0", "1", "2",
                         "--num", "3", "--steps", "3", "--seed", "4", "--no-progress",
                         "--out", str(out), *extra])


def test_sample_with_the_trt_backend(engine, tmp_path, capsys):
    export_dir, plugin = engine
    code = _sample(export_dir, tmp_path / "trt", "--backend", "trt", "--plugin", str(plugin))
    io = capsys.readouterr()
    assert code == 0, io.err
    assert f"wrote 3 new image(s) to {tmp_path / 'trt'}" in io.out
    assert len(list((tmp_path / "trt" / "images").glob("*.png"))) == 3
    plan_sha = json.loads(trt_record.sidecar_path(export_dir / "model.plan").read_text())[
        "plan_sha256"]
    assert plan_sha in (tmp_path / "trt" / "samples.json").read_text()

    assert _sample(export_dir, tmp_path / "ort", "--backend", "ort", "--kernels", "function") == 0
    trt_images = np.load(tmp_path / "trt" / "samples.npz")["arr_0"].astype(int)
    ort_images = np.load(tmp_path / "ort" / "samples.npz")["arr_0"].astype(int)
    assert trt_images.shape == ort_images.shape and len(trt_images) == 3
    assert np.abs(trt_images - ort_images).max() <= 1


def _refused(export_dir, plugin, out, capsys):
    code = _sample(export_dir, out, "--backend", "trt", "--plugin", str(plugin))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert not (out / "images").exists() or not any((out / "images").iterdir())
    return err


def test_a_changed_plan_is_refused(engine, tmp_path, capsys):
    export_dir, plugin = engine
    with open(export_dir / "model.plan", "ab") as f:
        f.write(b"\0")
    err = _refused(export_dir, plugin, tmp_path / "s", capsys)
    assert "field 'plan_sha256'" in err and "plugin.sha256" not in err
    assert "python -m runtime build-engine" in err


def test_another_plugin_library_is_refused(engine, release, plugins, tmp_path, capsys):
    export_dir, _ = engine
    other = plugins[next(v for v in VERSIONS if v != release)]
    err = _refused(export_dir, other, tmp_path / "s", capsys)
    assert "field 'plugin.sha256'" in err and "plan_sha256" not in err


def test_a_changed_export_file_is_refused(engine, tmp_path, capsys):
    export_dir, plugin = engine
    model = export_dir / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    err = _refused(export_dir, plugin, tmp_path / "s", capsys)
    assert f"{model}: content differs from" in err and "re-export the model" in err


def test_a_plan_of_another_export_is_refused(engine, exports, tmp_path, capsys):
    export_dir, plugin = engine
    other = tmp_path / "other"
    shutil.copytree(exports / "other", other)
    for name in ("model.plan", "model.plan.json"):
        shutil.copy(export_dir / name, other / name)
    err = _refused(other, plugin, tmp_path / "s", capsys)
    assert "field 'onnx.sha256'" in err and "plan_sha256" not in err


def test_trt_follows_the_cfg_scale_rule(engine, exports, release, plugins, tmp_path, capsys):
    """The one cfg_scale rule (runtime/backends/protocol.py): the plan of a folded export needs
    cfg_scale, a plan without guidance refuses one."""
    from runtime import BackendError, open_backend
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 1, 8, 8), dtype=np.float32)
    t, y = np.full(2, 500.0, np.float32), np.array([0, 2], np.int64)
    export_dir, plugin = engine
    plain = open_backend(export_dir, "trt", plugin=plugin)
    assert plain.forward(x, t, y).shape == (2, 2, 8, 8)
    with pytest.raises(BackendError, match="forward takes no cfg_scale"):
        plain.forward(x, t, y, 3.0)
    folded_dir = tmp_path / "folded"
    shutil.copytree(exports / "folded", folded_dir)
    assert runtime_main(["build-engine", str(folded_dir), "--plugin", str(plugin)]) == 0
    capsys.readouterr()
    folded = open_backend(folded_dir, "trt", plugin=plugin)
    guided = folded.forward(x, t, y, 3.0)
    assert guided.shape == (2, 2, 8, 8) and not np.allclose(guided, folded.forward(x, t, y, 1.0))
    with pytest.raises(BackendError, match="needs cfg_scale"):
        folded.forward(x, t, y)
