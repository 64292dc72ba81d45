"""Opening a backend: which one a model path takes, and its options checked against the protocol
(runtime/backends/protocol.py) before it is built."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from terdit_common.inputs import input_file
from terdit_common.manifest import MANIFEST_FILE, export_dir_of

from .protocol import (Backend, BackendError, act_quant_flag, check_act_quant, check_backend_options,
                       resolve_act_quant)

BACKENDS = ("ort", "trt", "torch")


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
    kwargs["act_quant"] = resolve_act_quant(kwargs.pop("w2a8", None), kwargs.get("act_quant"))
    kwargs = check_backend_options(backend, kwargs)
    if backend == "ort":
        if not is_export:
            raise BackendError(f"--model {path}: not an export directory (no {MANIFEST_FILE}); "
                               f"export it with `python -m exporter {path} -o DIR` or use "
                               f"--backend torch")
        check_act_quant(export_dir, kwargs.get("act_quant"), "ort")
        from .ort_backend import OrtBackend
        return OrtBackend(export_dir, threads=kwargs.get("threads"),
                          kernels=kwargs.get("kernels") or "auto")
    if backend == "trt":
        if kwargs.get("act_quant") is not None:
            if export_dir is None:
                raise BackendError(f"{act_quant_flag(kwargs['act_quant'])} with --backend trt "
                                   f"needs the plan inside its export directory ({path} is in "
                                   f"none)")
            check_act_quant(export_dir, kwargs["act_quant"], "trt")
        from ..tensorrt.backend import TensorRTBackend
        return TensorRTBackend(path, plugin=kwargs.get("plugin"))
    from .torch_backend import TorchBackend
    return TorchBackend(path, **kwargs)
