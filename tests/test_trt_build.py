"""build_engine and the TensorRT backend against a stand-in `tensorrt` module (no TensorRT, no GPU).

What they cover: the missing-TensorRT message, batch profile rules, atomic plan + build-record
writes, the build-record checks, the CLI glue, and build_engine's orchestration against a stand-in
`tensorrt` module that records the calls (so the glue runs somewhere; whether real TensorRT accepts
the same calls is only checked where TensorRT is installed).
"""

import hashlib
import json
import os
import subprocess
import sys
import types

import pytest

from runtime import trt_build, trt_record
from runtime.backends import trt_backend

ENV = trt_record.EngineEnvironment(
    tensorrt_version="10.13.0.35", gpu_name="NVIDIA H200", compute_capability="9.0"
)
DIT_INPUTS = [("x", (-1, 4, 32, 32)), ("t", (-1,)), ("y", (-1,))]


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)


@pytest.fixture
def artifacts(tmp_path):
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(b"onnx bytes")
    plugin_path = tmp_path / "libterdit_trt_plugin.so"
    plugin_path.write_bytes(b"plugin bytes")
    return onnx_path, plugin_path


def _record(onnx_path, plugin_path, plan, environment=ENV):
    return trt_record.build_record(
        environment,
        plugin_path=plugin_path,
        onnx_path=onnx_path,
        plan_sha256=hashlib.sha256(plan).hexdigest(),
        precision="bf16",
        batch_profile=trt_build.BatchRange(1, 2, 16),
        input_shapes=trt_build.batch_profile_shapes(DIT_INPUTS, trt_build.BatchRange(1, 2, 16)),
        plugin_layers=3,
    )


# ---- build_engine against a recording stand-in for the tensorrt module ---------------------------


class _Enum:
    def __init__(self, *names):
        for name in names:
            setattr(self, name, name)


def _fake_tensorrt(version="10.13.0.35", weak_typing=True, creator_registered=True):
    """A `tensorrt` stand-in with the calls build_engine makes. The "ONNX file" is JSON:
    {"inputs": [[name, shape], ...], "plugin_dtypes": [...], "errors": [...]}."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = []
    trt.DataType = _Enum("FLOAT", "HALF", "BF16", "INT32", "INT64")
    trt.LayerType = _Enum("PLUGIN_V3", "CONSTANT")
    trt.MemoryPoolType = _Enum("WORKSPACE")
    trt.BuilderFlag = _Enum("TF32", *(("FP16", "BF16") if weak_typing else ()))

    class Logger:
        WARNING = "WARNING"

        def __init__(self, severity):
            self.severity = severity

    class Registry:
        def __init__(self):
            self.loaded = []

        def load_library(self, path):
            self.loaded.append(path)
            trt.calls.append(("load_library", path))
            return object()

        def get_creator(self, name, version, namespace):
            trt.calls.append(("get_creator", name, version, namespace))
            return object() if creator_registered and self.loaded else None

    registry = Registry()

    class Tensor:
        def __init__(self, name, shape, dtype="FLOAT"):
            self.name, self.shape, self.dtype = name, shape, dtype

    class Layer:
        def __init__(self, kind, dtype):
            self.type = kind
            self._input = Tensor("X", (-1, 256), dtype)

        def get_input(self, index):
            return self._input

    class Network:
        def __init__(self, flags):
            self.flags, self.inputs, self.layers = flags, [], []

        num_inputs = property(lambda self: len(self.inputs))
        num_layers = property(lambda self: len(self.layers))

        def get_input(self, i):
            return self.inputs[i]

        def get_layer(self, i):
            return self.layers[i]

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.errors = network, []

        def parse_from_file(self, path):
            with open(path) as f:
                spec = json.load(f)
            self.errors = spec.get("errors", [])
            self.network.inputs = [Tensor(name, tuple(shape)) for name, shape in spec["inputs"]]
            self.network.layers = [Layer("CONSTANT", "FLOAT")] + [
                Layer("PLUGIN_V3", dtype) for dtype in spec["plugin_dtypes"]
            ]
            trt.calls.append(("parse_from_file", path))
            return not self.errors

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, low, opt, high):
            self.shapes[name] = (tuple(low), tuple(opt), tuple(high))

    class Config:
        def __init__(self):
            self.flags, self.pools, self.profiles = [], {}, []

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool] = size

        def set_flag(self, flag):
            self.flags.append(flag)

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            trt.network = Network(flags)
            return trt.network

        def create_builder_config(self):
            trt.config = Config()
            return trt.config

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            trt.calls.append(("build_serialized_network",))
            return bytearray(
                b"serialized engine for " + ",".join(t.name for t in network.inputs).encode()
            )

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser
    trt.get_plugin_registry = lambda: registry
    return trt


def _fake_onnx(tmp_path, inputs, plugin_dtypes, errors=()):
    path = tmp_path / "fake.onnx"
    path.write_text(
        json.dumps({"inputs": inputs, "plugin_dtypes": plugin_dtypes, "errors": list(errors)})
    )
    return path


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(trt_record, "_gpu_properties", lambda device: ("NVIDIA H200", "9.0"))
    monkeypatch.setattr(trt_build, "_LOADED_PLUGINS", {})


CFG_INPUTS = [["x", [-1, 4, 32, 32]], ["t", [-1]], ["y", [-1]], ["cfg_scale", []]]


def test_build_engine_weakly_typed_bf16(fake_gpu, monkeypatch, artifacts, tmp_path):
    _, plugin_path = artifacts
    trt = _fake_tensorrt(weak_typing=True)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    onnx_path = _fake_onnx(tmp_path, CFG_INPUTS, ["FLOAT"] * 3)
    plan_path = trt_build.build_engine(
        onnx_path,
        plugin_path,
        tmp_path / "out" / "model.plan",
        precision="bf16",
        min_batch=1,
        opt_batch=4,
        max_batch=8,
        workspace_gib=2,
    )

    assert trt.network.flags == 0
    assert trt.config.flags == ["BF16"]
    assert trt.config.pools == {"WORKSPACE": 2 << 30}
    (profile,) = trt.config.profiles
    assert profile.shapes == {
        "x": ((1, 4, 32, 32), (4, 4, 32, 32), (8, 4, 32, 32)),
        "t": ((1,), (4,), (8,)),
        "y": ((1,), (4,), (8,)),
    }
    assert ("get_creator", "TernaryMatMul", "1", "") in trt.calls
    assert plan_path.read_bytes() == b"serialized engine for x,t,y,cfg_scale"
    record = trt_record.check_sidecar(
        plan_path, plugin_path, trt_record.EngineEnvironment("10.13.0.35", "NVIDIA H200", "9.0")
    )
    assert record["precision"] == "bf16"
    assert record["batch_profile"] == {"min": 1, "opt": 4, "max": 8}
    assert record["plugin_layers"] == 3
    assert record["onnx"]["sha256"] == hashlib.sha256(onnx_path.read_bytes()).hexdigest()


def test_build_engine_strongly_typed_checks_onnx_precision(
    fake_gpu, monkeypatch, artifacts, tmp_path
):
    _, plugin_path = artifacts
    trt = _fake_tensorrt(version="11.1.0", weak_typing=False)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    fp32_onnx = _fake_onnx(tmp_path, CFG_INPUTS, ["FLOAT"] * 2)
    with pytest.raises(ValueError, match="strongly typed.*inputs are FLOAT, not bf16"):
        trt_build.build_engine(fp32_onnx, plugin_path, tmp_path / "model.plan", precision="bf16")
    assert not (tmp_path / "model.plan").exists()

    bf16_onnx = _fake_onnx(tmp_path, CFG_INPUTS, ["BF16"] * 2)
    plan_path = trt_build.build_engine(bf16_onnx, plugin_path, tmp_path / "model.plan", precision="bf16")
    assert trt.config.flags == []
    assert trt_record.check_sidecar(
        plan_path, plugin_path, trt_record.EngineEnvironment("11.1.0", "NVIDIA H200", "9.0")
    )


def test_build_engine_static_batch(fake_gpu, monkeypatch, artifacts, tmp_path):
    _, plugin_path = artifacts
    trt = _fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    onnx_path = _fake_onnx(tmp_path, [["x", [2, 4, 32, 32]], ["t", [2]], ["y", [2]]], ["FLOAT"])
    with pytest.raises(
        ValueError, match=r"fixed batch \(x \[2, 4, 32, 32\].*apply only to a dynamic batch"
    ):
        trt_build.build_engine(onnx_path, plugin_path, tmp_path / "model.plan", max_batch=8)
    plan_path = trt_build.build_engine(onnx_path, plugin_path, tmp_path / "model.plan")
    assert trt.config.profiles == []
    record = json.loads(trt_record.sidecar_path(plan_path).read_text())
    assert record["batch_profile"] is None
    assert record["input_shapes"]["x"]["max"] == [2, 4, 32, 32]


def test_build_engine_reports_parser_errors_and_missing_plugin(
    fake_gpu, monkeypatch, artifacts, tmp_path
):
    _, plugin_path = artifacts
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt())
    broken = _fake_onnx(tmp_path, CFG_INPUTS, [], errors=["node 3: unsupported op Foo"])
    with pytest.raises(ValueError, match="could not parse .*node 3: unsupported op Foo"):
        trt_build.build_engine(broken, plugin_path, tmp_path / "model.plan")

    no_plugin_layers = _fake_onnx(tmp_path, CFG_INPUTS, [])
    with pytest.warns(UserWarning, match="parsed without any plugin layer"):
        trt_build.build_engine(no_plugin_layers, plugin_path, tmp_path / "model.plan")

    monkeypatch.setattr(trt_build, "_LOADED_PLUGINS", {})
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(creator_registered=False))
    with pytest.raises(ValueError, match="no creator TernaryMatMul version 1"):
        trt_build.build_engine(no_plugin_layers, plugin_path, tmp_path / "model.plan")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A tiny export directory with a stand-in plan and plugin library beside it."""
    import torch

    from exporter import ExportOptions, export
    from terdit import TerDiTConfig, save_checkpoint
    from tests.helpers import random_model
    root = tmp_path_factory.mktemp("trt")
    torch.manual_seed(0)
    save_checkpoint(random_model(TerDiTConfig.from_name("TerDiT-tiny")), root / "ck")
    export(root / "ck", root / "onnx", ExportOptions(validate=False), log=lambda *_: None)
    (root / "onnx" / "model.plan").write_bytes(b"plan")
    (root / "lib.so").write_bytes(b"plugin")
    return root


def test_backend_without_tensorrt_fails_with_install_hint(monkeypatch, export_dir):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(trt_record.TensorRTUnavailable, match="pip install tensorrt-cu12"):
        trt_backend.TensorRTBackend(export_dir / "onnx", export_dir / "lib.so")


def test_backend_needs_cuda(monkeypatch, export_dir):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present; this checks the message on CPU-only machines")
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt())
    with pytest.raises(trt_record.TensorRTUnavailable, match="needs a CUDA GPU"):
        trt_backend.TensorRTBackend(export_dir / "onnx", export_dir / "lib.so")


def test_importing_the_module_does_not_import_tensorrt():
    code = "import sys, runtime.trt_build, runtime.trt_record, runtime.backends.trt_backend; print('tensorrt' in sys.modules)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    )
    assert out.stdout.strip() == "False"
