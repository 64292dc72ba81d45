"""Stand-in run side: Runtime, ICudaEngine, IExecutionContext, and the host "device" memory
the TensorRT backend is given in tests (HostTransfer).

An engine is a plan from network.Builder: its I/O tensors and profile, and the ONNX model, which
execute_async_v3 runs with ONNX Runtime on the buffers whose addresses the caller set. The
context checks what TensorRT checks before it runs: set_input_shape refuses a shape of another
rank, other static dimensions or outside the profile (returning False, as the real call does);
execution needs every input shape and every I/O address, and only accepts addresses of
HostTransfer buffers whose size fits.
"""
from __future__ import annotations

import contextlib
import json

import numpy as np

from .network import PLAN_MAGIC, StandIn

NUMPY_TYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64,
               "BOOL": np.bool_, "INT8": np.int8, "UINT8": np.uint8}
# address -> array: the host buffers HostTransfer handed out (the stand-in's device memory)
HOST_BUFFERS: dict[int, np.ndarray] = {}


class HostTransfer:
    """The backend's numpy <-> device piece (runtime.tensorrt.backend.TorchCudaTransfer's
    interface) on the host: buffers are numpy arrays, registered by address."""

    stream_handle = 0
    dtypes = {"float32": np.float32, "float16": np.float16, "int32": np.int32,
              "int64": np.int64}

    def __init__(self) -> None:
        self.uploads: list[np.ndarray] = []

    def device(self):
        return contextlib.nullcontext()

    def _register(self, array: np.ndarray) -> np.ndarray:
        HOST_BUFFERS[array.ctypes.data] = array
        return array

    def upload(self, array: np.ndarray, dtype: str) -> np.ndarray:
        if dtype not in self.dtypes:
            raise TypeError(f"HostTransfer has no {dtype} (numpy has no bfloat16)")
        self.uploads.append(np.array(array, dtype=self.dtypes[dtype], order="C", copy=True))
        return self._register(self.uploads[-1])

    def empty(self, shape, dtype: str) -> np.ndarray:
        return self._register(np.full(shape, np.nan if "float" in dtype else -1,
                                      self.dtypes[dtype]))

    @staticmethod
    def address(buffer: np.ndarray) -> int:
        return buffer.ctypes.data

    @staticmethod
    def download(buffer: np.ndarray) -> np.ndarray:
        return buffer.astype(np.float32)


class Runtime(StandIn):
    def __init__(self, logger) -> None:
        self._logger = logger

    def deserialize_cuda_engine(self, serialized_engine):
        data = bytes(serialized_engine)
        if not data.startswith(PLAN_MAGIC):
            self._logger.log("ERROR", "not a plan of this stand-in")
            return None
        header, model = data[len(PLAN_MAGIC):].split(b"\n", 1)
        header = json.loads(header)
        if header["tensorrt"] != self._trt.__version__:
            self._logger.log("ERROR", f"plan serialized by TensorRT {header['tensorrt']}, this "
                                      f"is {self._trt.__version__}")
            return None
        return self._new("ICudaEngine", header, model)


class ICudaEngine(StandIn):
    def _init(self, header: dict, model: bytes) -> None:
        self._io = {t["name"]: dict(t, mode="INPUT") for t in header["inputs"]}
        self._io.update({t["name"]: dict(t, mode="OUTPUT") for t in header["outputs"]})
        self._model, self._session = model, None

    num_io_tensors = property(lambda self: len(self._io))
    num_optimization_profiles = property(lambda self: 1)

    def get_tensor_name(self, index):
        return list(self._io)[index]

    def get_tensor_mode(self, name):
        return getattr(self._trt.TensorIOMode, self._io[name]["mode"] if name in self._io
                       else "NONE")

    def get_tensor_dtype(self, name):
        return getattr(self._trt.DataType, self._io[name]["dtype"])

    def get_tensor_shape(self, name):
        return tuple(d if isinstance(d, int) else -1 for d in self._io[name]["dims"])

    def get_tensor_profile_shape(self, name, profile_index):
        if profile_index != 0 or self._io[name]["mode"] != "INPUT":
            raise RuntimeError(f"stand-in: no profile {profile_index} for {name}")
        profile = self._io[name]["profile"]
        return [tuple(s) for s in profile] if profile else [self.get_tensor_shape(name)] * 3

    def create_execution_context(self):
        return self._new("IExecutionContext", self)

    def _run(self, feeds: dict) -> np.ndarray:
        if self._session is None:
            import onnxruntime as ort
            self._session = ort.InferenceSession(self._model, providers=["CPUExecutionProvider"])
        return self._session.run(None, feeds)


class IExecutionContext(StandIn):
    def _init(self, engine: ICudaEngine) -> None:
        self._engine, self._shapes, self._addresses = engine, {}, {}

    def set_input_shape(self, name, shape) -> bool:
        io = self._engine._io.get(name)
        shape = tuple(shape)
        if io is None or io["mode"] != "INPUT":
            return False
        low, _, high = self._engine.get_tensor_profile_shape(name, 0)
        if len(shape) != len(low) or any(s < lo or s > hi for s, lo, hi in zip(shape, low, high)):
            return False
        self._shapes[name] = shape
        return True

    def set_tensor_address(self, name, memory) -> bool:
        if name not in self._engine._io or not isinstance(memory, int) or memory == 0:
            return False
        self._addresses[name] = memory
        return True

    def get_tensor_address(self, name):
        return self._addresses.get(name, 0)

    def get_tensor_shape(self, name):
        io = self._engine._io[name]
        if io["mode"] == "INPUT":
            return self._shapes.get(name, self._engine.get_tensor_shape(name))
        known = {}
        for other in self._engine._io.values():
            if other["mode"] == "INPUT" and other["name"] in self._shapes:
                known.update({d: s for d, s in zip(other["dims"], self._shapes[other["name"]])
                              if isinstance(d, str)})
        return tuple(d if isinstance(d, int) else known.get(d, -1) for d in io["dims"])

    def _buffer(self, name: str, shape: tuple) -> np.ndarray | None:
        buffer = HOST_BUFFERS.get(self._addresses.get(name, 0))
        dtype = NUMPY_TYPES.get(self._engine._io[name]["dtype"])
        if buffer is None or buffer.dtype != dtype or buffer.shape != shape:
            return None
        return buffer

    def execute_async_v3(self, stream_handle) -> bool:
        if not isinstance(stream_handle, int):
            return False
        feeds, outputs = {}, []
        for name, io in self._engine._io.items():
            shape = self.get_tensor_shape(name)
            if -1 in shape or (io["mode"] == "INPUT" and name not in self._shapes):
                return False
            buffer = self._buffer(name, shape)
            if buffer is None:
                return False
            if io["mode"] == "INPUT":
                feeds[name] = buffer.copy()
            else:
                outputs.append(buffer)
        for buffer, value in zip(outputs, self._engine._run(feeds)):
            np.copyto(buffer, value)
        return True
