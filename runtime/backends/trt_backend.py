"""TensorRT over a plan built by `python -m runtime build-engine` (TensorRT, torch's CUDA build
and the plugin library are imported / loaded when the backend is opened)."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..trt_build import load_plugin_library
from ..trt_record import (EngineEnvironment, _import_torch_cuda, check_sidecar,
                          import_tensorrt)
from . import BackendError, open_export


def check_batch(name: str, shape: Sequence[int], low: Sequence[int], high: Sequence[int]) -> None:
    """Raises ValueError when `shape` lies outside the engine's profile [low, high] for `name`."""
    if len(shape) != len(low) or any(s < lo or s > hi for s, lo, hi in zip(shape, low, high)):
        raise ValueError(
            f"input '{name}' has shape {list(shape)}, outside the engine's profile {list(low)} .. "
            f"{list(high)}; rebuild the engine with --min-batch / --max-batch covering it or "
            "split the batch"
        )


class TensorRTBackend:
    """Runs a plan built by `python -m runtime build-engine` from an export directory.
    forward(x, t, y) takes and returns numpy arrays, like every runtime backend: x (B, C, H, W)
    float, t (B,) float32, y (B,) int64 -> (B, 2C, H, W) float32. A plan exported with
    classifier-free guidance folded in also needs cfg_scale.

    `path` is the export directory (its model.plan) or the plan itself (inside or beside the
    export directory whose manifest describes the model); `plugin` the plugin library (default:
    environment variable TERDIT_TRT_PLUGIN)."""

    name = "trt"

    def __init__(self, path: str | os.PathLike, plugin: str | os.PathLike | None = None,
                 device: int = 0):
        path = Path(path)
        export_dir = path if path.is_dir() else path.parent
        plan_path = path if path.is_file() else export_dir / "model.plan"
        if not plan_path.is_file():
            raise BackendError(f"{plan_path}: no TensorRT plan; build one with `python -m "
                               f"runtime build-engine {export_dir} --plugin LIB -o {plan_path}`")
        plugin = plugin or os.environ.get("TERDIT_TRT_PLUGIN")
        if not plugin:
            raise BackendError("--backend trt needs the plugin library: pass --plugin PATH or "
                               "set TERDIT_TRT_PLUGIN")
        plugin_path = Path(plugin)
        if not plugin_path.is_file():
            raise BackendError(f"--plugin {plugin_path}: file not found; build the plugin with "
                               f"CMake (plugins/ternaryMatMulPlugin/README.md)")
        _, self.info = open_export(export_dir)
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
        self.info.sha256 = self.record.get("plan_sha256", self.info.sha256)

    def forward(self, x, t, y, cfg_scale: float | None = None):
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
                # np.asarray keeps a 0-d cfg_scale 0-d (ascontiguousarray would make it (1,))
                array = np.asarray(feeds[name], order="C")
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
