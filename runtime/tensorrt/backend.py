"""TensorRT over a plan built by `python -m runtime build-engine` (TensorRT, the plugin library and
the device memory piece, torch's CUDA build by default, are imported / loaded when the backend is
opened)."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from terdit_common.inputs import input_file
from terdit_common.manifest import PLAN_FILE, open_export

from ..backends.protocol import BackendError, check_cfg_scale
from .engine_build import load_plugin_library
from .record import EngineEnvironment, check_sidecar, import_tensorrt, import_torch_cuda

# TensorRT I/O types the backend feeds and reads, by the names DeviceTransfer uses
IO_TYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32",
            "INT64": "int64"}


def check_batch(name: str, shape: Sequence[int], low: Sequence[int], high: Sequence[int]) -> None:
    """Raises ValueError when `shape` lies outside the engine's profile [low, high] for `name`."""
    if len(shape) != len(low) or any(s < lo or s > hi for s, lo, hi in zip(shape, low, high)):
        raise BackendError(
            f"input '{name}' has shape {list(shape)}, outside the engine's profile {list(low)} .. "
            f"{list(high)}; rebuild the engine with --min-batch / --max-batch covering it or "
            "split the batch"
        )


class TorchCudaTransfer:
    """numpy <-> GPU memory through torch's CUDA build: the one piece of the backend that touches
    device memory (tests give the backend a host stand-in with the same methods). Everything
    runs on one CUDA stream, the one TensorRT executes on, so uploads, the engine and the
    download are ordered without extra events."""

    def __init__(self, device: int) -> None:
        torch = import_torch_cuda(device)
        self._torch, self._device = torch, torch.device("cuda", device)
        self._stream = torch.cuda.Stream(self._device)
        self.stream_handle = self._stream.cuda_stream

    def device(self):
        """Context in which TensorRT objects are created and run (the CUDA device)."""
        return self._torch.cuda.device(self._device)

    def upload(self, array: np.ndarray, dtype: str):
        torch = self._torch
        with torch.cuda.stream(self._stream):
            return torch.tensor(array).to(self._device, getattr(torch, dtype)).contiguous()

    def empty(self, shape: Sequence[int], dtype: str):
        torch = self._torch
        with torch.cuda.stream(self._stream):
            return torch.empty(tuple(shape), dtype=getattr(torch, dtype), device=self._device)

    @staticmethod
    def address(buffer) -> int:
        return buffer.data_ptr()

    def download(self, buffer) -> np.ndarray:
        with self._torch.cuda.stream(self._stream):
            out = buffer.float().cpu()
        self._stream.synchronize()
        return out.numpy()


class TensorRTBackend:
    """Runs a plan built by `python -m runtime build-engine` from an export directory.
    forward(x, t, y) takes and returns numpy arrays, like every runtime backend: x (B, C, H, W)
    float, t (B,) float32, y (B,) int64 -> (B, 2C, H, W) float32. A plan exported with
    classifier-free guidance folded in also needs cfg_scale (a 0-d input).

    `path` is the export directory (its model.plan) or the plan itself (inside or beside the
    export directory whose manifest describes the model); `plugin` the plugin library (default:
    environment variable TERDIT_TRT_PLUGIN); `transfer` the device memory piece (default:
    TorchCudaTransfer(device))."""

    name = "trt"
    settings: dict = {}                  # the plan (hashed in the build record) fixes everything

    def __init__(self, path: str | os.PathLike, plugin: str | os.PathLike | None = None,
                 device: int = 0, transfer: Optional[Any] = None):
        path = Path(path)
        export_dir = path if path.is_dir() else path.parent
        plan_path = path if path.is_file() else export_dir / PLAN_FILE
        if not plan_path.exists():
            raise BackendError(f"{plan_path}: no TensorRT plan; build one with `python -m "
                               f"runtime build-engine {export_dir} --plugin LIB -o {plan_path}`")
        input_file(plan_path, "--model", f"pass a plan built by `python -m runtime build-engine "
                                         f"{export_dir} --plugin LIB`")
        plugin = plugin or os.environ.get("TERDIT_TRT_PLUGIN")
        if not plugin:
            raise BackendError("--backend trt needs the plugin library: pass --plugin PATH or "
                               "set TERDIT_TRT_PLUGIN")
        plugin_path = input_file(plugin, "--plugin", "build the plugin with CMake "
                                 "(plugins/ternaryMatMulPlugin/README.md)")
        _, self.info = open_export(export_dir)
        trt = import_tensorrt()
        self._transfer = transfer if transfer is not None else TorchCudaTransfer(device)
        # the plan must be built from this export's model.onnx (a plan copied from another
        # export would run other weights under this export's name)
        self.record = check_sidecar(plan_path, plugin_path, EngineEnvironment.detect(device),
                                    onnx_sha256=self.info.sha256)
        self._logger = trt.Logger(trt.Logger.WARNING)
        load_plugin_library(trt, plugin_path)
        with self._transfer.device():
            self._runtime = trt.Runtime(self._logger)
            self._engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
            if self._engine is None:
                raise BackendError(f"TensorRT could not deserialize {plan_path}; see the log above")
            self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self.input_names = [
            n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT
        ]
        self.output_names = [n for n in names if n not in self.input_names]
        if len(self.output_names) != 1:
            raise BackendError(f"{plan_path} has outputs {self.output_names}; expected one ('out')")
        self._dtypes = {}
        for n in names:
            dtype = self._engine.get_tensor_dtype(n)
            if dtype.name not in IO_TYPES:
                raise BackendError(f"{plan_path}: tensor '{n}' is {dtype.name}; the backend "
                                   f"feeds {', '.join(IO_TYPES)}; re-export the model")
            self._dtypes[n] = IO_TYPES[dtype.name]
        if ("cfg_scale" in self.input_names) != bool(self.info.folded_cfg):
            raise BackendError(f"{plan_path}: a cfg_scale input and the export's graph.cfg "
                               f"({self.info.folded_cfg}) disagree; rebuild the engine from "
                               f"this export")
        self.info.sha256 = self.record.get("plan_sha256", self.info.sha256)

    def forward(self, x, t, y, cfg_scale: float | None = None):
        feeds = {"x": x, "t": t, "y": y}
        scale = check_cfg_scale(self.info, cfg_scale)
        if scale is not None:
            feeds["cfg_scale"] = scale
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise BackendError(f"engine inputs {missing} are not fed by forward(x, t, y)")
        transfer, context = self._transfer, self._context
        buffers = []                                    # alive until the download
        with transfer.device():
            for name in self.input_names:
                # np.asarray keeps a 0-d cfg_scale 0-d (ascontiguousarray would make it (1,))
                array = np.asarray(feeds[name], order="C")
                if array.ndim > 0:
                    low, _, high = self._engine.get_tensor_profile_shape(name, 0)
                    check_batch(name, array.shape, tuple(low), tuple(high))
                buffers.append(transfer.upload(array, self._dtypes[name]))
                if not context.set_input_shape(name, tuple(array.shape)):
                    raise BackendError(f"TensorRT refused input '{name}' of shape "
                                     f"{list(array.shape)}; see the log above")
                self._set_address(name, buffers[-1])
            name = self.output_names[0]
            shape = tuple(context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise BackendError(f"TensorRT left output '{name}' with shape {list(shape)} "
                                   "after all inputs were set; see the log above")
            out = transfer.empty(shape, self._dtypes[name])
            self._set_address(name, out)
            if not context.execute_async_v3(transfer.stream_handle):
                raise BackendError("TensorRT execution failed; see the log above")
            return transfer.download(out)

    def _set_address(self, name: str, buffer) -> None:
        if not self._context.set_tensor_address(name, self._transfer.address(buffer)):
            raise BackendError(f"TensorRT refused the address of '{name}'; see the log above")

    __call__ = forward
