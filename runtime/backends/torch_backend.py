"""The PyTorch model (terdit), from an export directory (its packed weights) or a checkpoint.
On CUDA it runs the project's kernels, compiled blocks and CUDA graphs (terdit.kernels.accel)."""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Optional

from terdit_common.cpukernels import prefer_passive_openmp
from terdit_common.entry import signals_held
from terdit_common.files import sha256_file
from terdit_common.limits import check_threads
from terdit_common.manifest import is_export_dir, open_export
from terdit_common.op import DTYPES
from terdit_common.sampling import ModelInfo

from .protocol import BackendError, check_cfg_scale, resolve_act_quant


class TorchBackend:
    name = "torch"

    def __init__(self, path: str | os.PathLike, device: Optional[str] = None,
                 dtype: Optional[str] = None, compile: bool = True, cuda_graphs: bool = True,
                 w2a8: bool = False, act_quant: Optional[str] = None,
                 threads: Optional[int] = None) -> None:
        threads = check_threads(threads)
        if dtype is not None and dtype not in DTYPES:
            raise BackendError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        for flag, value in (("--no-compile", compile), ("--no-cuda-graphs", cuda_graphs)):
            if value not in (True, False):
                raise BackendError(f"{flag}: compile / cuda_graphs must be True or False, got "
                                   f"{value!r}")
        if device is not None and not isinstance(device, str):
            raise BackendError(f"--device {device!r}: pass a torch device name such as 'cpu' or "
                               f"'cuda:0'")
        # the activation mode of the ternary products: "none", "int8" (terdit.kernels.int8) or
        # "fp8" (--w2a8, terdit.kernels.accel's W1.58A8)
        self.act_quant = resolve_act_quant(w2a8, act_quant) or "none"
        w2a8 = self.act_quant == "fp8"
        if device is None or device.startswith("cpu"):
            prefer_passive_openmp()                 # before torch loads (cpukernels says why)
        try:
            with signals_held():
                import torch

                from terdit import load_checkpoint
                from terdit.formats import TORCH_DTYPES
                from terdit.inference import TorchForward, inference_model
        except ImportError as err:
            raise BackendError(f"the torch backend needs torch and terdit ({err}); install "
                               f"torch or use --backend ort") from None
        if threads:
            torch.set_num_threads(threads)
        path = Path(path)
        export_info = None
        if is_export_dir(path):
            _, export_info = open_export(path)          # checks every file's sha256
        try:
            self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError as err:
            raise BackendError(f"--device {device!r}: {err}") from None
        if self.device.type not in ("cpu", "cuda"):
            raise BackendError(f"--device {device}: the torch backend runs on cpu or cuda[:N]")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendError(f"--device {device}: torch sees no CUDA device; use --device cpu")
        if self.device.type == "cuda" and (self.device.index or 0) >= torch.cuda.device_count():
            raise BackendError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA "
                               f"device(s), numbered from 0")
        if self.device.type != "cuda" or self.act_quant == "int8":
            for flag, value in (("--no-compile", compile), ("--no-cuda-graphs", cuda_graphs)):
                if value is False:
                    why = (f"this run is on {self.device}" if self.device.type != "cuda" else
                           "--act-quant int8 runs the reference ops there")
                    raise BackendError(f"{flag}: the torch backend compiles blocks and captures "
                                       f"CUDA graphs only on its CUDA kernels ({why}), so it "
                                       f"would have no effect; drop {flag}")
        loaded = load_checkpoint(path, packed=True)
        self.dtype = dtype or ("bf16" if self.device.type == "cuda" else "fp32")
        self.model = inference_model(loaded.model, self.device, TORCH_DTYPES[self.dtype])
        self.kernels = "reference"
        run = self.model
        if self.act_quant == "int8":
            # terdit::ternary_matmul_int8 (its CPU kernels when registered; the reference else)
            from terdit.kernels.int8 import set_act_quant_
            set_act_quant_(self.model, "int8")
        if self.device.type == "cpu":
            # the terdit CPU kernels for the ternary ops (built on first use; says once which path)
            from terdit.kernels import cpu_ops as cpu_kernels
            if cpu_kernels.load_or_say():
                self.kernels = "cpu"
        if self.device.type == "cuda":
            try:
                from terdit.kernels import cuda as kernels
                kernels.load()
                self.kernels = "cuda"
            except Exception as err:  # noqa: BLE001 - fall back loudly, still correct
                warnings.warn(f"CUDA TernaryMatMul kernels unavailable ({err}); using the "
                              f"reference op (slow)", stacklevel=2)
        if (self.kernels == "cuda" and self.act_quant != "int8") or w2a8:
            # on the CPU, W1.58A8 runs an exact emulation (slow; for accuracy studies)
            from terdit.kernels.accel import AcceleratedTerDiT
            on_gpu = self.kernels == "cuda"
            run = AcceleratedTerDiT(self.model, compile=compile and on_gpu,
                                    cuda_graphs=cuda_graphs and on_gpu, w2a8=w2a8)
        self._forward = TorchForward(run, self.device)
        if export_info is not None:
            self.info = ModelInfo(loaded.model.cfg.to_dict(), str(path), export_info.sha256,
                                  None, export_info.metadata)
        else:
            files = sorted(str(p) for p in loaded.files if Path(p).is_file())
            digest = hashlib.sha256("\n".join(f"{Path(f).name}:{sha256_file(f)}"
                                              for f in files).encode()).hexdigest()
            self.info = ModelInfo(loaded.model.cfg.to_dict(), str(path), digest, None,
                                  loaded.metadata or {})

    @property
    def settings(self) -> dict:
        """What changes the images beyond the weights: the activation mode and compute dtype."""
        return {"dtype": self.dtype, **({"act_quant": self.act_quant}
                                        if self.act_quant != "none" else {})}

    def forward(self, x, t, y, cfg_scale=None):
        check_cfg_scale(self.info, cfg_scale)       # guided by the sampler: refuses one
        return self._forward(x, t, y)
