"""The backend protocol (docs/design.md section 6): what every backend (ort, trt, torch)
implements and the rules all of them follow, written once here and held per backend by
tests/test_backend_protocol.py.

    forward(x, t, y, cfg_scale=None) -> out        (numpy in, numpy float32 out)

x (B, C, H, W) float32, t (B,) float32 timesteps, y (B,) int64 labels; out (B, C or 2C, H, W).

The cfg_scale rule (`check_cfg_scale`): a backend whose graph has classifier-free guidance
folded in (`info.folded_cfg`, an export made with `--cfg official|standard`) takes B images and
requires cfg_scale, a finite number; every other backend is guided by the sampler (the doubled
[cond; uncond] batch) and refuses a cfg_scale. Nothing is silently assumed.

Errors: every refusal of these rules is a BackendError (a UserError: one line naming the file or
flag); what a backend opens raises the checks' own UserError subclasses (manifest, checkpoint).
Options: BACKEND_OPTIONS lists what each backend acts on; `check_backend_options` refuses any
other option given to it, naming the flag and the backend (no flag is silently ignored).
`settings` is what changes the images beyond the model file (a resumed run must use the same).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Protocol

import numpy as np

from terdit_common.errors import UserError
from terdit_common.manifest import MANIFEST_FILE, read_manifest
from terdit_common.op import ACT_QUANT, ACT_QUANT_DEFAULT
from terdit_common.sampling import ModelInfo


class BackendError(UserError):
    """A backend that cannot be used here; the message says why and what to do."""


class Backend(Protocol):
    info: ModelInfo
    name: str
    settings: dict          # what changes the images beyond the model file (e.g. torch's dtype)

    def forward(self, x: np.ndarray, t: np.ndarray, y: np.ndarray,
                cfg_scale: Optional[float] = None) -> np.ndarray: ...


def check_cfg_scale(info: ModelInfo, cfg_scale) -> Optional[np.ndarray]:
    """The one cfg_scale rule of every backend's forward: a folded graph needs a finite number
    (returned as the 0-d float32 input), any other model refuses one (returns None)."""
    if info.folded_cfg:
        if cfg_scale is None or isinstance(cfg_scale, bool) or not isinstance(
                cfg_scale, (int, float, np.floating, np.integer)) or not math.isfinite(cfg_scale):
            raise BackendError(f"{info.source} has classifier-free guidance folded in (--cfg "
                               f"{info.folded_cfg}); forward needs cfg_scale, a finite number, "
                               f"got {cfg_scale!r}")
        return np.asarray(cfg_scale, dtype=np.float32)
    if cfg_scale is not None:
        raise BackendError(f"{info.source} has no guidance in its graph: forward takes no "
                           f"cfg_scale (the sampler guides with the [cond; uncond] batch); "
                           f"export with --cfg official|standard to fold it in")
    return None


def export_act_quant(export_dir: Path) -> str:
    """The TernaryMatMul activation mode an export directory's file computes (its manifest's
    graph.act_quant; exports before the field are weight-only)."""
    mode = read_manifest(export_dir).get("graph", {}).get("act_quant", ACT_QUANT_DEFAULT)
    if mode not in ACT_QUANT:
        raise BackendError(f"{export_dir / MANIFEST_FILE}: field 'graph.act_quant' is {mode!r}, "
                           f"not one of {', '.join(ACT_QUANT)}; re-export the model")
    return mode


def act_quant_flag(act_quant: str) -> str:
    """How a user asks for `act_quant` on the command line (fp8 has two spellings)."""
    return f"--act-quant {act_quant}" + (" (--w2a8)" if act_quant == "fp8" else "")


def check_act_quant(export_dir: Path, act_quant: Optional[str], backend: str) -> None:
    """ort / trt run the export's own activation mode: refuse another one (`act_quant` is
    resolve_act_quant's)."""
    if act_quant is None:
        return
    own = export_act_quant(export_dir)
    if act_quant != own:
        raise BackendError(f"{act_quant_flag(act_quant)}: --backend {backend} runs the export's "
                           f"own activation mode, and {export_dir} was exported with "
                           f"act_quant={own}; re-export with `python -m exporter ... --act-quant "
                           f"{act_quant}`, drop the flag, or use --backend torch")


def resolve_act_quant(w2a8: Optional[bool], act_quant: Optional[str]) -> Optional[str]:
    """--w2a8 is --act-quant fp8: the one activation-mode option the backends see (None: the
    backend's default)."""
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
