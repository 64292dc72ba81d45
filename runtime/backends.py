"""Model backends. Each implements one small protocol, so guidance and schedulers are shared:

    forward(x, t, y, cfg_scale=None) -> out        (numpy in, numpy float32 out)

x (B, C, H, W) float32, t (B,) float32 timesteps, y (B,) int64 labels; out (B, C or 2C, H, W).
A backend whose graph has classifier-free guidance folded in (`folded_cfg`) takes B images and
cfg_scale; the others are guided by the pipeline.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol

import numpy as np

BACKENDS = ("ort", "trt", "torch")
MANIFEST_FILE = "manifest.json"
CFG_MODES = ("official", "standard")


class BackendError(RuntimeError):
    """A backend that cannot be used here; the message says why and what to do."""


@dataclass
class ModelInfo:
    """What the sampler needs to know about a model, whatever backend runs it."""

    config: dict
    source: str
    sha256: str
    folded_cfg: Optional[str] = None          # "official" | "standard" when guidance is in-graph
    metadata: dict = field(default_factory=dict)

    @property
    def in_channels(self) -> int:
        return int(self.config["in_channels"])

    @property
    def input_size(self) -> int:
        return int(self.config["input_size"])

    @property
    def num_classes(self) -> int:
        return int(self.config["num_classes"])

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def default_cfg_mode(self) -> str:
        return "official" if self.in_channels == 4 else "standard"

    @property
    def class_names(self) -> Optional[list[str]]:
        names = self.metadata.get("class_names")
        return list(names) if isinstance(names, list) else None


class Backend(Protocol):
    info: ModelInfo
    name: str

    def forward(self, x: np.ndarray, t: np.ndarray, y: np.ndarray,
                cfg_scale: Optional[float] = None) -> np.ndarray: ...


def read_manifest(export_dir: Path) -> dict:
    path = export_dir / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BackendError(f"{export_dir}: no {MANIFEST_FILE}; pass a directory written by "
                           f"`python -m exporter` or a checkpoint with --backend torch") from None
    except json.JSONDecodeError as err:
        raise BackendError(f"{path}: not valid JSON ({err})") from None
    if manifest.get("format") != "terdit-onnx":
        raise BackendError(f"{path}: field 'format' is {manifest.get('format')!r}, expected "
                           f"'terdit-onnx'")
    return manifest


def _info_from_manifest(manifest: dict, model_file: Path) -> ModelInfo:
    graph = manifest.get("graph", {})
    folded = graph.get("cfg") if graph.get("cfg") in CFG_MODES else None
    sha = manifest.get("files", {}).get(model_file.name, {}).get("sha256", "")
    return ModelInfo(manifest["config"], str(model_file), sha, folded,
                     manifest.get("source", {}).get("metadata", {}) or {})


class OrtBackend:
    """ONNX Runtime over an exported directory (CUDA execution provider when available)."""

    name = "ort"

    def __init__(self, export_dir: str | os.PathLike, threads: Optional[int] = None,
                 providers: Optional[list[str]] = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError("the ort backend needs onnxruntime: pip install onnxruntime") from None
        export_dir = Path(export_dir)
        manifest = read_manifest(export_dir)
        model_file = export_dir / "model.onnx"
        if not model_file.is_file():
            raise BackendError(f"{model_file}: file not found")
        self.info = _info_from_manifest(manifest, model_file)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        # Constant folding would decode every ternary weight to fp32 at load time (~5x the
        # weights in RAM); large models skip it.
        disabled = ["ConstantFolding"] if manifest.get("graph", {}).get("large_model") else []
        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = ort.InferenceSession(str(model_file), so, providers=providers,
                                            disabled_optimizers=disabled)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.providers = self.session.get_providers()

    def forward(self, x, t, y, cfg_scale=None):
        feeds = {"x": np.ascontiguousarray(x, np.float32), "t": np.ascontiguousarray(t, np.float32),
                 "y": np.ascontiguousarray(y, np.int64)}
        if "cfg_scale" in self.input_names:
            feeds["cfg_scale"] = np.asarray(1.0 if cfg_scale is None else cfg_scale, np.float32)
        return self.session.run(None, feeds)[0].astype(np.float32, copy=False)


class TorchBackend:
    """The PyTorch model (terdit). On CUDA it uses the project's kernels when they load."""

    name = "torch"

    def __init__(self, path: str | os.PathLike, device: Optional[str] = None,
                 dtype: Optional[str] = None, compile: bool = True, cuda_graphs: bool = True,
                 fp8: bool = False, fp8_fast_accum: bool = False) -> None:
        try:
            import torch
            from terdit import load_checkpoint
            from terdit.fused import FusedTerDiT
        except ImportError as err:
            raise BackendError(f"the torch backend needs torch and terdit ({err})") from None
        path = Path(path)
        if path.is_dir() and (path / MANIFEST_FILE).is_file():
            manifest = read_manifest(path)
            src = Path(manifest.get("source", {}).get("path", ""))
            if not src.exists():
                raise BackendError(f"{path} is an ONNX export; its source checkpoint {src} is not "
                                   f"here. Pass the checkpoint itself to --backend torch")
            path = src
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.kernels = "reference"
        if self.device.type == "cuda":
            try:
                from terdit import kernels
                kernels.load()
                self.kernels = "cuda"
            except Exception as err:  # noqa: BLE001 - fall back loudly, still correct
                import warnings
                warnings.warn(f"CUDA TernaryMatMul kernels unavailable ({err}); using the "
                              f"reference op (slow)")
        loaded = load_checkpoint(path, packed=True)
        tdtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
            dtype or ("bf16" if self.device.type == "cuda" else "fp32")]
        self.model = FusedTerDiT(loaded.model).to(self.device, tdtype).eval()
        self._torch = torch
        self._run = self.model
        if self.kernels == "cuda" or fp8:
            # on the CPU FP8 runs torch's emulated _scaled_mm (slow; for accuracy studies)
            from terdit.accel import AcceleratedTerDiT
            on_gpu = self.kernels == "cuda"
            self._run = AcceleratedTerDiT(self.model, compile=compile and on_gpu,
                                          cuda_graphs=cuda_graphs and on_gpu, fp8=fp8,
                                          fp8_fast_accum=fp8_fast_accum)
        files = [p for p in loaded.files if Path(p).is_file()]
        from .io import sha256_file
        sha = sha256_file(files[-1]) if files else ""
        self.info = ModelInfo(loaded.model.cfg.to_dict(), str(path), sha, None,
                              loaded.metadata or {})

    def forward(self, x, t, y, cfg_scale=None):
        torch = self._torch
        with torch.no_grad():
            out = self._run(torch.from_numpy(np.ascontiguousarray(x)).to(self.device),
                             torch.from_numpy(np.ascontiguousarray(t, np.float32)).to(self.device),
                             torch.from_numpy(np.ascontiguousarray(y, np.int64)).to(self.device))
        return out.float().cpu().numpy()


class TrtBackend:
    """A TensorRT plan (+ its sidecar) built by `python -m runtime build-engine`."""

    name = "trt"

    def __init__(self, path: str | os.PathLike, plugin: Optional[str] = None) -> None:
        from .tensorrt_engine import TensorRTBackend
        path = Path(path)
        export_dir = path if path.is_dir() else path.parent
        plan = path if path.is_file() else export_dir / "model.plan"
        if not plan.is_file():
            raise BackendError(f"{plan}: no TensorRT plan; build one with `python -m runtime "
                               f"build-engine {export_dir / 'model.onnx'} --plugin LIB -o {plan}`")
        plugin = plugin or os.environ.get("TERDIT_TRT_PLUGIN")
        if not plugin:
            raise BackendError("--backend trt needs the plugin library: pass --plugin PATH or set "
                               "TERDIT_TRT_PLUGIN")
        try:
            self.engine = TensorRTBackend(plan, plugin)
        except ImportError as err:
            raise BackendError(str(err)) from None
        manifest = read_manifest(export_dir)
        self.info = _info_from_manifest(manifest, export_dir / "model.onnx")
        from .io import sha256_file
        self.info.sha256 = sha256_file(plan)

    def forward(self, x, t, y, cfg_scale=None):
        return self.engine.forward(x, t, y, cfg_scale if self.info.folded_cfg else None)


def open_backend(model: str | os.PathLike, backend: Optional[str] = None, **kwargs) -> Backend:
    """`model` is an export directory (ort / trt) or a checkpoint (torch); `backend` None picks
    ort for export directories and torch for checkpoints."""
    path = Path(model)
    if not path.exists():
        raise BackendError(f"{path}: no such file or directory")
    is_export = path.is_dir() and (path / MANIFEST_FILE).is_file()
    backend = backend or ("ort" if is_export else "torch")
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "ort":
        if not is_export:
            raise BackendError(f"{path} is not an exported directory (no {MANIFEST_FILE}); export "
                               f"it with `python -m exporter {path} -o DIR` or use --backend torch")
        return OrtBackend(path, threads=kwargs.get("threads"))
    if backend == "trt":
        return TrtBackend(path, kwargs.get("plugin"))
    return TorchBackend(path, device=kwargs.get("device"), dtype=kwargs.get("dtype"),
                        compile=kwargs.get("compile", True),
                        cuda_graphs=kwargs.get("cuda_graphs", True), fp8=kwargs.get("fp8", False),
                        fp8_fast_accum=kwargs.get("fp8_fast_accum", False))
