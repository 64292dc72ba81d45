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

from terdit_common.entry import signals_held
from terdit_common.errors import UserError
from terdit_common.inputs import input_file
from terdit_common.limits import MAX_BATCH, MAX_WORKSPACE_GIB, check_count
from terdit_common.op import (ACT_QUANT_DEFAULT, DOMAIN, DTYPES, OP_TYPE, PLUGIN_NAME,
                              PLUGIN_NAMESPACE, PLUGIN_VERSION)

from ..backends.protocol import BackendError
from .record import EngineEnvironment, build_record, import_tensorrt, write_plan

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
                raise BackendError(f"{name}_batch={value!r} must be a positive integer")
        if not self.min <= self.opt <= self.max:
            raise BackendError(
                "batch sizes must satisfy min <= opt <= max, "
                f"got min={self.min}, opt={self.opt}, max={self.max}"
            )


def resolve_batch_range(
    min_batch: int | None, opt_batch: int | None, max_batch: int | None
) -> BatchRange:
    """Fills unset sizes from the defaults, keeping them consistent with the sizes that are set."""
    given = {"min": min_batch, "opt": opt_batch, "max": max_batch}
    for name, value in given.items():
        if value is not None:
            check_count(f"--{name}-batch", value, 1, MAX_BATCH, "images (limits.MAX_BATCH)")
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
            raise BackendError(
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
            raise BackendError(
                f"TensorRT could not load the plugin library {plugin_path}; build it with "
                "`cmake -S . -B build -DTensorRT_ROOT=... && cmake --build build` "
                "(plugins/ternaryMatMulPlugin/README.md)"
            )
        _LOADED_PLUGINS[key] = handle
    # get_creator (IPluginV3-era, TensorRT 10 and 11); get_plugin_creator is gone in 11
    if registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE) is None:
        raise BackendError(
            f"{plugin_path} loaded, but no creator {PLUGIN_NAME} version {PLUGIN_VERSION} "
            f"namespace {PLUGIN_NAMESPACE!r} is registered; is it libterdit_trt_plugin.so?"
        )


def _trt_dtype(trt, precision: str):
    return dict(zip(DTYPES, (trt.DataType.FLOAT, trt.DataType.HALF, trt.DataType.BF16)))[precision]


# ---- Fail closed: every TernaryMatMul must become the plugin ---------------------------------


@dataclasses.dataclass(frozen=True)
class TernaryNodes:
    """The terdit::TernaryMatMul nodes of an ONNX file's main graph."""

    count: int
    act_quant: tuple[str, ...]   # the distinct act_quant values ("none" when absent)
    functions: bool              # the file carries local functions


def read_ternary_nodes(onnx_path: Path) -> TernaryNodes:
    """Counts the TernaryMatMul nodes of `onnx_path` without loading external weight data."""
    try:
        with signals_held():
            import onnx
    except ImportError:
        raise BackendError("build-engine reads the ONNX file with the onnx package: "
                           "pip install onnx") from None
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - onnx's parsers raise their own types (DecodeError,
        # ParseError, ...): any of them means an unreadable file
        text = " ".join(str(err).split())[:200]
        raise BackendError(f"{onnx_path}: not a readable ONNX model ({text}); re-export it with "
                           "`python -m exporter`") from None
    modes = set()
    count = 0
    for node in model.graph.node:
        if node.domain == DOMAIN and node.op_type == OP_TYPE:
            count += 1
            attr = next((a for a in node.attribute if a.name == "act_quant"), None)
            modes.add(attr.s.decode() if attr is not None else ACT_QUANT_DEFAULT)
    return TernaryNodes(count, tuple(sorted(modes)), bool(model.functions))


def ternary_plugin_layers(trt, network) -> list:
    """The network's IPluginV3 layers whose plugin is TernaryMatMul (name, version, namespace)."""
    layers = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type != trt.LayerType.PLUGIN_V3:
            continue
        # get_layer returns the ILayer base class; Polygraphy downcasts the same way
        layer.__class__ = trt.IPluginV3Layer
        core = layer.plugin.get_capability_interface(trt.PluginCapabilityType.CORE)
        if core is not None and (core.plugin_name, core.plugin_version, core.plugin_namespace) \
                == (PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE):
            layers.append(layer)
    return layers


def tensorrt_version(version: str) -> tuple[int, int]:
    """(major, minor) of a TensorRT version string such as "10.16.0.72"."""
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        raise BackendError(f"cannot read the TensorRT version {version!r}") from None


def inlined_ternary_message(onnx_path: Path, version: str, nodes: int, mapped: int) -> str:
    """One line: how many nodes TensorRT `version` did not map to the plugin, why, and the fixes."""
    if tensorrt_version(version) < (10, 7):
        why = (f"TensorRT {version} inlines a node's local function before it looks for a "
               f"plugin: re-export with `python -m exporter ... --no-function`")
    else:
        why = (f"TensorRT {version} prefers a registered plugin (10.15+: for nodes with the "
               f"plugin_namespace attribute): check that --plugin is the TernaryMatMul library "
               f"and re-export with `python -m exporter` (its nodes carry plugin_namespace) or "
               f"with --no-function")
    return (f"{onnx_path}: TensorRT {version} mapped {mapped} of {nodes} TernaryMatMul nodes to "
            f"the {PLUGIN_NAME} plugin; the other {nodes - mapped} were inlined as their ONNX "
            f"function, an engine with decoded float weights (~16x the packed size) and no "
            f"W1.58A8; {why}")


# ---- Engine build ------------------------------------------------------------------------------


def check_workspace(workspace_gib: float) -> None:
    if not (isinstance(workspace_gib, (int, float)) and 0 < workspace_gib <= MAX_WORKSPACE_GIB):
        raise BackendError(f"--workspace-gib {workspace_gib}: must be a number of GiB above 0 and "
                           f"at most {MAX_WORKSPACE_GIB} (limits.MAX_WORKSPACE_GIB)")


def build_engine(
    onnx_path: str | os.PathLike,
    plugin_path: str | os.PathLike,
    out_path: str | os.PathLike,
    precision: str = DEFAULT_PRECISION,
    min_batch: int | None = None,
    opt_batch: int | None = None,
    max_batch: int | None = None,
    workspace_gib: float = DEFAULT_WORKSPACE_GIB,
    allow_inlined_ternary: bool = False,
) -> Path:
    """Builds a TensorRT plan from `onnx_path` with the TernaryMatMul plugin and writes it to
    `out_path` with its build record `<out_path>.json`. Unset batch sizes take the defaults
    (DEFAULT_MIN_BATCH / DEFAULT_OPT_BATCH / DEFAULT_MAX_BATCH) when the ONNX batch is dynamic.

    Fails closed: when the parsed network has fewer TernaryMatMul plugin layers than the file has
    TernaryMatMul nodes (TensorRT inlined the portable function), nothing is built unless
    `allow_inlined_ternary`.

    Precision: TensorRT 10 builds fp16 / bf16 engines from an fp32 ONNX (weakly typed network and
    the FP16 / BF16 builder flag). TensorRT 11 only builds strongly typed networks, where the ONNX
    file's types are the precision; the requested one is then checked against the TernaryMatMul
    inputs of the parsed network.
    """
    onnx_path, plugin_path, out_path = Path(onnx_path), Path(plugin_path), Path(out_path)
    if precision not in DTYPES:
        raise BackendError(f"precision={precision!r} must be one of {', '.join(DTYPES)}")
    batch_given = any(b is not None for b in (min_batch, opt_batch, max_batch))
    batch = resolve_batch_range(min_batch, opt_batch, max_batch)
    check_workspace(workspace_gib)
    input_file(onnx_path, "ONNX model", "export one with `python -m exporter`")
    input_file(plugin_path, "--plugin", "build it with CMake (plugins/ternaryMatMulPlugin/"
                                        "README.md)")

    try:
        nodes = read_ternary_nodes(onnx_path)
    except UserError:
        nodes = None            # an unreadable file is reported after the TensorRT check
    if nodes is not None and "int8" in nodes.act_quant:
        # the plugin creator refuses it too; say so before TensorRT is needed
        raise BackendError(f"{onnx_path}: TernaryMatMul act_quant=\"int8\" runs on the CPU "
                           f"kernels (ONNX Runtime / PyTorch) only; export with --act-quant none "
                           f"or fp8 for TensorRT")
    trt = import_tensorrt()
    environment = EngineEnvironment.detect()
    if nodes is None:
        nodes = read_ternary_nodes(onnx_path)
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
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        hint = ("; TensorRT < 10.7 inlines local functions: export with --no-function"
                if nodes.functions and tensorrt_version(trt.__version__) < (10, 7) else "")
        raise BackendError(f"TensorRT {trt.__version__} could not parse {onnx_path}: "
                           f"{errors}{hint}")

    plugin_layers = ternary_plugin_layers(trt, network)
    if len(plugin_layers) < nodes.count:
        message = inlined_ternary_message(onnx_path, trt.__version__, nodes.count,
                                          len(plugin_layers))
        if not allow_inlined_ternary:
            raise BackendError(f"{message}; or pass --allow-inlined-ternary to build it anyway")
        warnings.warn(f"{message} (building anyway: --allow-inlined-ternary)", stacklevel=2)
    if strongly_typed:
        wanted = _trt_dtype(trt, precision)
        wrong = sorted({t.name for t in (layer.get_input(0).dtype for layer in plugin_layers)
                        if t != wanted})
        if wrong:
            raise BackendError(
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
        raise BackendError(
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
        raise BackendError(
            f"TensorRT {trt.__version__} failed to build an engine from {onnx_path}; see its "
            "log above"
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
        plugin_layers=len(plugin_layers),
        ternary_nodes=nodes.count,
        act_quant=list(nodes.act_quant),
    )
    return write_plan(out_path, plan, record)
