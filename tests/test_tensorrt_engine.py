"""Tests of runtime/tensorrt_engine.py that need neither TensorRT nor a GPU.

What they cover: the missing-TensorRT message, batch profile rules, atomic plan + build-record
writes, the build-record checks, the CLI glue, and build_engine's orchestration against a stand-in
`tensorrt` module that records the calls (so the glue runs somewhere; whether real TensorRT accepts
the same calls is only checked where TensorRT is installed).
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import types

import pytest

from runtime import tensorrt_engine as te

ENV = te.EngineEnvironment(
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
    return te.build_record(
        environment,
        plugin_path=plugin_path,
        onnx_path=onnx_path,
        plan_sha256=hashlib.sha256(plan).hexdigest(),
        precision="bf16",
        batch_profile=te.BatchRange(1, 2, 16),
        input_shapes=te.batch_profile_shapes(DIT_INPUTS, te.BatchRange(1, 2, 16)),
        plugin_layers=3,
    )


# ---- missing TensorRT ---------------------------------------------------------------------------


def test_missing_tensorrt_says_how_to_install(no_tensorrt):
    with pytest.raises(ImportError, match="pip install tensorrt-cu12") as info:
        te.import_tensorrt()
    assert "NVIDIA's package index" in str(info.value)


def test_build_engine_without_tensorrt_fails_with_install_hint(no_tensorrt, artifacts, tmp_path):
    onnx_path, plugin_path = artifacts
    with pytest.raises(ImportError, match="pip install tensorrt-cu12"):
        te.build_engine(onnx_path, plugin_path, tmp_path / "model.plan", precision="bf16")
    assert not (tmp_path / "model.plan").exists()


def test_arguments_are_checked_before_tensorrt_is_needed(no_tensorrt, artifacts, tmp_path):
    onnx_path, plugin_path = artifacts
    plan = tmp_path / "model.plan"
    with pytest.raises(ValueError, match="precision='int8' must be one of fp32, fp16, bf16"):
        te.build_engine(onnx_path, plugin_path, plan, precision="int8")
    with pytest.raises(ValueError, match="min <= opt <= max"):
        te.build_engine(onnx_path, plugin_path, plan, min_batch=8, opt_batch=4)
    with pytest.raises(ValueError, match="max_batch=0 must be a positive integer"):
        te.build_engine(onnx_path, plugin_path, plan, max_batch=0)
    with pytest.raises(ValueError, match="workspace_gib=0"):
        te.build_engine(onnx_path, plugin_path, plan, workspace_gib=0)
    with pytest.raises(FileNotFoundError, match="plugin library .*missing.so not found"):
        te.build_engine(onnx_path, tmp_path / "missing.so", plan)


def test_backend_without_tensorrt_fails_with_install_hint(no_tensorrt, tmp_path):
    with pytest.raises(ImportError, match="pip install tensorrt-cu12"):
        te.TensorRTBackend(tmp_path / "model.plan", tmp_path / "lib.so")


# ---- batch profile ------------------------------------------------------------------------------


def test_resolve_batch_range_defaults_and_consistency():
    assert te.resolve_batch_range(None, None, None) == te.BatchRange(
        te.DEFAULT_MIN_BATCH, te.DEFAULT_OPT_BATCH, te.DEFAULT_MAX_BATCH
    )
    assert te.resolve_batch_range(4, None, None) == te.BatchRange(4, 4, 16)
    assert te.resolve_batch_range(None, None, 1) == te.BatchRange(1, 1, 1)
    assert te.resolve_batch_range(None, 32, None) == te.BatchRange(1, 32, 32)
    assert te.resolve_batch_range(2, 8, 64) == te.BatchRange(2, 8, 64)
    with pytest.raises(ValueError, match="min <= opt <= max"):
        te.resolve_batch_range(1, 32, 16)
    with pytest.raises(ValueError, match="opt_batch=-1"):
        te.resolve_batch_range(None, -1, None)
    with pytest.raises(ValueError, match="min_batch=True"):
        te.resolve_batch_range(True, None, None)


def test_batch_profile_covers_dynamic_batch_inputs_only():
    inputs = [*DIT_INPUTS, ("cfg_scale", ())]
    shapes = te.batch_profile_shapes(inputs, te.BatchRange(1, 4, 8))
    assert shapes == {
        "x": {"min": (1, 4, 32, 32), "opt": (4, 4, 32, 32), "max": (8, 4, 32, 32)},
        "t": {"min": (1,), "opt": (4,), "max": (8,)},
        "y": {"min": (1,), "opt": (4,), "max": (8,)},
    }
    assert (
        te.batch_profile_shapes([("x", (2, 4, 32, 32)), ("t", (2,))], te.BatchRange(1, 1, 1)) == {}
    )
    with pytest.raises(
        ValueError, match=r"input 'x' has shape \[-1, 4, -1, -1\]: only the batch dimension"
    ):
        te.batch_profile_shapes([("x", (-1, 4, -1, -1))], te.BatchRange(1, 1, 1))


def test_check_batch():
    te.check_batch("x", (4, 4, 32, 32), (1, 4, 32, 32), (16, 4, 32, 32))
    with pytest.raises(
        ValueError, match=r"input 'x' has shape \[32, 4, 32, 32\], outside the engine's profile"
    ):
        te.check_batch("x", (32, 4, 32, 32), (1, 4, 32, 32), (16, 4, 32, 32))
    with pytest.raises(ValueError, match="outside the engine's profile"):
        te.check_batch("x", (4, 4, 64, 64), (1, 4, 32, 32), (16, 4, 32, 32))
    with pytest.raises(ValueError, match="outside the engine's profile"):
        te.check_batch("t", (4, 1), (1,), (16,))


# ---- atomic writes and build records ------------------------------------------------------------


def test_write_plan_writes_plan_and_sidecar_atomically(artifacts, tmp_path):
    onnx_path, plugin_path = artifacts
    plan_path = tmp_path / "engines" / "model.plan"
    plan = b"\x00plan bytes\xff" * 100
    te.write_plan(plan_path, plan, _record(onnx_path, plugin_path, plan))
    assert plan_path.read_bytes() == plan
    record = json.loads(te.sidecar_path(plan_path).read_text())
    assert te.sidecar_path(plan_path) == tmp_path / "engines" / "model.plan.json"
    assert record["format"] == te.SIDECAR_FORMAT
    assert record["tensorrt_version"] == ENV.tensorrt_version
    assert record["gpu"] == {"name": "NVIDIA H200", "compute_capability": "9.0"}
    assert record["plugin"] == {
        "file": plugin_path.name,
        "sha256": hashlib.sha256(b"plugin bytes").hexdigest(),
    }
    assert record["onnx"] == {
        "file": onnx_path.name,
        "sha256": hashlib.sha256(b"onnx bytes").hexdigest(),
    }
    assert record["plan_sha256"] == hashlib.sha256(plan).hexdigest()
    assert record["precision"] == "bf16"
    assert record["batch_profile"] == {"min": 1, "opt": 2, "max": 16}
    assert record["input_shapes"]["x"] == {
        "min": [1, 4, 32, 32],
        "opt": [2, 4, 32, 32],
        "max": [16, 4, 32, 32],
    }
    assert sorted(p.name for p in plan_path.parent.iterdir()) == ["model.plan", "model.plan.json"]


def test_write_plan_failure_keeps_previous_files_and_leaves_no_temporaries(
    artifacts, tmp_path, monkeypatch
):
    onnx_path, plugin_path = artifacts
    plan_path = tmp_path / "model.plan"
    old = b"old plan"
    te.write_plan(plan_path, old, _record(onnx_path, plugin_path, old))
    old_sidecar = te.sidecar_path(plan_path).read_text()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(te.os, "replace", failing_replace)
    new = b"new plan"
    with pytest.raises(OSError, match="disk full"):
        te.write_plan(plan_path, new, _record(onnx_path, plugin_path, new))
    assert plan_path.read_bytes() == old
    assert te.sidecar_path(plan_path).read_text() == old_sidecar
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "libterdit_trt_plugin.so",
        "model.onnx",
        "model.plan",
        "model.plan.json",
    ]


def test_write_plan_refuses_a_record_of_another_plan(artifacts, tmp_path):
    onnx_path, plugin_path = artifacts
    with pytest.raises(ValueError, match="plan_sha256"):
        te.write_plan(
            tmp_path / "model.plan", b"plan", _record(onnx_path, plugin_path, b"other plan")
        )
    assert not (tmp_path / "model.plan").exists()


@pytest.fixture
def written_plan(artifacts, tmp_path):
    onnx_path, plugin_path = artifacts
    plan_path = tmp_path / "model.plan"
    plan = b"plan bytes"
    te.write_plan(plan_path, plan, _record(onnx_path, plugin_path, plan))
    return plan_path, plugin_path


def test_check_sidecar_accepts_matching_environment(written_plan):
    plan_path, plugin_path = written_plan
    record = te.check_sidecar(plan_path, plugin_path, ENV)
    assert record["precision"] == "bf16"


@pytest.mark.parametrize(
    "environment, field, built, here",
    [
        (
            te.EngineEnvironment("10.14.1.48", "NVIDIA H200", "9.0"),
            "tensorrt_version",
            "10.13.0.35",
            "10.14.1.48",
        ),
        (
            te.EngineEnvironment("10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0"),
            "gpu.name",
            "NVIDIA H200",
            "NVIDIA H100 80GB HBM3",
        ),
        (
            te.EngineEnvironment("10.13.0.35", "NVIDIA H200", "8.0"),
            "gpu.compute_capability",
            "9.0",
            "8.0",
        ),
    ],
)
def test_check_sidecar_names_the_mismatching_field(written_plan, environment, field, built, here):
    plan_path, plugin_path = written_plan
    with pytest.raises(te.EngineMismatchError) as info:
        te.check_sidecar(plan_path, plugin_path, environment)
    message = str(info.value)
    assert f"field '{field}': the engine was built with '{built}', here it is '{here}'" in message
    assert "python -m runtime build-engine" in message


def test_check_sidecar_refuses_another_plugin_or_plan(written_plan):
    plan_path, plugin_path = written_plan
    built_plugin = hashlib.sha256(plugin_path.read_bytes()).hexdigest()
    plugin_path.write_bytes(b"rebuilt plugin")
    with pytest.raises(te.EngineMismatchError, match="field 'plugin.sha256'") as info:
        te.check_sidecar(plan_path, plugin_path, ENV)
    assert built_plugin in str(info.value)
    assert hashlib.sha256(b"rebuilt plugin").hexdigest() in str(info.value)
    assert "plan_sha256" not in str(info.value)

    plugin_path.write_bytes(b"plugin bytes")
    plan_path.write_bytes(b"a plan written without its record")
    with pytest.raises(te.EngineMismatchError, match="field 'plan_sha256'"):
        te.check_sidecar(plan_path, plugin_path, ENV)


def test_check_sidecar_lists_every_mismatch(written_plan):
    plan_path, plugin_path = written_plan
    with pytest.raises(te.EngineMismatchError) as info:
        te.check_sidecar(
            plan_path, plugin_path, te.EngineEnvironment("11.1.0", "NVIDIA H100", "9.0")
        )
    assert "'tensorrt_version'" in str(info.value) and "'gpu.name'" in str(info.value)


def test_check_sidecar_missing_corrupt_or_future_record(written_plan):
    plan_path, plugin_path = written_plan
    sidecar = te.sidecar_path(plan_path)
    sidecar.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid build record"):
        te.check_sidecar(plan_path, plugin_path, ENV)
    sidecar.write_text(json.dumps({"format": 2}))
    with pytest.raises(te.EngineMismatchError, match="field 'format' is 2, expected 1"):
        te.check_sidecar(plan_path, plugin_path, ENV)
    sidecar.write_text("[]")
    with pytest.raises(te.EngineMismatchError, match="field 'format'"):
        te.check_sidecar(plan_path, plugin_path, ENV)
    sidecar.unlink()
    with pytest.raises(FileNotFoundError, match="has no build record"):
        te.check_sidecar(plan_path, plugin_path, ENV)


# ---- CLI glue -----------------------------------------------------------------------------------


def _parser():
    parser = argparse.ArgumentParser(prog="python -m runtime")
    te.add_build_engine_subparser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_build_engine_subparser_maps_flags():
    args = _parser().parse_args(
        [
            "build-engine",
            "m.onnx",
            "--plugin",
            "lib.so",
            "-o",
            "m.plan",
            "--bf16",
            "--min-batch",
            "2",
            "--opt-batch",
            "4",
            "--max-batch",
            "8",
            "--workspace-gib",
            "2.5",
        ]
    )
    assert (args.onnx.name, args.plugin.name, args.output.name) == ("m.onnx", "lib.so", "m.plan")
    assert args.precision == "bf16"
    assert (args.min_batch, args.opt_batch, args.max_batch, args.workspace_gib) == (2, 4, 8, 2.5)
    assert args.func is te.build_engine_main

    defaults = _parser().parse_args(
        ["build-engine", "m.onnx", "--plugin", "lib.so", "-o", "m.plan"]
    )
    assert defaults.precision == te.DEFAULT_PRECISION
    assert (defaults.min_batch, defaults.opt_batch, defaults.max_batch) == (None, None, None)
    assert defaults.workspace_gib == te.DEFAULT_WORKSPACE_GIB
    assert (
        _parser()
        .parse_args(["build-engine", "m.onnx", "--plugin", "l", "-o", "p", "--fp16"])
        .precision
        == "fp16"
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["build-engine", "m.onnx", "--plugin", "l", "-o", "p", "--fp16", "--bf16"],
        ["build-engine", "m.onnx", "-o", "p"],
        ["build-engine", "m.onnx", "--plugin", "l"],
        ["build-engine", "m.onnx", "--plugin", "l", "-o", "p", "--max-batch", "many"],
    ],
)
def test_build_engine_subparser_rejects(argv, capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(argv)


def test_build_engine_main_without_tensorrt(no_tensorrt, artifacts, tmp_path):
    onnx_path, plugin_path = artifacts
    args = _parser().parse_args(
        [
            "build-engine",
            str(onnx_path),
            "--plugin",
            str(plugin_path),
            "-o",
            str(tmp_path / "m.plan"),
            "--bf16",
        ]
    )
    with pytest.raises(ImportError, match="pip install tensorrt-cu12"):
        args.func(args)


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
    monkeypatch.setattr(te, "_gpu_properties", lambda device: ("NVIDIA H200", "9.0"))
    monkeypatch.setattr(te, "_LOADED_PLUGINS", {})


CFG_INPUTS = [["x", [-1, 4, 32, 32]], ["t", [-1]], ["y", [-1]], ["cfg_scale", []]]


def test_build_engine_weakly_typed_bf16(fake_gpu, monkeypatch, artifacts, tmp_path):
    _, plugin_path = artifacts
    trt = _fake_tensorrt(weak_typing=True)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    onnx_path = _fake_onnx(tmp_path, CFG_INPUTS, ["FLOAT"] * 3)
    plan_path = te.build_engine(
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
    record = te.check_sidecar(
        plan_path, plugin_path, te.EngineEnvironment("10.13.0.35", "NVIDIA H200", "9.0")
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
        te.build_engine(fp32_onnx, plugin_path, tmp_path / "model.plan", precision="bf16")
    assert not (tmp_path / "model.plan").exists()

    bf16_onnx = _fake_onnx(tmp_path, CFG_INPUTS, ["BF16"] * 2)
    plan_path = te.build_engine(bf16_onnx, plugin_path, tmp_path / "model.plan", precision="bf16")
    assert trt.config.flags == []
    assert te.check_sidecar(
        plan_path, plugin_path, te.EngineEnvironment("11.1.0", "NVIDIA H200", "9.0")
    )


def test_build_engine_static_batch(fake_gpu, monkeypatch, artifacts, tmp_path):
    _, plugin_path = artifacts
    trt = _fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    onnx_path = _fake_onnx(tmp_path, [["x", [2, 4, 32, 32]], ["t", [2]], ["y", [2]]], ["FLOAT"])
    with pytest.raises(
        ValueError, match=r"fixed batch \(x \[2, 4, 32, 32\].*apply only to a dynamic batch"
    ):
        te.build_engine(onnx_path, plugin_path, tmp_path / "model.plan", max_batch=8)
    plan_path = te.build_engine(onnx_path, plugin_path, tmp_path / "model.plan")
    assert trt.config.profiles == []
    record = json.loads(te.sidecar_path(plan_path).read_text())
    assert record["batch_profile"] is None
    assert record["input_shapes"]["x"]["max"] == [2, 4, 32, 32]


def test_build_engine_reports_parser_errors_and_missing_plugin(
    fake_gpu, monkeypatch, artifacts, tmp_path
):
    _, plugin_path = artifacts
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt())
    broken = _fake_onnx(tmp_path, CFG_INPUTS, [], errors=["node 3: unsupported op Foo"])
    with pytest.raises(RuntimeError, match="could not parse .*\nnode 3: unsupported op Foo"):
        te.build_engine(broken, plugin_path, tmp_path / "model.plan")

    no_plugin_layers = _fake_onnx(tmp_path, CFG_INPUTS, [])
    with pytest.warns(UserWarning, match="parsed without any plugin layer"):
        te.build_engine(no_plugin_layers, plugin_path, tmp_path / "model.plan")

    monkeypatch.setattr(te, "_LOADED_PLUGINS", {})
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(creator_registered=False))
    with pytest.raises(RuntimeError, match="no creator TernaryMatMul version 1"):
        te.build_engine(no_plugin_layers, plugin_path, tmp_path / "model.plan")


def test_backend_needs_cuda(monkeypatch, tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present; this checks the message on CPU-only machines")
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt())
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        te.TensorRTBackend(tmp_path / "model.plan", tmp_path / "lib.so")


def test_importing_the_module_does_not_import_tensorrt():
    code = "import sys, runtime.tensorrt_engine; print('tensorrt' in sys.modules)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    )
    assert out.stdout.strip() == "False"
