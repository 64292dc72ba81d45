"""bench/cpu.py's GEMM rows: one TernaryMatMul shape per case, timed on every path."""
from __future__ import annotations

import gc
import shutil
import time
import traceback
from pathlib import Path

import numpy as np



def time_ms(fn, short_budget_s: float = 1.5) -> tuple[float, int]:
    """(median ms, reps), the caller having made the warm-up call: up to 10 reps within about
    short_budget_s when a call is short, 3 when it is long, 1 above 3 s (the slow peers on the
    4.2B GEMMs at M = 2048 take 10-30 s a call on 2 cores; keeps the whole run near 40 minutes)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    reps = 1 if first > 3.0 else max(3, min(10, int(short_budget_s / max(first, 1e-6))))
    times = [first]
    for _ in range(reps - 1):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3, reps


# ---- GEMM rows ----------------------------------------------------------------------------------

class GemmCase:
    """One weight shape: the packed weights, the fp32 effective weight and temp files."""

    def __init__(self, k: int, n: int, tmp: Path) -> None:
        import torch

        import cpu_models as cm
        self.k, self.n, self.tmp = k, n, tmp
        self.w, self.scale, self.bias = cm.random_gemm(k, n)
        self.weight = cm.effective_weight(self.w, self.scale, k)          # (N, K) fp32
        self.torch = torch
        self._dense_path = None

    def dense_path(self) -> Path:
        import cpu_models as cm
        if self._dense_path is None:
            self._dense_path = cm.save_model(cm.dense_gemm_model(self.weight.numpy(), self.bias.numpy()),
                                        self.tmp / f"dense-{self.k}x{self.n}.onnx")
        return self._dense_path

    def reference(self, x: np.ndarray) -> np.ndarray:
        t = self.torch
        return t.nn.functional.linear(t.from_numpy(x).double(), self.weight.double(),
                                      self.bias.double()).float().numpy()


def gemm_runner(path: str, case: GemmCase, threads: int):
    """(run(x) -> y as numpy, info) for one row, or raises cpu_models.Skip."""
    import cpu_models as cm
    torch = case.torch
    if path in ("ours", "ours-int8", "function"):
        act = "int8" if path == "ours-int8" else "none"
        model = cm.ternary_gemm_model(case.k, case.n, case.w, case.scale, case.bias, act)
        sess, desc = cm.ort_session(model, threads, library=path != "function")
        return (lambda x: sess.run(None, {"X": x})[0]), {"kernel": desc}
    if path in ("ours-torch", "ours-torch-int8"):
        desc = cm.load_torch_kernels()
        name = "ternary_matmul_int8" if path.endswith("int8") else "ternary_matmul"
        op = getattr(torch.ops.terdit, name, None)
        if op is None:
            raise cm.Skip(f"torch.ops.terdit.{name} is not registered after "
                          f"terdit.kernels.cpu_ops.load()")
        w, s, b = case.w, case.scale, case.bias

        def run(x):
            with torch.inference_mode():
                return op(torch.from_numpy(x), w, s, b).numpy()
        return run, {"kernel": desc}
    if path == "dense-fp32":
        sess, desc = cm.ort_session(case.dense_path(), threads)
        return (lambda x: sess.run(None, {"X": x})[0]), {"kernel": desc}
    if path == "int8-dynamic":
        q = cm.quantize_dynamic_file(case.dense_path(), case.tmp / f"int8-{case.k}x{case.n}.onnx")
        sess, desc = cm.ort_session(q, threads)
        return (lambda x: sess.run(None, {"X": x})[0]), {"kernel": desc}
    if path == "matmulnbits-2bit":
        model = cm.nbits_gemm_model(case.w, case.scale, case.bias, case.k, case.n)
        sess, desc = cm.ort_session(model, threads)
        return (lambda x: sess.run(None, {"X": x})[0]), {"kernel": desc}
    if path == "dense-bf16-torch":
        torch.set_num_threads(threads)
        wb, bb = case.weight.bfloat16(), case.bias.bfloat16()

        def run(x):
            with torch.inference_mode():
                xb = torch.from_numpy(x).bfloat16()
                return torch.nn.functional.linear(xb, wb, bb).float().numpy()
        return run, {"kernel": f"torch {torch.__version__} bf16, mkldnn bf16 "
                                f"{torch.backends.mkldnn.is_available()}"}
    if path in ("openvino-bf16", "openvino-int8"):
        if path == "openvino-bf16":
            compiled, info = cm.ov_compile(case.dense_path(), threads, "bf16")
        else:
            rng = np.random.default_rng(1)
            calib = [{"X": rng.standard_normal((256, case.k), dtype=np.float32)} for _ in range(8)]
            ir = cm.nncf_int8(case.dense_path(), calib, case.tmp / f"ov-int8-{case.k}x{case.n}.xml")
            compiled, info = cm.ov_compile(ir, threads, None)
        req = compiled.create_infer_request()

        def run(x):
            req.infer({0: x}, share_inputs=True)
            return req.get_output_tensor(0).data
        return run, info
    raise ValueError(f"unknown GEMM row {path!r}")


def run_gemms(shapes: list[tuple[str, str, int, int]], m_values, paths, threads: int, tmp: Path,
              log) -> list[dict]:
    import cpu_models as cm
    rows = []
    rng = np.random.default_rng(0)
    for model, label, k, n in shapes:
        case = GemmCase(k, n, tmp)
        xs = {m: rng.standard_normal((m, k), dtype=np.float32) for m in m_values}
        refs = {m: case.reference(x) for m, x in xs.items()}
        for path in paths:
            base = {"kind": "gemm", "model": model, "shape": label, "K": k, "N": n, "path": path}
            try:
                t0 = time.perf_counter()
                run, info = gemm_runner(path, case, threads)
                build_s = time.perf_counter() - t0
            except cm.Skip as err:
                rows += [{**base, "M": m, "skipped": str(err)} for m in m_values]
                log(f"{model} {label:4} {path:17} skipped: {err}")
                continue
            except Exception as err:  # noqa: BLE001 - one failing row must not stop the others
                traceback.print_exc()
                why = f"{type(err).__name__}: {err}"
                rows += [{**base, "M": m, "error": why} for m in m_values]
                log(f"{model} {label:4} {path:17} FAILED: {type(err).__name__}: {err}")
                continue
            for m in m_values:
                x, ref = xs[m], refs[m]
                try:
                    y = np.asarray(run(x), np.float32)                   # also the warm-up
                    err = float(np.abs(y - ref).max() / np.abs(ref).max())
                    ms, reps = time_ms(lambda run=run, x=x: run(x))
                except Exception as exc:  # noqa: BLE001
                    traceback.print_exc()
                    rows.append({**base, "M": m, "error": f"{type(exc).__name__}: {exc}"})
                    continue
                gops = 2.0 * m * n * k / (ms * 1e-3) / 1e9
                rows.append({**base, "M": m, "ms": round(ms, 3), "gops": round(gops, 1),
                             "reps": reps, "max_rel_err": float(f"{err:.3e}"),
                             "build_s": round(build_s, 2), "info": info})
                log(f"{model} {label:4} {path:17} M={m:5}: {ms:9.2f} ms {gops:8.1f} GOP/s  "
                    f"rel err {err:.1e}")
            del run
            gc.collect()
        del case
        gc.collect()
        for f in tmp.glob("*"):
            f.unlink() if f.is_file() else shutil.rmtree(f, ignore_errors=True)
    return rows
