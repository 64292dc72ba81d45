"""TensorRT engine records, batch profiles and the build-engine CLI glue, with neither TensorRT
nor a GPU: the missing-TensorRT message, batch profile rules, atomic plan + build-record writes,
the build-record checks and the argument parser. build_engine and the backend against stand-in
`tensorrt` modules: tests/test_trt_build.py."""

import argparse
import hashlib
import json
import os
import sys

import pytest

from runtime.tensorrt import backend as trt_backend
from runtime.tensorrt import engine_build as trt_build
from runtime.tensorrt import engine_cli as cli
from runtime.tensorrt import record as trt_record

ENV = trt_record.EngineEnvironment(
    tensorrt_version="10.13.0.35", gpu_name="NVIDIA H200", compute_capability="9.0"
)
DIT_INPUTS = [("x", (-1, 4, 32, 32)), ("t", (-1,)), ("y", (-1,))]


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)


@pytest.fixture
def artifacts(tmp_path):
    onnx_path = tmp_path / "lone.onnx"
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
        ternary_nodes=3,
        act_quant=["none"],
    )


# ---- missing TensorRT ---------------------------------------------------------------------------


def test_missing_tensorrt_says_how_to_install(no_tensorrt):
    with pytest.raises(trt_record.TensorRTUnavailable, match="pip install tensorrt-cu12") as info:
        trt_record.import_tensorrt()
    assert "NVIDIA's package index" in str(info.value)


def test_build_engine_without_tensorrt_fails_with_install_hint(no_tensorrt, artifacts, tmp_path):
    onnx_path, plugin_path = artifacts
    with pytest.raises(trt_record.TensorRTUnavailable, match="pip install tensorrt-cu12"):
        trt_build.build_engine(onnx_path, plugin_path, tmp_path / "model.plan", precision="bf16")
    assert not (tmp_path / "model.plan").exists()


def test_arguments_are_checked_before_tensorrt_is_needed(no_tensorrt, artifacts, tmp_path):
    onnx_path, plugin_path = artifacts
    plan = tmp_path / "model.plan"
    with pytest.raises(ValueError, match="precision='int8' must be one of fp32, fp16, bf16"):
        trt_build.build_engine(onnx_path, plugin_path, plan, precision="int8")
    with pytest.raises(ValueError, match="min <= opt <= max"):
        trt_build.build_engine(onnx_path, plugin_path, plan, min_batch=8, opt_batch=4)
    with pytest.raises(ValueError, match="--max-batch 0: must be from 1 to 65536"):
        trt_build.build_engine(onnx_path, plugin_path, plan, max_batch=0)
    with pytest.raises(ValueError, match="--workspace-gib 0: must be a number of GiB above 0"):
        trt_build.build_engine(onnx_path, plugin_path, plan, workspace_gib=0)
    with pytest.raises(ValueError, match="--plugin .*missing.so: file not found"):
        trt_build.build_engine(onnx_path, tmp_path / "missing.so", plan)


# ---- batch profile ------------------------------------------------------------------------------


def test_resolve_batch_range_defaults_and_consistency():
    assert trt_build.resolve_batch_range(None, None, None) == trt_build.BatchRange(
        trt_build.DEFAULT_MIN_BATCH, trt_build.DEFAULT_OPT_BATCH, trt_build.DEFAULT_MAX_BATCH
    )
    assert trt_build.resolve_batch_range(4, None, None) == trt_build.BatchRange(4, 4, 16)
    assert trt_build.resolve_batch_range(None, None, 1) == trt_build.BatchRange(1, 1, 1)
    assert trt_build.resolve_batch_range(None, 32, None) == trt_build.BatchRange(1, 32, 32)
    assert trt_build.resolve_batch_range(2, 8, 64) == trt_build.BatchRange(2, 8, 64)
    with pytest.raises(ValueError, match="min <= opt <= max"):
        trt_build.resolve_batch_range(1, 32, 16)
    with pytest.raises(ValueError, match="--opt-batch -1: must be from 1"):
        trt_build.resolve_batch_range(None, -1, None)
    with pytest.raises(ValueError, match="--min-batch True: must be from 1"):
        trt_build.resolve_batch_range(True, None, None)


def test_batch_profile_covers_dynamic_batch_inputs_only():
    inputs = [*DIT_INPUTS, ("cfg_scale", ())]
    shapes = trt_build.batch_profile_shapes(inputs, trt_build.BatchRange(1, 4, 8))
    assert shapes == {
        "x": {"min": (1, 4, 32, 32), "opt": (4, 4, 32, 32), "max": (8, 4, 32, 32)},
        "t": {"min": (1,), "opt": (4,), "max": (8,)},
        "y": {"min": (1,), "opt": (4,), "max": (8,)},
    }
    assert (
        trt_build.batch_profile_shapes([("x", (2, 4, 32, 32)), ("t", (2,))], trt_build.BatchRange(1, 1, 1)) == {}
    )
    with pytest.raises(
        ValueError, match=r"input 'x' has shape \[-1, 4, -1, -1\]: only the batch dimension"
    ):
        trt_build.batch_profile_shapes([("x", (-1, 4, -1, -1))], trt_build.BatchRange(1, 1, 1))


def test_check_batch():
    trt_backend.check_batch("x", (4, 4, 32, 32), (1, 4, 32, 32), (16, 4, 32, 32))
    with pytest.raises(
        ValueError, match=r"input 'x' has shape \[32, 4, 32, 32\], outside the engine's profile"
    ):
        trt_backend.check_batch("x", (32, 4, 32, 32), (1, 4, 32, 32), (16, 4, 32, 32))
    with pytest.raises(ValueError, match="outside the engine's profile"):
        trt_backend.check_batch("x", (4, 4, 64, 64), (1, 4, 32, 32), (16, 4, 32, 32))
    with pytest.raises(ValueError, match="outside the engine's profile"):
        trt_backend.check_batch("t", (4, 1), (1,), (16,))


# ---- atomic writes and build records ------------------------------------------------------------


def test_write_plan_writes_plan_and_sidecar_atomically(artifacts, tmp_path):
    onnx_path, plugin_path = artifacts
    plan_path = tmp_path / "engines" / "model.plan"
    plan = b"\x00plan bytes\xff" * 100
    trt_record.write_plan(plan_path, plan, _record(onnx_path, plugin_path, plan))
    assert plan_path.read_bytes() == plan
    record = json.loads(trt_record.sidecar_path(plan_path).read_text())
    assert trt_record.sidecar_path(plan_path) == tmp_path / "engines" / "model.plan.json"
    assert record["format"] == trt_record.SIDECAR_FORMAT
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
    trt_record.write_plan(plan_path, old, _record(onnx_path, plugin_path, old))
    old_sidecar = trt_record.sidecar_path(plan_path).read_text()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    new = b"new plan"
    with pytest.raises(OSError, match="disk full"):
        trt_record.write_plan(plan_path, new, _record(onnx_path, plugin_path, new))
    assert plan_path.read_bytes() == old
    assert trt_record.sidecar_path(plan_path).read_text() == old_sidecar
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "libterdit_trt_plugin.so",
        "lone.onnx",
        "model.plan",
        "model.plan.json",
    ]


def test_write_plan_refuses_a_record_of_another_plan(artifacts, tmp_path):
    onnx_path, plugin_path = artifacts
    with pytest.raises(ValueError, match="plan_sha256"):
        trt_record.write_plan(
            tmp_path / "model.plan", b"plan", _record(onnx_path, plugin_path, b"other plan")
        )
    assert not (tmp_path / "model.plan").exists()


@pytest.fixture
def written_plan(artifacts, tmp_path):
    onnx_path, plugin_path = artifacts
    plan_path = tmp_path / "model.plan"
    plan = b"plan bytes"
    trt_record.write_plan(plan_path, plan, _record(onnx_path, plugin_path, plan))
    return plan_path, plugin_path


def test_check_sidecar_accepts_matching_environment(written_plan):
    plan_path, plugin_path = written_plan
    record = trt_record.check_sidecar(plan_path, plugin_path, ENV)
    assert record["precision"] == "bf16"


@pytest.mark.parametrize(
    "environment, field, built, here",
    [
        (
            trt_record.EngineEnvironment("10.14.1.48", "NVIDIA H200", "9.0"),
            "tensorrt_version",
            "10.13.0.35",
            "10.14.1.48",
        ),
        (
            trt_record.EngineEnvironment("10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0"),
            "gpu.name",
            "NVIDIA H200",
            "NVIDIA H100 80GB HBM3",
        ),
        (
            trt_record.EngineEnvironment("10.13.0.35", "NVIDIA H200", "8.0"),
            "gpu.compute_capability",
            "9.0",
            "8.0",
        ),
    ],
)
def test_check_sidecar_names_the_mismatching_field(written_plan, environment, field, built, here):
    plan_path, plugin_path = written_plan
    with pytest.raises(trt_record.EngineMismatchError) as info:
        trt_record.check_sidecar(plan_path, plugin_path, environment)
    message = str(info.value)
    assert f"field '{field}': the engine was built with '{built}', here it is '{here}'" in message
    assert "python -m runtime build-engine" in message


def test_check_sidecar_refuses_another_plugin_or_plan(written_plan):
    plan_path, plugin_path = written_plan
    built_plugin = hashlib.sha256(plugin_path.read_bytes()).hexdigest()
    plugin_path.write_bytes(b"rebuilt plugin")
    with pytest.raises(trt_record.EngineMismatchError, match="field 'plugin.sha256'") as info:
        trt_record.check_sidecar(plan_path, plugin_path, ENV)
    assert built_plugin in str(info.value)
    assert hashlib.sha256(b"rebuilt plugin").hexdigest() in str(info.value)
    assert "plan_sha256" not in str(info.value)

    plugin_path.write_bytes(b"plugin bytes")
    plan_path.write_bytes(b"a plan written without its record")
    with pytest.raises(trt_record.EngineMismatchError, match="field 'plan_sha256'"):
        trt_record.check_sidecar(plan_path, plugin_path, ENV)


def test_check_sidecar_lists_every_mismatch(written_plan):
    plan_path, plugin_path = written_plan
    with pytest.raises(trt_record.EngineMismatchError) as info:
        trt_record.check_sidecar(
            plan_path, plugin_path, trt_record.EngineEnvironment("11.1.0", "NVIDIA H100", "9.0")
        )
    assert "'tensorrt_version'" in str(info.value) and "'gpu.name'" in str(info.value)


def test_check_sidecar_missing_corrupt_or_future_record(written_plan):
    plan_path, plugin_path = written_plan
    sidecar = trt_record.sidecar_path(plan_path)
    sidecar.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid build record"):
        trt_record.check_sidecar(plan_path, plugin_path, ENV)
    sidecar.write_text(json.dumps({"format": 2}))
    with pytest.raises(trt_record.EngineMismatchError, match="field 'format' is 2, expected 1"):
        trt_record.check_sidecar(plan_path, plugin_path, ENV)
    sidecar.write_text("[]")
    with pytest.raises(trt_record.EngineMismatchError, match="field 'format'"):
        trt_record.check_sidecar(plan_path, plugin_path, ENV)
    sidecar.unlink()
    with pytest.raises(ValueError, match="has no build record"):
        trt_record.check_sidecar(plan_path, plugin_path, ENV)


# ---- CLI glue -----------------------------------------------------------------------------------


def _parser():
    parser = argparse.ArgumentParser(prog="python -m runtime")
    cli.add_build_engine_subparser(parser.add_subparsers(dest="command", required=True))
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
            "--allow-inlined-ternary",
        ]
    )
    assert (args.onnx.name, args.plugin.name, args.output.name) == ("m.onnx", "lib.so", "m.plan")
    assert args.precision == "bf16"
    assert (args.min_batch, args.opt_batch, args.max_batch, args.workspace_gib) == (2, 4, 8, 2.5)
    assert args.func is cli.build_engine_main and args.allow_inlined_ternary is True

    defaults = _parser().parse_args(
        ["build-engine", "m.onnx", "--plugin", "lib.so", "-o", "m.plan"]
    )
    assert defaults.precision == trt_build.DEFAULT_PRECISION
    assert (defaults.min_batch, defaults.opt_batch, defaults.max_batch) == (None, None, None)
    assert defaults.workspace_gib == trt_build.DEFAULT_WORKSPACE_GIB
    assert defaults.allow_inlined_ternary is False
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
    with pytest.raises(trt_record.TensorRTUnavailable, match="pip install tensorrt-cu12"):
        args.func(args)


