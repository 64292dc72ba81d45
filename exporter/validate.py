"""Validation of an exported file: the full onnx checker, then the file run by ONNX Runtime (or
onnx.reference for what ORT cannot run) against the PyTorch model it came from."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from terdit_common.ort import ort_session

from . import contract
from .graph import DiffusionGraph, example_inputs
from .options import ExportError, ExportOptions

# Validation tolerance on max |onnx - torch_fp32| / max |torch_fp32|, added to LOWP_FACTOR times
# PyTorch's own error at the graph dtype.
TOLERANCE = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 5e-3}
LOWP_FACTOR = 3


def cpu_session(path: Path, large: bool):
    return ort_session(path, threads=max(1, min(4, os.cpu_count() or 1)),
                       providers=["CPUExecutionProvider"], fold_constants=not large)


class FrugalReference:
    """onnx.reference with the Python TernaryMatMul OpRun, run node by node and freeing every
    intermediate after its last use (ReferenceEvaluator.run keeps them all, which for a 4.2B
    model at 256 tokens means tens of GB)."""

    def __init__(self, path: Path) -> None:
        import onnx
        from onnx.reference import ReferenceEvaluator
        self.ev = ReferenceEvaluator(onnx.load(str(path)), new_ops=contract.reference_ops())

    def run(self, output_names, feeds: dict) -> list:
        ev = self.ev
        names = list(output_names or ev.output_names)
        results = {"": None, **ev.rt_inits_, **feeds}
        last_use: dict[str, int] = {}
        for idx, node in enumerate(ev.rt_nodes_):
            for name in node.input:
                last_use[name] = idx
        keep = set(names) | set(ev.rt_inits_)
        for idx, node in enumerate(ev.rt_nodes_):
            inputs = [results[name] for name in node.input]
            outs = (node.run(*inputs, context=results) if node.need_context()
                    else node.run(*inputs))
            for name, value in zip(node.output, outs):
                results[name] = value
            for name in set(node.input):
                if last_use.get(name) == idx and name not in keep and name:
                    del results[name]
        return [results[name] for name in names]


def _reference_evaluator(path: Path) -> FrugalReference:
    return FrugalReference(path)


def reference_outputs(graph: DiffusionGraph, cfg, options: ExportOptions) -> list[dict]:
    """Validation inputs and PyTorch outputs of `graph` in its current dtype."""
    cases = []
    for batch in options.validate_batches:
        inputs = example_inputs(cfg, batch, graph.cfg_mode, seed=options.seed + batch)
        with torch.no_grad():
            cases.append({"batch": batch, "inputs": inputs, "out": graph(**inputs).float().numpy()})
    return cases


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-12))


def validate(path: Path, ref32: list[dict], ref_lowp: Optional[list[dict]],
             options: ExportOptions, large: bool, log: Callable[[str], None],
             huge: bool = False) -> dict:
    """Checker + run the file and compare with PyTorch. Passes when the ONNX output's error
    against the fp32 PyTorch model is at most tolerance + LOWP_FACTOR x PyTorch's own error at
    the graph dtype (`ref_lowp`): the file may not be much less accurate than the framework it
    came from (a different but equally valid rounding order can cost a factor ~2)."""
    import onnx
    contract.register_schema()
    t0 = time.time()
    onnx.checker.check_model(str(path), full_check=True)
    result: dict[str, Any] = {"checker": "onnx.checker full_check: passed"}
    use_ort = options.dtype in ("fp32", "fp16") and options.function and not huge
    if use_ort:
        result["runtime"] = "onnxruntime CPUExecutionProvider" + (
            " (ConstantFolding disabled)" if large else "")
    else:
        why = ("ORT's CPU provider has no bf16 kernels" if options.dtype == "bf16" else
               "without the local function ONNX Runtime cannot run the file"
               if not options.function else
               "the portable decode of this many weights needs more RAM than a row-chunked OpRun")
        result["runtime"] = f"onnx.reference.ReferenceEvaluator + Python TernaryMatMul OpRun ({why})"
    runner = cpu_session(path, large) if use_ort else _reference_evaluator(path)
    tol = options.tolerance if options.tolerance is not None else TOLERANCE[options.dtype]
    checks = []
    for i, case in enumerate(ref32):
        feeds = {k: v.numpy() for k, v in case["inputs"].items()}
        out = runner.run(None, feeds)[0].astype(np.float32)
        if out.shape != case["out"].shape:
            raise ExportError(f"validation: ONNX output shape {out.shape} != PyTorch "
                              f"{case['out'].shape}")
        err = _rel(out, case["out"])
        torch_err = _rel(ref_lowp[i]["out"], case["out"]) if ref_lowp else 0.0
        bound = tol + LOWP_FACTOR * torch_err
        ok = bool(np.isfinite(out).all()) and err <= bound
        checks.append({"batch": case["batch"], "max_abs_err": float(np.abs(out - case["out"]).max()),
                       "rel_err": err, "torch_rel_err": torch_err, "bound": bound, "passed": ok})
        log(f"  validate batch {case['batch']}: rel err vs fp32 PyTorch {err:.3e} (PyTorch "
            f"{options.dtype}: {torch_err:.3e}; bound {bound:.3e}) {'ok' if ok else 'FAILED'}")
    result.update(reference="PyTorch fp32 (terdit, same graph)", tolerance=tol, checks=checks,
                  passed=all(c["passed"] for c in checks), seconds=round(time.time() - t0, 2),
                  rule=f"rel_err <= tolerance + {LOWP_FACTOR} * torch_rel_err (PyTorch's own "
                       f"error at this dtype)")
    return result
