"""TensorRT engine builds: the batch optimization profile, loading the plugin library, and
`build_engine` (ONNX export -> plan + build record)."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from terdit_common.errors import UserError
from terdit_common.op import PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION

from .trt_record import EngineEnvironment, build_record, import_tensorrt, write_plan

PRECISIONS = ("fp32", "fp16", "bf16")
DEFAULT_PRECISION = "fp32"
DEFAULT_MIN_BATCH = 1
DEFAULT_OPT_BATCH = 2
DEFAULT_MAX_BATCH = 16
DEFAULT_WORKSPACE_GIB = 4.0


# ---- Batch profile -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BatchRange:
    """Batch sizes of the optimization profile: TensorRT tunes for `opt` and accepts [min, max]."""

    min: int
    opt: int
    max: int

    def __post_init__(self):
        for name in ("min", "opt", "max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}_batch={value!r} must be a positive integer")
        if not self.min <= self.opt <= self.max:
            raise ValueError(
                "batch sizes must satisfy min <= opt <= max, "
                f"got min={self.min}, opt={self.opt}, max={self.max}"
            )


def resolve_batch_range(
    min_batch: int | None, opt_batch: int | None, max_batch: int | None
) -> BatchRange:
    """Fills unset sizes from the defaults, keeping them consistent with the sizes that are set."""
    given = {"min": min_batch, "opt": opt_batch, "max": max_batch}
    for name, value in given.items():
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"{name}_batch={value!r} must be a positive integer")
    set_sizes = [v for v in given.values() if v is not None]
    low = min_batch if min_batch is not None else min([DEFAULT_MIN_BATCH, *set_sizes])
    high = max_batch if max_batch is not None else max([DEFAULT_MAX_BATCH, *set_sizes])
    opt = opt_batch if opt_batch is not None else min(max(DEFAULT_OPT_BATCH, low), high)
    return BatchRange(low, opt, high)


def batch_profile_shapes(
    inputs: Sequence[tuple[str, Sequence[int]]], batch: BatchRange
) -> dict[str, dict[str, tuple[int, ...]]]:
    """min / opt / max shapes for every input whose leading (batch) dimension is dynamic (-1).

    Scalars (``cfg_scale``) and fully static inputs need no profile entry. Any other dynamic
    dimension is refused: the runtime feeds one image size per engine.
    """
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, shape in inputs:
        shape = tuple(int(d) for d in shape)
        if not shape:
            continue
        if any(d < 0 for d in shape[1:]):
            raise ValueError(
                f"input '{name}' has shape {list(shape)}: only the batch dimension may be dynamic; "
                "export the model with a fixed image size"
            )
        if shape[0] < 0:
            rest = shape[1:]
            shapes[name] = {
                "min": (batch.min, *rest),
                "opt": (batch.opt, *rest),
                "max": (batch.max, *rest),
            }
    return shapes


# ---- Engine build ------------------------------------------------------------------------------

_LOADED_PLUGINS: dict[str, Any] = {}


def load_plugin_library(trt, plugin_path: Path) -> None:
    """Loads the plugin library into TensorRT's registry once per process and checks its creator."""
    key = str(Path(plugin_path).resolve())
    registry = trt.get_plugin_registry()
    if key not in _LOADED_PLUGINS:
        handle = registry.load_library(key)
        if handle is None:
            raise UserError(
                f"TensorRT could not load the plugin library {plugin_path}; build it with "
                "`cmake -S . -B build -DTensorRT_ROOT=... && cmake --build build` "
                "(plugins/ternaryMatMulPlugin/README.md)"
            )
        _LOADED_PLUGINS[key] = handle
    get_creator = getattr(registry, "get_creator", None) or registry.get_plugin_creator
    if get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE) is None:
        raise UserError(
            f"{plugin_path} loaded, but no creator {PLUGIN_NAME} version {PLUGIN_VERSION} "
            f"namespace {PLUGIN_NAMESPACE!r} is registered; is it libterdit_trt_plugin.so?"
        )


def _trt_dtype(trt, precision: str):
    return {"fp32": trt.DataType.FLOAT, "fp16": trt.DataType.HALF, "bf16": trt.DataType.BF16}[
        precision
    ]


def _plugin_input_types(trt, network) -> list:
    """Element type of X of every IPluginV3 layer (in a TerDiT graph: the TernaryMatMul nodes)."""
    types = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.PLUGIN_V3:
            types.append(layer.get_input(0).dtype)
    return types


def build_engine(
    onnx_path: str | os.PathLike,
    plugin_path: str | os.PathLike,
    out_path: str | os.PathLike,
    precision: str = DEFAULT_PRECISION,
    min_batch: int | None = None,
    opt_batch: int | None = None,
    max_batch: int | None = None,
    workspace_gib: float = DEFAULT_WORKSPACE_GIB,
) -> Path:
    """Builds a TensorRT plan from `onnx_path` with the TernaryMatMul plugin and writes it to
    `out_path` with its build record `<out_path>.json`. Unset batch sizes take the defaults
    (DEFAULT_MIN_BATCH / DEFAULT_OPT_BATCH / DEFAULT_MAX_BATCH) when the ONNX batch is dynamic.

    Precision: TensorRT 10 builds fp16 / bf16 engines from an fp32 ONNX (weakly typed network and
    the FP16 / BF16 builder flag). TensorRT 11 only builds strongly typed networks, where the ONNX
    file's types are the precision; the requested one is then checked against the TernaryMatMul
    inputs of the parsed network.
    """
    onnx_path, plugin_path, out_path = Path(onnx_path), Path(plugin_path), Path(out_path)
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} must be one of {', '.join(PRECISIONS)}")
    batch_given = any(b is not None for b in (min_batch, opt_batch, max_batch))
    batch = resolve_batch_range(min_batch, opt_batch, max_batch)
    if not (isinstance(workspace_gib, (int, float)) and 0 < workspace_gib < 1e6):
        raise ValueError(f"workspace_gib={workspace_gib} must be positive")
    for path, what in ((onnx_path, "ONNX model"), (plugin_path, "plugin library")):
        if not path.is_file():
            raise UserError(f"{what} {path} not found")

    trt = import_tensorrt()
    environment = EngineEnvironment.detect()
    logger = trt.Logger(trt.Logger.WARNING)
    load_plugin_library(trt, plugin_path)

    builder = trt.Builder(logger)
    # TensorRT 11 removed weak typing (and with it BuilderFlag.FP16 / BF16): networks are always
    # strongly typed there. TensorRT 10 networks are weakly typed unless asked otherwise.
    strongly_typed = not hasattr(trt.BuilderFlag, "FP16")
    weak_flag = (
        None
        if strongly_typed or precision == "fp32"
        else getattr(trt.BuilderFlag, precision.upper())
    )
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT could not parse {onnx_path}: {errors}")

    plugin_types = _plugin_input_types(trt, network)
    if not plugin_types:
        warnings.warn(
            f"{onnx_path} parsed without any plugin layer: its TernaryMatMul nodes were inlined as "
            "their ONNX function (TensorRT 10.0-10.6 always do this; later versions do when the "
            "nodes lack the plugin_namespace attribute), so the engine stores decoded weights and "
            "is slower",
            stacklevel=2,
        )
    if strongly_typed:
        wanted = _trt_dtype(trt, precision)
        wrong = sorted({str(t) for t in plugin_types if t != wanted})
        if wrong:
            raise ValueError(
                f"TensorRT {trt.__version__} builds strongly typed networks, so the ONNX file "
                f"sets the precision: its TernaryMatMul inputs are {', '.join(wrong)}, not "
                f"{precision}; export the model in {precision} or request the precision it was "
                "exported in"
            )

    inputs = []
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        inputs.append((tensor.name, tuple(tensor.shape)))
    profile_shapes = batch_profile_shapes(inputs, batch)
    if not profile_shapes and batch_given:
        shapes = ", ".join(f"{name} {list(shape)}" for name, shape in inputs)
        raise ValueError(
            f"{onnx_path} has a fixed batch ({shapes}); --min-batch / --opt-batch / --max-batch "
            "apply only to a dynamic batch: drop them or export with a dynamic batch"
        )

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if weak_flag is not None:
        config.set_flag(weak_flag)
    if profile_shapes:
        profile = builder.create_optimization_profile()
        for name, shapes in profile_shapes.items():
            profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
        config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(
            f"TensorRT failed to build an engine from {onnx_path}; see the log above"
        )
    plan = memoryview(serialized)
    input_shapes = profile_shapes or {name: {"min": s, "opt": s, "max": s} for name, s in inputs}
    record = build_record(
        environment,
        plugin_path=plugin_path,
        onnx_path=onnx_path,
        plan_sha256=hashlib.sha256(plan).hexdigest(),
        precision=precision,
        batch_profile=batch if profile_shapes else None,
        input_shapes=input_shapes,
        plugin_layers=len(plugin_types),
    )
    return write_plan(out_path, plan, record)
