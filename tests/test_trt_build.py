"""build_engine, `python -m runtime build-engine` and the TensorRT backend against the stand-in
`tensorrt` modules of TensorRT 10.16 and 11.1 (tests/trt_standin; no TensorRT, no GPU).

A stand-in refuses every name the real bindings of its release lack, and checks what it can (the
profile against the inputs, I/O shapes and addresses before execution); its parser maps
TernaryMatMul nodes as docs/design.md section 5 says 10.15+ / 11.x does, and its engine runs the ONNX file
in ONNX Runtime. So these tests show our calls exist in both releases and are made consistently;
they say nothing about what TensorRT builds or computes. The plugin library is the real one, built
once per session against each release's headers (tests/conftest.py); the stand-in's load_library
takes nothing else (tests/trt_standin/library.py).
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from onnx import TensorProto

from runtime.runtime_cli import main as runtime_main
from runtime.tensorrt import backend as trt_backend
from runtime.tensorrt import engine_build as trt_build
from runtime.tensorrt import record as trt_record
from terdit_common.errors import UserError
from tests.trt_standin import VERSIONS, HostTransfer, make_tensorrt
from tests.trt_standin.files import ternary_onnx

GPU = ("NVIDIA H200", "9.0")


@pytest.fixture
def gpu(monkeypatch):
    monkeypatch.setattr(trt_record, "_gpu_properties", lambda device: GPU)
    monkeypatch.setattr(trt_build, "_LOADED_PLUGINS", {})


@pytest.fixture(params=VERSIONS)
def trt(request, gpu, monkeypatch):
    """The stand-in of one release, installed as `tensorrt`."""
    module = make_tensorrt(request.param)
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    return module


def _use(monkeypatch, version, **kwargs):
    module = make_tensorrt(version, **kwargs)
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    monkeypatch.setattr(trt_build, "_LOADED_PLUGINS", {})
    return module


@pytest.fixture(scope="module")
def plugins(trt_plugin_build):
    """{release: the real plugin library built against that release's headers} (the session's
    build, tests/conftest.py): the stand-in's load_library takes nothing else."""
    return {version: trt_plugin_build(version).library for version in VERSIONS}


@pytest.fixture
def plugin(request, plugins):
    """The real plugin library of the test's stand-in release: the `trt` fixture's, else the
    `version` parameter's, else 11.1."""
    if "trt" in request.fixturenames:
        return plugins[_release(request.getfixturevalue("trt"))]
    params = getattr(request.node, "callspec", None)
    return plugins[params.params.get("version", "11.1") if params else "11.1"]


def _release(trt):
    return ".".join(trt.__version__.split(".")[:2])


def _environment(trt):
    return trt_record.EngineEnvironment(trt.__version__, *GPU)


# ---- build_engine ----------------------------------------------------------------------------


def test_build_engine_profile_and_record(trt, plugin, tmp_path):
    onnx_path = ternary_onnx(tmp_path / "m.onnx", act_quant="fp8")
    plan_path = trt_build.build_engine(onnx_path, plugin, tmp_path / "out" / "model.plan",
                                       min_batch=1, opt_batch=4, max_batch=8, workspace_gib=2)
    record = trt_record.check_sidecar(plan_path, plugin, _environment(trt))
    assert record["tensorrt_version"] == trt.__version__
    assert record["batch_profile"] == {"min": 1, "opt": 4, "max": 8}
    assert record["input_shapes"]["x"] == {"min": [1, 16, 64], "opt": [4, 16, 64],
                                           "max": [8, 16, 64]}
    assert "cfg_scale" not in record["input_shapes"]             # 0-d: no profile entry
    assert (record["plugin_layers"], record["ternary_nodes"]) == (3, 3)
    assert record["act_quant"] == ["fp8"] and record["precision"] == "fp32"


def test_build_engine_weakly_typed_bf16_on_10(gpu, monkeypatch, plugins, tmp_path):
    trt = _use(monkeypatch, "10.16")
    plan = trt_build.build_engine(ternary_onnx(tmp_path / "m.onnx"), plugins["10.16"],
                                  tmp_path / "model.plan", precision="bf16")
    header = json.loads(plan.read_bytes().split(b"\n")[1])
    assert header["flags"] == ["BF16"] and trt.BuilderFlag.BF16.name == "BF16"
    assert json.loads(trt_record.sidecar_path(plan).read_text())["precision"] == "bf16"


def test_build_engine_strongly_typed_on_11(gpu, monkeypatch, plugin, tmp_path):
    _use(monkeypatch, "11.1")
    fp32 = ternary_onnx(tmp_path / "fp32.onnx")
    with pytest.raises(ValueError, match="strongly typed.*inputs are FLOAT, not bf16"):
        trt_build.build_engine(fp32, plugin, tmp_path / "model.plan", precision="bf16")
    assert not (tmp_path / "model.plan").exists()
    bf16 = ternary_onnx(tmp_path / "bf16.onnx", dtype=TensorProto.BFLOAT16)
    plan = trt_build.build_engine(bf16, plugin, tmp_path / "model.plan", precision="bf16")
    assert json.loads(plan.read_bytes().split(b"\n")[1])["flags"] == []


def test_build_engine_static_batch(trt, plugin, tmp_path):
    onnx_path = ternary_onnx(tmp_path / "m.onnx", batch=2, cfg=False)
    with pytest.raises(ValueError, match=r"fixed batch \(x \[2, 16, 64\].*only to a dynamic"):
        trt_build.build_engine(onnx_path, plugin, tmp_path / "model.plan", max_batch=8)
    plan = trt_build.build_engine(onnx_path, plugin, tmp_path / "model.plan")
    record = json.loads(trt_record.sidecar_path(plan).read_text())
    assert record["batch_profile"] is None and record["input_shapes"]["x"]["max"] == [2, 16, 64]


def test_build_engine_fails_closed_on_inlined_nodes(trt, plugin, tmp_path):
    """Nodes without plugin_namespace: 10.15+ / 11 take the local function, not the plugin."""
    onnx_path = ternary_onnx(tmp_path / "m.onnx", namespace=1)
    with pytest.raises(UserError) as info:
        trt_build.build_engine(onnx_path, plugin, tmp_path / "model.plan")
    message = str(info.value)
    assert f"TensorRT {trt.__version__} mapped 1 of 3 TernaryMatMul nodes" in message
    assert "plugin_namespace" in message and "--no-function" in message
    assert "--allow-inlined-ternary" in message and "\n" not in message
    assert not (tmp_path / "model.plan").exists()

    with pytest.warns(UserWarning, match="mapped 1 of 3 .*building anyway"):
        plan = trt_build.build_engine(onnx_path, plugin, tmp_path / "model.plan",
                                      allow_inlined_ternary=True)
    record = json.loads(trt_record.sidecar_path(plan).read_text())
    assert (record["plugin_layers"], record["ternary_nodes"]) == (1, 3)


def test_inlined_message_names_the_fix_per_version(tmp_path):
    old = trt_build.inlined_ternary_message(tmp_path / "m.onnx", "10.6.0.26", 5, 0)
    assert "TensorRT 10.6.0.26 inlines a node's local function" in old and "--no-function" in old
    new = trt_build.inlined_ternary_message(tmp_path / "m.onnx", "10.7.0.23", 5, 0)
    assert "plugin_namespace" in new and "--plugin" in new and "inlines a node's" not in new
    assert trt_build.tensorrt_version("11.1.0.106") == (11, 1)
    with pytest.raises(UserError, match="cannot read the TensorRT version 'x.y'"):
        trt_build.tensorrt_version("x.y")


def test_build_engine_parser_errors_are_one_line(trt, plugin, tmp_path):
    onnx_path = ternary_onnx(tmp_path / "m.onnx", extra_op="Foo")
    with pytest.raises(UserError) as info:
        trt_build.build_engine(onnx_path, plugin, tmp_path / "model.plan")
    assert f"TensorRT {trt.__version__} could not parse" in str(info.value)
    assert "No importer registered for op: Foo" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("version", VERSIONS)
def test_build_engine_refuses_a_library_without_the_creator(version, gpu, monkeypatch, plugin,
                                                           cuda_kernels_any_arch, tmp_path):
    onnx_path = ternary_onnx(tmp_path / "m.onnx")
    _use(monkeypatch, version, library_creators=())          # a plugin library of other creators
    with pytest.raises(UserError, match="no creator TernaryMatMul version 1"):
        trt_build.build_engine(onnx_path, plugin, tmp_path / "model.plan")
    # not plugin libraries: a shared library without getCreators, a file that is no library
    not_elf = tmp_path / "libterdit_trt_plugin.so"
    not_elf.write_bytes(b"plugin bytes")
    for library in (cuda_kernels_any_arch.library, not_elf):
        _use(monkeypatch, version)
        with pytest.raises(UserError, match="could not load the plugin library"):
            trt_build.build_engine(onnx_path, library, tmp_path / "model.plan")
    assert not (tmp_path / "model.plan").exists()


# ---- the CLI ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A tiny export with classifier-free guidance folded in (a 0-d cfg_scale input)."""
    from exporter import ExportOptions, export
    from terdit import TerDiTConfig, save_checkpoint
    from tests.helpers import random_model
    root = tmp_path_factory.mktemp("trt")
    torch.manual_seed(0)
    save_checkpoint(random_model(TerDiTConfig.from_name("TerDiT-tiny")), root / "ck")
    export(root / "ck", root / "onnx", ExportOptions(cfg="official", validate=False),
           log=lambda *_: None)
    return root


def _cli(argv, capsys):
    code = runtime_main(["build-engine", *map(str, argv)])
    return code, capsys.readouterr()


def test_cli_builds_from_an_export_directory(trt, export_dir, plugin, tmp_path, capsys):
    out = tmp_path / "model.plan"
    code, io = _cli([export_dir / "onnx", "--plugin", plugin, "-o", out], capsys)
    assert code == 0, io.err
    assert f"wrote {out}" in io.out and trt_record.sidecar_path(out).is_file()


@pytest.mark.parametrize("case, pattern", [
    ("no-tensorrt", "TensorRT's Python package is not installed"),
    ("missing-plugin", r"--plugin .*none.so: file not found; build it with CMake"),
    ("not-an-export", r"nothing: no model.onnx here; pass an export directory"),
    ("inlined", r"mapped 0 of 2 TernaryMatMul nodes.*--allow-inlined-ternary"),
])
def test_cli_errors_are_one_line(case, pattern, gpu, monkeypatch, plugin, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None if case == "no-tensorrt"
                        else make_tensorrt("11.1"))
    model = ternary_onnx(tmp_path / "lone.onnx", nodes=2, namespace=case != "inlined")
    argv = {"missing-plugin": [model, "--plugin", tmp_path / "none.so"],
            "not-an-export": [tmp_path / "nothing", "--plugin", plugin]}.get(
        case, [model, "--plugin", plugin])
    (tmp_path / "nothing").mkdir()
    code, io = _cli(argv, capsys)
    lines = io.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), io.err
    assert re.search(pattern, lines[0]), lines[0]
    assert not (tmp_path / "model.plan").exists()


def test_cli_allow_inlined_ternary(gpu, monkeypatch, plugin, tmp_path, capsys):
    _use(monkeypatch, "11.1")
    model = ternary_onnx(tmp_path / "lone.onnx", nodes=2, namespace=False)
    with pytest.warns(UserWarning, match="mapped 0 of 2"):
        code, io = _cli([model, "--plugin", plugin, "--allow-inlined-ternary"], capsys)
    assert code == 0 and (tmp_path / "model.plan").is_file(), io.err


# ---- the backend -----------------------------------------------------------------------------


def _inputs(batch, seed=0):
    g = np.random.default_rng(seed)
    return (g.standard_normal((batch, 4, 8, 8)).astype(np.float32),
            g.integers(0, 1000, batch).astype(np.float32), g.integers(0, 10, batch))


def test_backend_forward_with_cfg_scale(trt, export_dir, plugin):
    """A --cfg official export through build-engine and the backend's forward, cfg_scale 0-d."""
    from runtime.backends.ort_backend import OrtBackend
    plan = export_dir / "onnx" / f"model-{trt.__version__}.plan"    # beside its manifest
    trt_build.build_engine(export_dir / "onnx" / "model.onnx", plugin, plan, max_batch=4)
    backend = trt_backend.TensorRTBackend(plan, plugin, transfer=HostTransfer())
    assert backend.input_names == ["x", "t", "y", "cfg_scale"]
    ort_backend = OrtBackend(export_dir / "onnx")
    for batch, scale in ((1, 4.0), (3, np.float64(1.5))):
        x, t, y = _inputs(batch, seed=batch)
        out = backend.forward(x, t, y, cfg_scale=scale)
        assert backend._context._shapes["cfg_scale"] == ()
        assert out.shape == (batch, 8, 8, 8) and out.dtype == np.float32
        expected = ort_backend.forward(x, t, y, cfg_scale=scale)
        assert np.abs(out - expected).max() <= 1e-5 * np.abs(expected).max()
    with pytest.raises(ValueError, match="folded in .*forward needs cfg_scale"):
        backend.forward(x, t, y)
    with pytest.raises(ValueError, match=r"input 'x' has shape \[5, 4, 8, 8\], outside"):
        backend.forward(*_inputs(5), cfg_scale=4.0)
    # a (1,)-shaped cfg_scale, what np.ascontiguousarray made of it, is refused by TensorRT
    assert not backend._context.set_input_shape("cfg_scale", (1,))


def test_backend_refuses_a_plan_of_the_other_release(gpu, monkeypatch, export_dir, plugins):
    plan = export_dir / "onnx" / "other-release.plan"
    _use(monkeypatch, "10.16")
    trt_build.build_engine(export_dir / "onnx" / "model.onnx", plugins["10.16"], plan)
    _use(monkeypatch, "11.1")
    with pytest.raises(trt_record.EngineMismatchError) as info:
        trt_backend.TensorRTBackend(plan, plugins["10.16"], transfer=HostTransfer())
    assert "field 'tensorrt_version'" in str(info.value)
    assert "plugin.sha256" not in str(info.value) and "plan_sha256" not in str(info.value)


def test_backend_without_tensorrt_fails_with_install_hint(monkeypatch, export_dir, plugin):
    (export_dir / "onnx" / "model.plan").write_bytes(b"plan")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(trt_record.TensorRTUnavailable, match="pip install tensorrt-cu12"):
        trt_backend.TensorRTBackend(export_dir / "onnx", plugin)


def test_backend_needs_cuda_by_default(trt, export_dir, plugin):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present; this checks the message on CPU-only machines")
    (export_dir / "onnx" / "model.plan").write_bytes(b"plan")
    with pytest.raises(trt_record.TensorRTUnavailable, match="needs a CUDA GPU"):
        trt_backend.TensorRTBackend(export_dir / "onnx", plugin)


def test_importing_the_modules_does_not_import_tensorrt_or_torch():
    code = ("import sys, runtime.tensorrt.engine_build, runtime.tensorrt.record, runtime.tensorrt.backend, "
            "runtime.tensorrt.engine_cli; print('tensorrt' in sys.modules, 'torch' in sys.modules)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=root)
    assert out.stdout.strip() == "False False"
