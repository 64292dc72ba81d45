"""Model backends. Each implements one small protocol, so guidance and schedulers are shared:

    forward(x, t, y, cfg_scale=None) -> out        (numpy in, numpy float32 out)

x (B, C, H, W) float32, t (B,) float32 timesteps, y (B,) int64 labels; out (B, C or 2C, H, W).
A backend whose graph has classifier-free guidance folded in (`info.folded_cfg`) takes B images
and cfg_scale; the others are guided by the sampler.

| backend | runs                                         | module           |
|---------|----------------------------------------------|------------------|
| ort     | an export directory in ONNX Runtime          | ort_backend.py   |
| trt     | a TensorRT plan built from an export         | trt_backend.py   |
| torch   | an export directory or a checkpoint, PyTorch | torch_backend.py |

Every backend checks what it opens: an export directory's manifest and the sha256 of every file
it lists (a changed byte is refused before any sampling).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Protocol

import numpy as np

from terdit_common.errors import UserError
from terdit_common.guidance import CFG_MODES
from terdit_common.manifest import (MANIFEST_FILE, MODEL_FILE, is_export_dir, read_manifest,
                                    verify_files)
from terdit_common.sampling import ModelInfo

BACKENDS = ("ort", "trt", "torch")


class BackendError(UserError):
    """A backend that cannot be used here; the message says why and what to do."""


class Backend(Protocol):
    info: ModelInfo
    name: str

    def forward(self, x: np.ndarray, t: np.ndarray, y: np.ndarray,
                cfg_scale: Optional[float] = None) -> np.ndarray: ...


def open_export(export_dir: Path) -> tuple[dict, ModelInfo]:
    """The checked manifest of an export directory (every listed file hashed and compared) and
    the ModelInfo it describes (sha256 = model.onnx's)."""
    manifest = read_manifest(export_dir)
    hashes = verify_files(export_dir, manifest)
    graph = manifest.get("graph", {})
    folded = graph.get("cfg") if graph.get("cfg") in CFG_MODES else None
    metadata = manifest.get("metadata")
    if metadata is None:                                   # exports before self-contained dirs
        metadata = manifest.get("source", {}).get("metadata", {})
    if not isinstance(metadata, dict):
        raise BackendError(f"{export_dir / MANIFEST_FILE}: field 'metadata' is "
                           f"{type(metadata).__name__}, expected an object; re-export the model")
    info = ModelInfo(manifest["config"], str(export_dir / MODEL_FILE), hashes[MODEL_FILE],
                     folded, metadata)
    _check_config(export_dir, info)
    return manifest, info


def _check_config(where: Path, info: ModelInfo) -> None:
    from terdit_common.limits import check_model_config
    try:
        check_model_config(info.config)
    except ValueError as err:
        raise BackendError(f"{where / MANIFEST_FILE}: field 'config': {err}; re-export the "
                           f"model") from None


def export_act_quant(export_dir: Path) -> str:
    """The TernaryMatMul activation mode an export directory's file computes (its manifest's
    graph.act_quant; exports before the field are weight-only)."""
    from terdit_common.op import ACT_QUANT, ACT_QUANT_DEFAULT
    mode = read_manifest(export_dir).get("graph", {}).get("act_quant", ACT_QUANT_DEFAULT)
    if mode not in ACT_QUANT:
        raise BackendError(f"{export_dir / MANIFEST_FILE}: field 'graph.act_quant' is {mode!r}, "
                           f"not one of {', '.join(ACT_QUANT)}; re-export the model")
    return mode


def check_act_quant(export_dir: Path, act_quant: Optional[str], backend: str) -> None:
    """ort / trt run the export's own activation mode: refuse another one."""
    if act_quant is None:
        return
    from terdit_common.op import ACT_QUANT
    if act_quant not in ACT_QUANT:
        raise BackendError(f"--act-quant {act_quant!r}: choose one of {', '.join(ACT_QUANT)}")
    own = export_act_quant(export_dir)
    if act_quant != own:
        raise BackendError(f"--act-quant {act_quant}: --backend {backend} runs the export's own "
                           f"activation mode, and {export_dir} was exported with act_quant={own}; "
                           f"re-export with `python -m exporter ... --act-quant {act_quant}`, drop "
                           f"--act-quant, or use --backend torch")


def open_backend(model: str | os.PathLike, backend: Optional[str] = None, **kwargs) -> Backend:
    """`model` is an export directory (any backend) or a checkpoint (torch); `backend` None picks
    ort for export directories and torch for checkpoints. kwargs go to the backend (threads and
    kernels for ort; plugin for trt; device, dtype, compile, cuda_graphs, w2a8, act_quant for torch).
    act_quant (None: the export's own for ort / trt, "none" for torch) selects the activation
    mode of torch's ternary products; ort and trt refuse a mode other than the export's."""
    path = Path(model)
    if not path.exists():
        raise BackendError(f"--model {path}: no such file or directory")
    is_export = is_export_dir(path) or (path.is_file() and is_export_dir(path.parent)
                                        and path.suffix in (".onnx", ".plan"))
    backend = backend or ("ort" if is_export else "torch")
    if backend not in BACKENDS:
        raise BackendError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "ort":
        if not is_export:
            raise BackendError(f"--model {path}: not an export directory (no {MANIFEST_FILE}); "
                               f"export it with `python -m exporter {path} -o DIR` or use "
                               f"--backend torch")
        check_act_quant(path if path.is_dir() else path.parent, kwargs.get("act_quant"), "ort")
        from .ort_backend import OrtBackend
        return OrtBackend(path if path.is_dir() else path.parent, threads=kwargs.get("threads"),
                          kernels=kwargs.get("kernels") or "auto")
    if backend == "trt":
        if kwargs.get("act_quant") is not None:
            export_dir = path if path.is_dir() else path.parent
            if not is_export_dir(export_dir):
                raise BackendError(f"--act-quant with --backend trt needs the plan inside its "
                                   f"export directory ({export_dir} has no {MANIFEST_FILE})")
            check_act_quant(export_dir, kwargs["act_quant"], "trt")
        from .trt_backend import TensorRTBackend
        return TensorRTBackend(path, plugin=kwargs.get("plugin"))
    from .torch_backend import TorchBackend
    keys = ("device", "dtype", "compile", "cuda_graphs", "w2a8", "act_quant")
    return TorchBackend(path, **{k: kwargs[k] for k in keys if k in kwargs})


__all__ = ["BACKENDS", "Backend", "BackendError", "ModelInfo", "export_act_quant", "open_backend",
           "open_export"]
