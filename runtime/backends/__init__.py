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
it lists (a changed byte is refused before any sampling). Every option acts or is refused:
BACKEND_OPTIONS lists what each backend uses, and `open_backend` refuses any other option given
to it, naming the flag and the backend (no flag is silently ignored).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Protocol

import numpy as np

from terdit_common.errors import UserError
from terdit_common.guidance import CFG_MODES
from terdit_common.inputs import input_file
from terdit_common.manifest import (MANIFEST_FILE, MODEL_FILE, export_dir_of, read_manifest,
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


def check_act_quant(export_dir: Path, act_quant: Optional[str], backend: str,
                    flag: str = "--act-quant") -> None:
    """ort / trt run the export's own activation mode: refuse another one (`act_quant` is
    resolve_act_quant's)."""
    if act_quant is None:
        return
    own = export_act_quant(export_dir)
    if act_quant != own:
        given = "--w2a8" if flag == "--w2a8" else f"--act-quant {act_quant}"
        raise BackendError(f"{given}: --backend {backend} runs the export's own "
                           f"activation mode, and {export_dir} was exported with act_quant={own}; "
                           f"re-export with `python -m exporter ... --act-quant {act_quant}`, drop "
                           f"{flag}, or use --backend torch")


def resolve_act_quant(w2a8: Optional[bool], act_quant: Optional[str]) -> Optional[str]:
    """--w2a8 is --act-quant fp8: the one activation-mode option the backends see (None: the
    backend's default)."""
    from terdit_common.op import ACT_QUANT
    if act_quant is not None and act_quant not in ACT_QUANT:
        raise BackendError(f"--act-quant {act_quant!r}: choose one of {', '.join(ACT_QUANT)}")
    if w2a8 not in (None, True, False):
        raise BackendError(f"w2a8={w2a8!r}: must be True or False")
    if w2a8 and act_quant not in (None, "fp8"):
        raise BackendError(f"--w2a8 selects act_quant=fp8 but --act-quant is {act_quant}; "
                           f"give one of them")
    return "fp8" if w2a8 else act_quant


# What each backend acts on. An option given to a backend that does not use it is refused (no
# flag is silently ignored); its flag and the reason are named. None means "not given".
BACKEND_OPTIONS = {
    "ort": ("threads", "kernels", "act_quant"),
    "trt": ("plugin", "act_quant"),
    "torch": ("device", "dtype", "threads", "compile", "cuda_graphs", "act_quant"),
}
OPTION_FLAGS = {"threads": "--threads", "kernels": "--kernels", "act_quant": "--act-quant",
                "plugin": "--plugin", "device": "--device", "dtype": "--dtype",
                "compile": "--no-compile", "cuda_graphs": "--no-cuda-graphs"}
_GPU_CHOICE = "choose the GPU with CUDA_VISIBLE_DEVICES"
# option -> {backend that does not use it: why}
_WHY_NOT = {
    "threads": {"trt": "TensorRT runs on the GPU"},
    "kernels": {b: "it chooses how ONNX Runtime runs TernaryMatMul" for b in ("trt", "torch")},
    "plugin": {b: "it is the TensorRT plugin library" for b in ("ort", "torch")},
    "device": {"ort": f"ONNX Runtime takes the CUDA execution provider when present, else the "
                      f"CPU; {_GPU_CHOICE}",
               "trt": f"TensorRT runs on GPU 0; {_GPU_CHOICE}"},
    "dtype": {"ort": "an export runs in the dtype it was exported with: python -m exporter "
                     "--dtype",
              "trt": "an engine runs in the precision it was built with: build-engine --fp16 / "
                     "--bf16"},
    "compile": {b: "only the torch backend compiles blocks" for b in ("ort", "trt")},
    "cuda_graphs": {b: "only the torch backend captures CUDA graphs" for b in ("ort", "trt")},
}


def check_backend_options(backend: str, options: dict) -> dict:
    """The options (keyword -> value, None = not given) that `backend` acts on; an unknown
    keyword or one the backend does not use is a BackendError naming the flag and the backend."""
    for key, value in options.items():
        if key not in OPTION_FLAGS:
            raise BackendError(f"unknown backend option {key}={value!r}; the options are "
                               f"{', '.join(sorted(OPTION_FLAGS))} and w2a8 (keyword arguments "
                               f"of open_backend / TerDiTPipeline.from_pretrained)")
        if value is None or key in BACKEND_OPTIONS[backend]:
            continue
        users = [b for b, keys in BACKEND_OPTIONS.items() if key in keys]
        flag = OPTION_FLAGS[key]
        if isinstance(value, bool):       # --no-compile / --no-cuda-graphs give False
            shown = flag if value is False else f"{key}=True"
        else:
            shown = f"{flag} {value}"
        raise BackendError(f"{shown}: --backend {backend} does not use it "
                           f"({_WHY_NOT[key][backend]}); drop it or use --backend "
                           f"{' / '.join(users)}")
    return {k: v for k, v in options.items() if v is not None}


def default_backend(model: str | os.PathLike) -> str:
    """The backend a model path opens with when none is given: ort for an export, torch for a
    checkpoint."""
    return "ort" if export_dir_of(model) is not None else "torch"


def open_backend(model: str | os.PathLike, backend: Optional[str] = None, **kwargs) -> Backend:
    """`model` is an export directory (any backend) or a checkpoint (torch); `backend` None picks
    ort for export directories and torch for checkpoints. kwargs are the backend options of
    BACKEND_OPTIONS (threads and kernels for ort; plugin for trt; device, dtype, threads, compile,
    cuda_graphs for torch; act_quant, or w2a8 as act_quant="fp8", for all); one the chosen backend
    does not use is refused. act_quant (None: the export's own for ort / trt, "none" for torch)
    selects the activation mode of the ternary products; ort and trt refuse a mode other than
    the export's."""
    if not isinstance(model, (str, os.PathLike)):
        raise BackendError(f"model={model!r}: pass the path of an export directory or a "
                           f"checkpoint")
    path = Path(model)
    if not path.exists():
        raise BackendError(f"--model {path}: no such file or directory")
    if not path.is_dir():
        input_file(path, "--model", "pass an export directory or a checkpoint")
    export_dir = export_dir_of(path)
    is_export = export_dir is not None
    backend = backend or default_backend(path)
    if backend not in BACKENDS:
        raise BackendError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    flag = "--w2a8" if kwargs.get("w2a8") else "--act-quant"
    kwargs["act_quant"] = resolve_act_quant(kwargs.pop("w2a8", None), kwargs.get("act_quant"))
    kwargs = check_backend_options(backend, kwargs)
    if backend == "ort":
        if not is_export:
            raise BackendError(f"--model {path}: not an export directory (no {MANIFEST_FILE}); "
                               f"export it with `python -m exporter {path} -o DIR` or use "
                               f"--backend torch")
        check_act_quant(export_dir, kwargs.get("act_quant"), "ort", flag)
        from .ort_backend import OrtBackend
        return OrtBackend(export_dir, threads=kwargs.get("threads"),
                          kernels=kwargs.get("kernels") or "auto")
    if backend == "trt":
        if kwargs.get("act_quant") is not None:
            if export_dir is None:
                raise BackendError(f"{flag} with --backend trt needs the plan inside its "
                                   f"export directory ({path} is in none)")
            check_act_quant(export_dir, kwargs["act_quant"], "trt", flag)
        from .trt_backend import TensorRTBackend
        return TensorRTBackend(path, plugin=kwargs.get("plugin"))
    from .torch_backend import TorchBackend
    return TorchBackend(path, **kwargs)


__all__ = ["BACKENDS", "BACKEND_OPTIONS", "Backend", "BackendError", "ModelInfo",
           "check_backend_options", "default_backend", "export_act_quant", "open_backend",
           "open_export", "resolve_act_quant"]
