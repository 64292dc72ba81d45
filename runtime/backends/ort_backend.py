"""ONNX Runtime over an export directory (CUDA execution provider when available).

terdit::TernaryMatMul runs on the terdit CPU kernels (plugins/cpu, registered as an ONNX Runtime
custom op; built with the system C++ compiler on first use) unless `kernels="function"`, or when
they cannot be built, where the file's portable local function runs. Which path runs is said once
per process (`TernaryMatMul: terdit CPU kernels (avx2)`)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from terdit_common.limits import check_threads
from terdit_common.manifest import MODEL_FILE, open_export
from terdit_common.ort import KERNEL_CHOICES, ort_session

from .protocol import BackendError, check_cfg_scale


_said: set[str] = set()


class OrtBackend:
    name = "ort"

    def __init__(self, export_dir: str | os.PathLike, threads: Optional[int] = None,
                 providers: Optional[list[str]] = None, kernels: str = "auto") -> None:
        export_dir = Path(export_dir)
        threads = check_threads(threads)
        if kernels not in KERNEL_CHOICES:
            raise BackendError(f"--kernels {kernels!r}: choose one of {', '.join(KERNEL_CHOICES)}")
        manifest, self.info = open_export(export_dir)
        model_file = export_dir / MODEL_FILE
        # Constant folding would decode every ternary weight to fp32 at load time (~5x the
        # weights in RAM); large models skip it.
        large = bool(manifest.get("graph", {}).get("large_model"))
        self.session = ort_session(model_file, threads=threads, providers=providers,
                                   fold_constants=not large, kernels=kernels)
        self.kernels = self.session.terdit_kernels
        # The file fixes the images up to the fp32 summation order of the TernaryMatMul path:
        # a resumed run must take the same one.
        self.settings = {"ternary_matmul": self.session.terdit_kernels_id}
        if self.kernels not in _said:
            print(f"TernaryMatMul: {self.kernels}", file=sys.stderr, flush=True)
            _said.add(self.kernels)
        stored = self.session.get_modelmeta().custom_metadata_map.get("terdit.config")
        if stored is not None:
            try:
                stored = json.loads(stored)
            except ValueError:
                raise BackendError(f"{model_file}: its metadata 'terdit.config' is not valid "
                                   f"JSON; re-export the model") from None
        if stored is not None and stored != self.info.config:
            raise BackendError(f"{export_dir / 'manifest.json'}: field 'config' disagrees with "
                               f"the config stored in {model_file}; re-export the model")
        self.input_names = [i.name for i in self.session.get_inputs()]
        if ("cfg_scale" in self.input_names) != bool(self.info.folded_cfg):
            raise BackendError(f"{model_file}: a cfg_scale input and the manifest's graph.cfg "
                               f"({self.info.folded_cfg}) disagree; re-export the model")
        self.providers = self.session.get_providers()

    def forward(self, x, t, y, cfg_scale=None):
        feeds = {"x": np.ascontiguousarray(x, np.float32), "t": np.ascontiguousarray(t, np.float32),
                 "y": np.ascontiguousarray(y, np.int64)}
        scale = check_cfg_scale(self.info, cfg_scale)
        if scale is not None:
            feeds["cfg_scale"] = scale
        return self.session.run(None, feeds)[0].astype(np.float32, copy=False)
