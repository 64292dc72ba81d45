"""TensorRT engines for TerDiT: build a plan from an exported ONNX file, refuse a plan that was
built for another GPU, TensorRT or plugin library, and run a plan with the runtime's
forward(x, t, y).

Every plan gets a build record beside it, ``<plan>.json`` (the sidecar): TensorRT version, GPU name
and compute capability, sha256 of the plugin library, of the ONNX file and of the plan itself,
precision and batch profile. TensorRT engines are specific to all of these, and a mismatch otherwise
shows up as a deserialization failure or a wrong plugin at run time.

TensorRT, torch's CUDA build and the plugin library are imported or loaded only by the functions
that use them.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .io import atomic_write_bytes as _atomic_write_bytes
from .io import sha256_file as file_sha256

PRECISIONS = ("fp32", "fp16", "bf16")
DEFAULT_PRECISION = "fp32"
DEFAULT_MIN_BATCH = 1
DEFAULT_OPT_BATCH = 2
DEFAULT_MAX_BATCH = 16
DEFAULT_WORKSPACE_GIB = 4.0

PLUGIN_NAME = "TernaryMatMul"
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = ""

SIDECAR_FORMAT = 1

INSTALL_HINT = (
    "TensorRT's Python package is not installed. Install the build matching your CUDA major "
    "version, e.g. `pip install tensorrt-cu12` (or tensorrt-cu13); the PyPI packages are stubs "
    "that download the real wheels from NVIDIA's package index, so the machine needs access to it. "
    "See NVIDIA's TensorRT installation guide."
)


class EngineMismatchError(RuntimeError):
    """A plan's build record does not match this machine, TensorRT or plugin library."""


# ---- Imports at call time --------------------------------------------------------------------


def import_tensorrt():
    """Returns the ``tensorrt`` module, or raises ImportError with install instructions."""
    try:
        import tensorrt
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return tensorrt


def _import_torch_cuda(device: int):
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(
            "the TensorRT backend needs a CUDA GPU and a CUDA build of torch "
            f"(torch {torch.__version__} sees no GPU); use --backend onnxruntime or torch on this "
            "machine"
        )
    if device >= torch.cuda.device_count():
        raise ValueError(
            f"device={device} but torch sees {torch.cuda.device_count()} CUDA device(s)"
        )
    return torch


# ---- Environment and build records -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EngineEnvironment:
    """What a plan is tied to on the machine that runs it."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "major.minor", e.g. "9.0"

    @classmethod
    def detect(cls, device: int = 0) -> EngineEnvironment:
        trt = import_tensorrt()
        name, capability = _gpu_properties(device)
        return cls(tensorrt_version=trt.__version__, gpu_name=name, compute_capability=capability)


def _gpu_properties(device: int) -> tuple[str, str]:
    """(name, "major.minor") of a CUDA device, through torch or, failing that, cuda-python."""
    try:
        import torch

        if torch.cuda.is_available() and device < torch.cuda.device_count():
            major, minor = torch.cuda.get_device_capability(device)
            return torch.cuda.get_device_name(device), f"{major}.{minor}"
    except ImportError:
        pass
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        cudart = None
    if cudart is not None:
        err, props = cudart.cudaGetDeviceProperties(device)
        if err == cudart.cudaError_t.cudaSuccess:
            name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
            return name.rstrip("\x00"), f"{props.major}.{props.minor}"
    raise RuntimeError(
        f"no CUDA device {device} is visible to torch or cuda-python; TensorRT engines are built "
        "and run on the GPU they are for"
    )


def sidecar_path(plan_path: str | os.PathLike) -> Path:
    """The build record of a plan: ``model.plan`` -> ``model.plan.json``."""
    return Path(f"{os.fspath(plan_path)}.json")


def build_record(
    environment: EngineEnvironment,
    *,
    plugin_path: Path,
    onnx_path: Path,
    plan_sha256: str,
    precision: str,
    batch_profile: BatchRange | None,
    input_shapes: Mapping[str, Mapping[str, Sequence[int]]],
    plugin_layers: int,
) -> dict[str, Any]:
    """The sidecar content for a plan built in `environment`."""
    return {
        "format": SIDECAR_FORMAT,
        "tensorrt_version": environment.tensorrt_version,
        "gpu": {"name": environment.gpu_name, "compute_capability": environment.compute_capability},
        "plugin": {"file": plugin_path.name, "sha256": file_sha256(plugin_path)},
        "onnx": {"file": onnx_path.name, "sha256": file_sha256(onnx_path)},
        "plan_sha256": plan_sha256,
        "precision": precision,
        "batch_profile": dataclasses.asdict(batch_profile) if batch_profile is not None else None,
        "input_shapes": {
            name: {k: list(v) for k, v in shapes.items()} for name, shapes in input_shapes.items()
        },
        "plugin_layers": plugin_layers,
    }


def write_plan(
    plan_path: Path, plan: bytes | bytearray | memoryview, record: Mapping[str, Any]
) -> Path:
    """Writes the plan, then its sidecar, each atomically. The sidecar holds the plan's sha256, so
    a plan paired with a stale sidecar (a crash between the two renames) is refused by
    check_sidecar."""
    plan_path = Path(plan_path)
    if record.get("plan_sha256") != hashlib.sha256(plan).hexdigest():
        raise ValueError("record['plan_sha256'] is not the sha256 of the plan being written")
    _atomic_write_bytes(plan_path, plan)
    _atomic_write_bytes(
        sidecar_path(plan_path), (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
    )
    return plan_path


def check_sidecar(
    plan_path: str | os.PathLike,
    plugin_path: str | os.PathLike,
    environment: EngineEnvironment | None = None,
) -> dict[str, Any]:
    """Returns the plan's build record, or raises EngineMismatchError naming every field that does
    not match this machine (`environment`, detected when None), the plugin library or the plan."""
    plan_path, plugin_path = Path(plan_path), Path(plugin_path)
    record_path = sidecar_path(plan_path)
    if not record_path.is_file():
        raise FileNotFoundError(
            f"{record_path} not found: {plan_path} has no build record; rebuild it with "
            f"`python -m runtime build-engine MODEL.onnx --plugin {plugin_path} -o {plan_path}`"
        )
    try:
        record = json.loads(record_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{record_path} is not a valid build record: {e}") from e
    if not isinstance(record, dict) or record.get("format") != SIDECAR_FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise EngineMismatchError(
            f"{record_path}: field 'format' is {found!r}, expected {SIDECAR_FORMAT}; "
            "rebuild the engine"
        )
    if environment is None:
        environment = EngineEnvironment.detect()
    expected = {
        "tensorrt_version": environment.tensorrt_version,
        "gpu.name": environment.gpu_name,
        "gpu.compute_capability": environment.compute_capability,
        "plugin.sha256": file_sha256(plugin_path),
        "plan_sha256": file_sha256(plan_path),
    }
    mismatches = []
    for field, actual in expected.items():
        recorded: Any = record
        for key in field.split("."):
            recorded = recorded.get(key) if isinstance(recorded, dict) else None
        if recorded != actual:
            mismatches.append(
                f"field '{field}': the engine was built with {recorded!r}, here it is {actual!r}"
            )
    if mismatches:
        raise EngineMismatchError(
            f"{plan_path} does not fit this machine, TensorRT or plugin library ("
            + "; ".join(mismatches)
            + "); rebuild it here with `python -m runtime build-engine MODEL.onnx "
            f"--plugin {plugin_path} -o {plan_path}`"
        )
    return record


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
            raise RuntimeError(
                f"TensorRT could not load the plugin library {plugin_path}; build it with "
                "`cmake -S . -B build -DTensorRT_ROOT=... && cmake --build build` "
                "(plugins/ternaryMatMulPlugin/README.md)"
            )
        _LOADED_PLUGINS[key] = handle
    get_creator = getattr(registry, "get_creator", None) or registry.get_plugin_creator
    if get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE) is None:
        raise RuntimeError(
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
    if not workspace_gib > 0:
        raise ValueError(f"workspace_gib={workspace_gib} must be positive")
    for path, what in ((onnx_path, "ONNX model"), (plugin_path, "plugin library")):
        if not path.is_file():
            raise FileNotFoundError(f"{what} {path} not found")

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
        raise RuntimeError(f"TensorRT could not parse {onnx_path}:\n{errors}")

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
        raise RuntimeError(
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


# ---- Backend -----------------------------------------------------------------------------------


def check_batch(name: str, shape: Sequence[int], low: Sequence[int], high: Sequence[int]) -> None:
    """Raises ValueError when `shape` lies outside the engine's profile [low, high] for `name`."""
    if len(shape) != len(low) or any(s < lo or s > hi for s, lo, hi in zip(shape, low, high)):
        raise ValueError(
            f"input '{name}' has shape {list(shape)}, outside the engine's profile {list(low)} .. "
            f"{list(high)}; rebuild the engine with --min-batch / --max-batch covering it or "
            "split the batch"
        )


class TensorRTBackend:
    """Runs a plan built by build_engine. forward(x, t, y) takes and returns numpy arrays, like
    every runtime backend: x (B, C, H, W) float, t (B,) float32, y (B,) int64 ->
    (B, 2C, H, W) float32. A plan exported with classifier-free guidance folded in also needs
    cfg_scale."""

    def __init__(
        self, plan_path: str | os.PathLike, plugin_path: str | os.PathLike, device: int = 0
    ):
        plan_path, plugin_path = Path(plan_path), Path(plugin_path)
        trt = import_tensorrt()
        torch = _import_torch_cuda(device)
        self.record = check_sidecar(plan_path, plugin_path, EngineEnvironment.detect(device))
        self._trt, self._torch = trt, torch
        self._device = torch.device("cuda", device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        load_plugin_library(trt, plugin_path)
        with torch.cuda.device(self._device):
            self._runtime = trt.Runtime(self._logger)
            self._engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
            if self._engine is None:
                raise RuntimeError(f"TensorRT could not deserialize {plan_path}; see the log above")
            self._context = self._engine.create_execution_context()
            self._stream = torch.cuda.Stream(self._device)
        torch_types = {
            trt.DataType.FLOAT: torch.float32,
            trt.DataType.HALF: torch.float16,
            trt.DataType.BF16: torch.bfloat16,
            trt.DataType.INT32: torch.int32,
            trt.DataType.INT64: torch.int64,
        }
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self.input_names = [
            n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT
        ]
        self.output_names = [n for n in names if n not in self.input_names]
        if len(self.output_names) != 1:
            raise ValueError(f"{plan_path} has outputs {self.output_names}; expected one ('out')")
        self._dtypes = {n: torch_types[self._engine.get_tensor_dtype(n)] for n in names}

    def forward(self, x, t, y, cfg_scale: float | None = None):
        import numpy as np

        torch = self._torch
        feeds = {"x": x, "t": t, "y": y}
        if "cfg_scale" in self.input_names:
            if cfg_scale is None:
                raise ValueError(
                    "this engine has classifier-free guidance folded in; pass cfg_scale"
                )
            feeds["cfg_scale"] = np.asarray(cfg_scale, dtype=np.float32)
        elif cfg_scale is not None:
            raise ValueError(
                "this engine has no cfg_scale input; apply guidance outside the backend"
            )
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ValueError(f"engine inputs {missing} are not fed by forward(x, t, y)")
        keep_alive = []
        with torch.cuda.device(self._device):
            for name in self.input_names:
                array = np.ascontiguousarray(feeds[name])
                if array.ndim > 0:
                    low, _, high = self._engine.get_tensor_profile_shape(name, 0)
                    check_batch(name, array.shape, tuple(low), tuple(high))
                tensor = (
                    torch.from_numpy(array).to(self._device, dtype=self._dtypes[name]).contiguous()
                )
                keep_alive.append(tensor)
                self._context.set_input_shape(name, tuple(tensor.shape))
                self._context.set_tensor_address(name, tensor.data_ptr())
            name = self.output_names[0]
            out = torch.empty(
                tuple(self._context.get_tensor_shape(name)),
                dtype=self._dtypes[name],
                device=self._device,
            )
            self._context.set_tensor_address(name, out.data_ptr())
            # The uploads ran on the current stream; TensorRT runs on its own.
            self._stream.wait_stream(torch.cuda.current_stream(self._device))
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed; see the log above")
            self._stream.synchronize()
        return out.float().cpu().numpy()

    __call__ = forward


# ---- CLI glue (wired into `python -m runtime` by the runtime CLI) -------------------------------


def add_build_engine_subparser(subparsers) -> argparse.ArgumentParser:
    """Adds `build-engine` to an argparse subparsers object; parsed args go to build_engine_main."""
    parser = subparsers.add_parser(
        "build-engine",
        help="build a TensorRT engine from an exported ONNX model",
        description="Build a TensorRT engine (.plan) with the TernaryMatMul plugin, and its build "
        "record <output>.json, on the GPU that will run it.",
    )
    parser.add_argument("onnx", type=Path, help="ONNX model written by `python -m exporter`")
    parser.add_argument(
        "--plugin", type=Path, required=True, help="path to libterdit_trt_plugin.so"
    )
    parser.add_argument("-o", "--output", type=Path, required=True, help="engine file to write")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument(
        "--fp16", dest="precision", action="store_const", const="fp16", help="build in float16"
    )
    precision.add_argument(
        "--bf16", dest="precision", action="store_const", const="bf16", help="build in bfloat16"
    )
    parser.set_defaults(precision=DEFAULT_PRECISION)
    parser.add_argument(
        "--min-batch", type=int, default=None, help=f"smallest batch (default {DEFAULT_MIN_BATCH})"
    )
    parser.add_argument(
        "--opt-batch",
        type=int,
        default=None,
        help=f"batch to tune for (default {DEFAULT_OPT_BATCH})",
    )
    parser.add_argument(
        "--max-batch", type=int, default=None, help=f"largest batch (default {DEFAULT_MAX_BATCH})"
    )
    parser.add_argument(
        "--workspace-gib",
        type=float,
        default=DEFAULT_WORKSPACE_GIB,
        help=f"TensorRT workspace limit in GiB (default {DEFAULT_WORKSPACE_GIB})",
    )
    parser.set_defaults(func=build_engine_main)
    return parser


def build_engine_main(args: argparse.Namespace) -> int:
    plan = build_engine(
        args.onnx,
        args.plugin,
        args.output,
        precision=args.precision,
        min_batch=args.min_batch,
        opt_batch=args.opt_batch,
        max_batch=args.max_batch,
        workspace_gib=args.workspace_gib,
    )
    print(f"wrote {plan} and {sidecar_path(plan)}")
    return 0
