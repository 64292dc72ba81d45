"""ONNX Runtime sessions, set up in one place for the exporter's validation and the runtime."""
from __future__ import annotations

import os
from typing import Optional, Sequence

from .entry import signals_held
from .errors import UserError

# How a session runs terdit::TernaryMatMul: "auto" registers the terdit CPU kernels when they
# load (else the file's portable function runs), "native" requires them, "function" never uses them.
KERNEL_CHOICES = ("auto", "native", "function")
FUNCTION_PATH = "portable ONNX function"


def ort_session(path: str | os.PathLike, *, threads: Optional[int] = None,
                providers: Optional[Sequence[str]] = None, fold_constants: bool = True,
                kernels: str = "function", flag: str = "",
                fix: str = "re-export it with `python -m exporter`"):
    """An InferenceSession for `path`: the CUDA execution provider when present (else CPU),
    quiet logging, `threads` intra-op threads (default: ORT's). fold_constants=False keeps ORT
    from decoding every ternary weight to fp32 at load time (~5x the weights in RAM; large
    models). `kernels` (KERNEL_CHOICES) says how TernaryMatMul runs; the session's
    `terdit_kernels` attribute names the path. Files ORT refuses (truncated, external data outside
    the directory, ...) are a UserError naming the file (after `flag`, the option that gave it)
    and `fix`."""
    try:
        with signals_held():
            import onnxruntime as ort
    except ImportError:
        raise UserError("ONNX Runtime is not installed: pip install onnxruntime") from None
    if kernels not in KERNEL_CHOICES:
        raise UserError(f"--kernels {kernels!r}: choose one of {', '.join(KERNEL_CHOICES)}")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    path_text = path_id = FUNCTION_PATH
    if kernels != "function":
        from . import cpukernels
        try:
            path_text = path_id = cpukernels.register_ort(so)
        except cpukernels.CpuKernelError as err:
            if kernels == "native":
                raise UserError(f"--kernels native: {err}") from None
            path_text = f"{FUNCTION_PATH} ({err})"
    if threads:
        so.intra_op_num_threads = int(threads)
    available = ort.get_available_providers()
    if providers is None:
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                     if p in available]
    disabled = [] if fold_constants else ["ConstantFolding"]
    try:
        session = ort.InferenceSession(str(path), so, providers=list(providers),
                                       disabled_optimizers=disabled)
    except Exception as err:  # noqa: BLE001 - ORT raises its own exception types
        text = " ".join(str(err).split())
        where = f"{flag} {path}" if flag else str(path)
        raise UserError(f"{where}: ONNX Runtime cannot load the model ({text[:300]}); "
                        f"{fix}") from None
    session.terdit_kernels = path_text
    session.terdit_kernels_id = path_id                 # the path without the fallback's reason
    return session
