"""What a TensorRT plan is tied to, and its build record.

Every plan gets a build record beside it, ``<plan>.json`` (the sidecar): TensorRT version, GPU name
and compute capability, sha256 of the plugin library, of the ONNX file and of the plan itself,
precision and batch profile. TensorRT engines are specific to all of these, and a mismatch otherwise
shows up as a deserialization failure or a wrong plugin at run time.

TensorRT and torch's CUDA build are imported only by the functions that use them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from terdit_common.entry import signals_held
from terdit_common.files import atomic_write_bytes, sha256_file

from ..backends.protocol import BackendError

SIDECAR_FORMAT = 1

INSTALL_HINT = (
    "TensorRT's Python package is not installed. Install the build matching your CUDA major "
    "version, e.g. `pip install tensorrt-cu12` (or tensorrt-cu13); the PyPI packages are stubs "
    "that download the real wheels from NVIDIA's package index, so the machine needs access to it. "
    "See NVIDIA's TensorRT installation guide."
)


class EngineMismatchError(BackendError):
    """A plan's build record does not match this machine, TensorRT or plugin library."""


# ---- Imports at call time --------------------------------------------------------------------


class TensorRTUnavailable(BackendError):
    """TensorRT (or a CUDA GPU for it) is not available here; the message says how to get it."""


def import_tensorrt():
    """Returns the ``tensorrt`` module, or raises TensorRTUnavailable with install instructions."""
    try:
        with signals_held():
            import tensorrt
    except ImportError:
        raise TensorRTUnavailable(INSTALL_HINT) from None
    return tensorrt


def import_torch_cuda(device: int):
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable(
            "the TensorRT backend needs a CUDA GPU and a CUDA build of torch "
            f"(torch {torch.__version__} sees no GPU); use --backend ort or torch on this "
            "machine"
        )
    if device >= torch.cuda.device_count():
        raise BackendError(
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
    raise TensorRTUnavailable(
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
    batch_profile,
    input_shapes: Mapping[str, Mapping[str, Sequence[int]]],
    plugin_layers: int,
    ternary_nodes: int,
    act_quant: Sequence[str],
) -> dict[str, Any]:
    """The sidecar content for a plan built in `environment`."""
    return {
        "format": SIDECAR_FORMAT,
        "tensorrt_version": environment.tensorrt_version,
        "gpu": {"name": environment.gpu_name, "compute_capability": environment.compute_capability},
        "plugin": {"file": plugin_path.name, "sha256": sha256_file(plugin_path)},
        "onnx": {"file": onnx_path.name, "sha256": sha256_file(onnx_path)},
        "plan_sha256": plan_sha256,
        "precision": precision,
        "batch_profile": dataclasses.asdict(batch_profile) if batch_profile is not None else None,
        "input_shapes": {
            name: {k: list(v) for k, v in shapes.items()} for name, shapes in input_shapes.items()
        },
        "plugin_layers": plugin_layers,      # TernaryMatMul nodes mapped to the plugin
        "ternary_nodes": ternary_nodes,      # TernaryMatMul nodes in the ONNX file
        "act_quant": list(act_quant),        # their act_quant values
    }


def write_plan(
    plan_path: Path, plan: bytes | bytearray | memoryview, record: Mapping[str, Any]
) -> Path:
    """Writes the plan, then its sidecar, each atomically. The sidecar holds the plan's sha256, so
    a plan paired with a stale sidecar (a crash between the two renames) is refused by
    check_sidecar."""
    plan_path = Path(plan_path)
    if record.get("plan_sha256") != hashlib.sha256(plan).hexdigest():
        raise BackendError("record['plan_sha256'] is not the sha256 of the plan being written")
    atomic_write_bytes(plan_path, plan)
    atomic_write_bytes(
        sidecar_path(plan_path), (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
    )
    return plan_path


def check_sidecar(
    plan_path: str | os.PathLike,
    plugin_path: str | os.PathLike,
    environment: EngineEnvironment | None = None,
    onnx_sha256: str | None = None,
) -> dict[str, Any]:
    """Returns the plan's build record, or raises EngineMismatchError naming every field that does
    not match this machine (`environment`, detected when None), the plugin library, the plan or
    (when `onnx_sha256` is given: the export's model.onnx) the ONNX file it was built from."""
    plan_path, plugin_path = Path(plan_path), Path(plugin_path)
    record_path = sidecar_path(plan_path)
    if not record_path.is_file():
        raise BackendError(
            f"{record_path} not found: {plan_path} has no build record; rebuild it with "
            f"`python -m runtime build-engine MODEL.onnx --plugin {plugin_path} -o {plan_path}`"
        )
    try:
        record = json.loads(record_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BackendError(f"{record_path} is not a valid build record: {e}") from e
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
        "plugin.sha256": sha256_file(plugin_path),
        "plan_sha256": sha256_file(plan_path),
    }
    if onnx_sha256 is not None:
        expected["onnx.sha256"] = onnx_sha256
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
            f"{plan_path} does not fit this machine, TensorRT, plugin library or export ("
            + "; ".join(mismatches)
            + "); rebuild it here with `python -m runtime build-engine MODEL.onnx "
            f"--plugin {plugin_path} -o {plan_path}`"
        )
    return record
