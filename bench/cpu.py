"""CPU benchmark: the ternary TernaryMatMul paths against the CPU peers (GEMMs and end to end).

    python bench/cpu.py [--shapes 600M 4.2B] [--m 256 512 2048] [--rows ...] [--e2e demo 600M]
    python bench/cpu.py --quick          # smoke run: one small GEMM shape + the demo model

GEMMs: Y = X @ (scale * T)^T + bias, X fp32 [M, K] random normal, T ternary random (~1/3 zeros)
packed k16, per-channel fp32 scale, zero bias, for the TerDiT-600M / 4.2B block shapes (K->N:
qkv, wo, w13, w2) and M in {256, 512, 2048}. Rows (paths):
  ours                one terdit::TernaryMatMul node in onnxruntime with the terdit CPU kernel
                      library registered (terdit_common.cpukernels.register_ort)
  ours-int8           the same node with act_quant="int8" (per-token int8 activations)
  ours-torch          torch.ops.terdit.ternary_matmul after terdit.cpu_kernels.load()
  ours-torch-int8     torch.ops.terdit.ternary_matmul_int8 (same)
  function            the same one-node model in plain onnxruntime (the inlined local function)
  dense-fp32          MatMul with the decoded fp32 weights (scale folded in), onnxruntime
  int8-dynamic        onnxruntime quantize_dynamic of dense-fp32 (per-channel QInt8)
  matmulnbits-2bit    com.microsoft MatMulNBits bits=2, block 32, accuracy_level 4, exact codes
  dense-bf16-torch    torch.nn.functional.linear in bf16
  openvino-bf16       OpenVINO CPU on the dense ONNX, inference precision hint bf16 (on a CPU
                      without bf16 it falls back; the row records the precision it reports)
  openvino-int8       OpenVINO on NNCF post-training int8 of the dense ONNX (8 calibration inputs)
Each GEMM row: ms (median after a warm-up; up to 10 reps for short GEMMs, 3 for long ones, 1
above 3 s),
GOP/s = 2MNK / t, max |Y - Y_fp32| / max |Y_fp32| against the fp32 reference.

End to end, one forward (median of 3 after 1 warm-up), each row in its own subprocess (peak RSS
= that process's VmHWM, imports and model loading included): the demo model terdit/demo with 40
images and the random-weight TerDiT-600M with 1 and 4 images, all with classifier-free guidance
(exports with --cfg official: x/t/y of B images + cfg_scale; the 1-channel demo exports --cfg
standard, as official guides channels 0..2; the torch rows run the batch of 2B). Rows:
ours / ours-int8 (runtime open_backend(DIR, backend="ort") on the export, --act-quant
int8 for the second), ours-torch / ours-torch-int8 (open_backend(..., backend="torch",
device="cpu")), function (plain InferenceSession of model.onnx), dense-fp32 (every TernaryMatMul
replaced by MatMul on the decoded weights, graph surgery), int8-dynamic, matmulnbits-2bit,
dense-bf16-torch (the model with dense effective weights, torch bf16), openvino-bf16,
openvino-int8. Exports and converted files are cached under --cache, built one at a time in
their own subprocess. Rows that cannot run here are recorded with the reason. Benchmarks record;
they assert nothing about speed.

Writes cpu-<cpu-model>-<date>.{json,md,png} into --out (default bench/results/).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# (label, K, N) per model: fused qkv, wo, fused w1|w3, w2
SHAPES = {
    "600M": [("qkv", 1536, 4608), ("wo", 1536, 1536), ("w13", 1536, 8192), ("w2", 4096, 1536)],
    "4.2B": [("qkv", 3072, 9216), ("wo", 3072, 3072), ("w13", 3072, 16384), ("w2", 8192, 3072)],
}
M_VALUES = (256, 512, 2048)
ROWS = ("ours", "ours-int8", "ours-torch", "ours-torch-int8", "function", "dense-fp32",
        "int8-dynamic", "matmulnbits-2bit", "dense-bf16-torch", "openvino-bf16", "openvino-int8")
# end-to-end models: checkpoint source, images per forward (each + CFG)
# (the demo has 1 channel: --cfg official guides eps channels 0..2, so it exports "standard")
E2E_MODELS = {"demo": {"images": [40], "cfg": "standard"},
              "600M": {"images": [1, 4], "cfg": "official"}}
CFG_SCALE = 4.0
QUICK_SHAPE = ("600M", "wo", 1536, 1536)
QUICK_M = (256,)
DEFAULT_CACHE = Path.home() / ".cache" / "terdit" / "bench-cpu"
INTERESTING_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni",
                     "amx_bf16", "amx_int8")


# ---- machine ------------------------------------------------------------------------------------

def machine_info(threads: int) -> dict:
    model, flags = platform.processor() or "unknown-cpu", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("unknown-cpu", platform.processor()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    info = {"cpu": model, "flags": {f: f in flags for f in INTERESTING_FLAGS},
            "cores": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "date": datetime.date.today().isoformat()}
    try:  # a cgroup CPU quota (shared machines) makes timings coarse and noisy
        info["cgroup_cpu_max"] = Path("/sys/fs/cgroup/cpu.max").read_text().strip()
    except OSError:
        info["cgroup_cpu_max"] = None
    for mod in ("torch", "onnxruntime", "onnx", "openvino", "nncf", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - not installed, or broken: record it as absent
            info[mod] = None
    return info


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:60] or "cpu"


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
            self._dense_path = cm._save(cm.dense_gemm_model(self.weight.numpy(), self.bias.numpy()),
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
                          f"terdit.cpu_kernels.load()")
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
                    ms, reps = time_ms(lambda: run(x))
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


# ---- end to end: artifacts (built in subprocesses, cached) --------------------------------------

def model_dir(cache: Path, model: str) -> Path:
    return cache / model


def checkpoint_of(cache: Path, model: str) -> Path:
    return ROOT / "terdit" / "demo" if model == "demo" else model_dir(cache, model) / "ckpt"


ARTIFACTS = {                # artifact: (file that marks it done, artifacts it needs)
    "ckpt": ("ckpt/config.json", ()),
    "export": ("export/manifest.json", ("ckpt",)),
    "export-int8": ("export-int8/manifest.json", ("ckpt",)),
    "dense": ("dense/model.onnx", ("export",)),
    "dense-int8": ("dense-int8/model.onnx", ("dense",)),
    "nbits": ("nbits/model.onnx", ("export",)),
    "ov-int8": ("ov-int8/model.xml", ("dense",)),
}
ROW_NEEDS = {"ours": "export", "ours-int8": "export-int8", "ours-torch": "export",
             "ours-torch-int8": "export", "function": "export", "dense-fp32": "dense",
             "int8-dynamic": "dense-int8", "matmulnbits-2bit": "nbits",
             "dense-bf16-torch": "export", "openvino-bf16": "dense", "openvino-int8": "ov-int8"}


def artifact_path(cache: Path, model: str, artifact: str) -> Path:
    if artifact == "ckpt":
        return checkpoint_of(cache, model)
    return model_dir(cache, model) / artifact


def exporter_supports_act_quant() -> bool:
    out = subprocess.run([sys.executable, "-m", "exporter", "--help"], cwd=ROOT,
                         capture_output=True, text=True)
    return "--act-quant" in out.stdout


def calibration_inputs(cfg: dict, count: int = 8) -> list[dict]:
    rng = np.random.default_rng(2)
    feeds = []
    for i in range(count):
        feeds.append({"x": rng.standard_normal((1, cfg["in_channels"], cfg["input_size"],
                                                cfg["input_size"]), dtype=np.float32),
                      "t": np.array([rng.uniform(0, 999)], np.float32),
                      "y": np.array([i % cfg["num_classes"]], np.int64),
                      "cfg_scale": np.asarray(CFG_SCALE, np.float32)})
    return feeds


def build_artifact(cache: Path, model: str, artifact: str) -> None:
    """Build one artifact (its inputs exist); runs in its own process (--prepare)."""
    import cpu_models as cm
    dst = artifact_path(cache, model, artifact)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    export = artifact_path(cache, model, "export")
    if artifact == "ckpt":
        from terdit import TerDiTConfig, save_checkpoint
        cfg = TerDiTConfig.from_name(f"TerDiT-{model}")
        save_checkpoint(cm.random_packed_cpu(cfg), tmp)
    elif artifact in ("export", "export-int8"):
        cmd = [sys.executable, "-m", "exporter", str(checkpoint_of(cache, model)), "-o", str(tmp),
               "--cfg", E2E_MODELS[model]["cfg"], "--no-validate", "--external-data", "auto"]
        if artifact == "export-int8":
            if not exporter_supports_act_quant():
                raise cm.Skip("the exporter has no --act-quant option yet")
            cmd += ["--act-quant", "int8"]
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if res.returncode:
            last = (res.stderr.strip() or res.stdout.strip() or "?").splitlines()[-1]
            raise RuntimeError(f"{' '.join(cmd[1:4])} ... exit {res.returncode}: {last}")
    elif artifact in ("dense", "nbits"):
        tmp.mkdir(parents=True)
        cm.replace_ternary_nodes(export / "model.onnx", tmp / "model.onnx", artifact)
    elif artifact == "dense-int8":
        cm.quantize_dynamic_file(artifact_path(cache, model, "dense") / "model.onnx",
                                 tmp / "model.onnx")
    elif artifact == "ov-int8":
        cfg = json.loads((export / "manifest.json").read_text())["config"]
        cm.nncf_int8(artifact_path(cache, model, "dense") / "model.onnx", calibration_inputs(cfg),
                     tmp / "model.xml")
    else:
        raise ValueError(f"unknown artifact {artifact!r}")
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)


def ensure_artifact(cache: Path, model: str, artifact: str, log, failed: dict) -> str | None:
    """Build `artifact` (and what it needs) unless cached; None, or why it is unavailable."""
    if artifact in failed:
        return failed[artifact]
    marker, needs = ARTIFACTS[artifact]
    for need in needs:
        why = ensure_artifact(cache, model, need, log, failed)
        if why:
            failed[artifact] = why
            return why
    done = (checkpoint_of(cache, model) / "config.json" if artifact == "ckpt"
            else model_dir(cache, model) / marker)
    if done.exists():
        return None
    log(f"e2e {model}: building {artifact} (cached in {artifact_path(cache, model, artifact)})")
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, __file__, "--prepare", model, artifact,
                          "--cache", str(cache)], cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        lines = [ln for ln in (res.stdout + res.stderr).strip().splitlines() if ln.strip()]
        why = next((ln[len("SKIP: "):] for ln in lines if ln.startswith("SKIP: ")), None)
        why = why or f"building {artifact} failed: {lines[-1] if lines else res.returncode}"
        log(f"e2e {model}: {artifact}: {why}")
        if res.stderr and "SKIP: " not in res.stdout:
            log(res.stderr[-2000:])
        failed[artifact] = why
        return why
    log(f"e2e {model}: {artifact} built in {time.perf_counter() - t0:.0f} s")
    return None


# ---- end to end: one row (runs in its own process, --one-row) -----------------------------------

def e2e_inputs(cfg: dict, images: int):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((images, cfg["in_channels"], cfg["input_size"], cfg["input_size"]),
                            dtype=np.float32)
    t = np.full((images,), 500.0, np.float32)
    y = np.array([(17 * i) % cfg["num_classes"] for i in range(images)], np.int64)
    null = cfg["num_classes"]
    x2, t2 = np.concatenate([x, x]), np.concatenate([t, t])
    y2 = np.concatenate([y, np.full_like(y, null)])
    return (x, t, y), (x2, t2, y2)


def e2e_runner(path: str, cache: Path, model: str, images: int, threads: int):
    """(run() -> output of the first `images` rows, info); raises cpu_models.Skip."""
    import cpu_models as cm
    export = artifact_path(cache, model, "export")
    cfg = json.loads((export / "manifest.json").read_text())["config"]
    (x, t, y), (x2, t2, y2) = e2e_inputs(cfg, images)
    feeds = {"x": x, "t": t, "y": y, "cfg_scale": np.asarray(CFG_SCALE, np.float32)}
    info = {}
    if path in ("ours", "ours-int8"):
        from runtime.backends import open_backend
        src = "".join((ROOT / f).read_text() for f in ("runtime/backends/ort_backend.py",
                                                         "terdit_common/ort.py"))
        if "cpukernels" not in src:
            info["note"] = ("the runtime's ORT backend does not register the terdit CPU library "
                            "yet: this row runs the local function")
        src_dir = artifact_path(cache, model, "export" if path == "ours" else "export-int8")
        be = open_backend(src_dir, backend="ort", threads=threads)
        info["providers"] = getattr(be, "providers", None)
        for attr in ("kernels", "cpu_kernels", "library"):
            if hasattr(be, attr):
                info[attr] = str(getattr(be, attr))
        return (lambda: be.forward(x, t, y, CFG_SCALE)), info
    if path in ("ours-torch", "ours-torch-int8"):
        import inspect

        import torch
        from runtime.backends import open_backend
        from runtime.backends.torch_backend import TorchBackend
        torch.set_num_threads(threads)
        info["kernel"] = cm.load_torch_kernels()
        kwargs = {"device": "cpu"}
        if path == "ours-torch-int8":
            if "act_quant" not in inspect.signature(TorchBackend.__init__).parameters:
                raise cm.Skip("the torch backend does not accept act_quant yet")
            kwargs["act_quant"] = "int8"
        be = open_backend(export, backend="torch", **kwargs)
        info["backend_kernels"] = getattr(be, "kernels", None)
        from terdit_common.guidance import guide
        mode = E2E_MODELS[model]["cfg"]
        # the backend runs the [cond; uncond] batch; guidance as the exported graph does it
        return (lambda: guide(be.forward(x2, t2, y2), CFG_SCALE, mode, cfg["in_channels"])), info
    if path == "dense-bf16-torch":
        import torch

        from terdit import load_checkpoint
        torch.set_num_threads(threads)
        dense = cm.dense_torch_model(load_checkpoint(export, packed=True).model, torch.bfloat16)
        gc.collect()
        args = (torch.from_numpy(x2), torch.from_numpy(t2), torch.from_numpy(y2))

        def run():
            with torch.inference_mode():
                return dense.forward_with_cfg(*args, CFG_SCALE, mode=E2E_MODELS[model]["cfg"]
                                              ).float().numpy()[:images]
        info["kernel"] = f"torch {torch.__version__} bf16"
        return run, info
    if path in ("function", "dense-fp32", "int8-dynamic", "matmulnbits-2bit"):
        import onnxruntime as ort
        file = artifact_path(cache, model, ROW_NEEDS[path]) / "model.onnx"
        if path == "function":
            so = ort.SessionOptions()            # default options, all cores
            so.intra_op_num_threads = threads
        else:
            so, _ = cm.ort_options(threads)
        try:
            sess = ort.InferenceSession(str(file), so, providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001
            text = " ".join(str(err).split())[:300]
            raise cm.Skip(f"onnxruntime cannot run it: {text}") from None
        names = [i.name for i in sess.get_inputs()]
        f = {k: v for k, v in feeds.items() if k in names}
        info["kernel"] = f"onnxruntime {ort.__version__}"
        return (lambda: sess.run(None, f)[0]), info
    if path in ("openvino-bf16", "openvino-int8"):
        if path == "openvino-bf16":
            compiled, info = cm.ov_compile(artifact_path(cache, model, "dense") / "model.onnx",
                                           threads, "bf16")
        else:
            compiled, info = cm.ov_compile(artifact_path(cache, model, "ov-int8") / "model.xml",
                                           threads, None)
        req = compiled.create_infer_request()
        names = [p.get_any_name() for p in compiled.inputs]
        f = {k: v for k, v in feeds.items() if k in names}

        def run():
            req.infer(f)
            return req.get_output_tensor(0).data.copy()
        return run, info
    raise ValueError(f"unknown e2e row {path!r}")


def one_row(spec: dict) -> dict:
    import cpu_models as cm
    row = {"kind": "e2e", "model": spec["model"], "images": spec["images"],
           "batch": 2 * spec["images"], "path": spec["path"]}
    try:
        t0 = time.perf_counter()
        run, info = e2e_runner(spec["path"], Path(spec["cache"]), spec["model"], spec["images"],
                               spec["threads"])
        row["load_s"] = round(time.perf_counter() - t0, 2)
        out = np.asarray(run(), np.float32)                       # warm-up
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
        row.update(ms=round(float(np.median(times)), 2), info=info)
        np.save(spec["output"], out)
    except cm.Skip as err:
        row["skipped"] = str(err)
    except Exception as err:  # noqa: BLE001
        traceback.print_exc()
        row["error"] = f"{type(err).__name__}: {err}"
    row["peak_rss_mib"] = round(cm.vm_hwm_mib(), 1)
    return row


def run_e2e(models, images_600m, paths, cache: Path, threads: int, tmp: Path, log) -> list[dict]:
    rows = []
    for model in models:
        failed = {}
        images_list = E2E_MODELS[model]["images"] if model == "demo" else images_600m
        outputs = {}
        for images in images_list:
            for path in paths:
                base = {"kind": "e2e", "model": model, "images": images, "batch": 2 * images,
                        "path": path}
                why = ensure_artifact(cache, model, ROW_NEEDS[path], log, failed)
                if why:
                    rows.append({**base, "skipped": why})
                    continue
                out_file = tmp / f"out-{model}-{images}-{path}.npy"
                spec = {"model": model, "images": images, "path": path, "cache": str(cache),
                        "threads": threads, "output": str(out_file)}
                res = subprocess.run([sys.executable, __file__, "--one-row", json.dumps(spec)],
                                     cwd=ROOT, capture_output=True, text=True)
                line = [ln for ln in res.stdout.splitlines() if ln.startswith("ROW: ")]
                if res.returncode != 0 or not line:
                    rows.append({**base, "error": f"row process exit {res.returncode}: "
                                                  f"{(res.stderr or res.stdout).strip()[-300:]}"})
                    log(f"e2e {model} images={images} {path}: FAILED\n{res.stderr[-2000:]}")
                    continue
                row = json.loads(line[-1][len("ROW: "):])
                if "ms" in row and out_file.exists():
                    outputs[path] = (row, np.load(out_file))
                    out_file.unlink()
                rows.append(row)
                msg = (f"{row['ms']:10.1f} ms, peak RSS {row['peak_rss_mib']:.0f} MiB"
                       if "ms" in row else row.get("skipped") or row.get("error"))
                log(f"e2e {model:4} images={images:2} {path:17} {msg}")
            # agreement with the local function (the exporter's portable definition)
            ref = outputs.get("function", outputs.get("dense-fp32", (None, None)))[1]
            for path, (row, out) in outputs.items():
                if ref is not None and path != "function":
                    row["max_rel_diff_vs_function"] = float(
                        f"{np.abs(out - ref).max() / np.abs(ref).max():.3e}")
            outputs.clear()
    return rows


# ---- results ------------------------------------------------------------------------------------

def _fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def markdown(meta: dict, rows: list[dict]) -> str:
    flags = ", ".join(f for f, on in meta["flags"].items() if on) or "none of interest"
    lines = [f"# CPU benchmark, {meta['cpu']}, {meta['date']}", "",
             f"{meta['cores']} cores, {meta['threads']} threads; flags: {flags}. torch "
             f"{meta['torch']}, onnxruntime {meta['onnxruntime']}, openvino {meta['openvino']}, "
             f"nncf {meta['nncf']}. {meta.get('seconds', '?')} s in all.", ""]
    if not any(meta["flags"].get(f) for f in ("avx512_vnni", "avx_vnni", "amx_int8")):
        lines += ["This CPU has no VNNI: u8 x s8 int8 GEMMs (int8-dynamic, openvino-int8) run "
                  "on AVX2 vpmaddubsw, whose int16 pair sums saturate (255 x 127 x 2 > 32767) "
                  "with full-range int8 weights; ternary weights quantize to +-127, so expect "
                  "large errors in those rows (their max_rel_err says how large).", ""]
    gemm = [r for r in rows if r["kind"] == "gemm"]
    paths = [p for p in ROWS if any(r["path"] == p for r in rows)]
    if gemm:
        done = [p for p in paths if any(r["path"] == p and "ms" in r for r in gemm)]
        keys = sorted({(r["model"], r["shape"], r["K"], r["N"], r["M"]) for r in gemm},
                      key=lambda k: (list(SHAPES).index(k[0]),
                                     [s[0] for s in SHAPES[k[0]]].index(k[1]), k[4]))
        ms = {(r["model"], r["shape"], r["M"], r["path"]): r.get("ms") for r in gemm}
        gops = {(r["model"], r["shape"], r["M"], r["path"]): r.get("gops") for r in gemm}
        head = "| model | GEMM K->N | M | " + " | ".join(done) + " |"
        sep = "|---|---|---|" + "---|" * len(done)
        for title, table, spec in (("ms (median)", ms, ".2f"), ("GOP/s (2MNK / t)", gops, ".0f")):
            lines += [f"## GEMM Y = X W^T, {title}", "", head, sep]
            for model, label, k, n, m in keys:
                lines.append(f"| {model} | {label} {k}->{n} | {m} | " + " | ".join(
                    _fmt(table.get((model, label, m, p)), spec) for p in done) + " |")
            lines.append("")
        for peer in ("dense-fp32", "int8-dynamic"):
            if peer not in done:
                continue
            lines += [f"## GEMM speed-up vs {peer} ({peer} ms / row ms; > 1 is faster)", "",
                      head, sep]
            for model, label, k, n, m in keys:
                base = ms.get((model, label, m, peer))
                cells = []
                for p in done:
                    v = ms.get((model, label, m, p))
                    cells.append("-" if not v or not base else f"{base / v:.2f}")
                lines.append(f"| {model} | {label} {k}->{n} | {m} | " + " | ".join(cells) + " |")
            lines.append("")
        errs = {}
        for r in gemm:
            if "max_rel_err" in r:
                errs[r["path"]] = max(errs.get(r["path"], 0.0), r["max_rel_err"])
        lines += ["Max relative error vs the fp32 reference, worst over shapes: " +
                  ", ".join(f"{p} {e:.1e}" for p, e in errs.items()), ""]
    e2e = [r for r in rows if r["kind"] == "e2e"]
    if e2e:
        lines += ["## End to end, one forward with CFG (median of 3 after 1 warm-up)", "",
                  "Peak RSS: the row's own process (VmHWM: imports, loading and the runs).", "",
                  "| model | images (batch) | path | ms | vs dense-fp32 | vs int8-dynamic | "
                  "peak RSS MiB | load s | max rel diff vs function |",
                  "|---|---|---|---|---|---|---|---|---|"]
        ems = {(r["model"], r["images"], r["path"]): r.get("ms") for r in e2e}
        for r in e2e:
            if "ms" not in r:
                continue
            d = ems.get((r["model"], r["images"], "dense-fp32"))
            q = ems.get((r["model"], r["images"], "int8-dynamic"))
            lines.append(f"| {r['model']} | {r['images']} ({r['batch']}) | {r['path']} | "
                         f"{r['ms']:.1f} | {_fmt(d / r['ms'] if d else None)} | "
                         f"{_fmt(q / r['ms'] if q else None)} | "
                         f"{r['peak_rss_mib']:.0f} | {r.get('load_s', 0):.1f} | "
                         f"{_fmt(r.get('max_rel_diff_vs_function'), '.1e')} |")
        lines.append("")
    notes = {}
    for r in rows:
        why = r.get("skipped") or r.get("error")
        if why:
            notes.setdefault((r["kind"], r["path"], ("error: " if "error" in r else "") + why), 0)
        for key in ("note",):
            if isinstance(r.get("info"), dict) and r["info"].get(key):
                notes.setdefault((r["kind"], r["path"], "note: " + r["info"][key]), 0)
    if notes:
        lines += ["## Skipped rows and notes", ""]
        lines += [f"- {kind} `{path}`: {why}" for kind, path, why in notes]
        lines.append("")
    kernels = {}
    for r in rows:
        if isinstance(r.get("info"), dict):
            desc = r["info"].get("kernel") or r["info"].get("precision_hint")
            if desc and r["path"] not in kernels:
                extra = r["info"].get("runtime_precisions")
                kernels[r["path"]] = f"{desc}" + (f" (runtime precisions {extra})" if extra else "")
    if kernels:
        lines += ["## What ran", ""] + [f"- `{p}`: {d}" for p, d in kernels.items()] + [""]
    return "\n".join(lines)


def plot(meta: dict, rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    gemm = [r for r in rows if r["kind"] == "gemm" and "gops" in r]
    ms_vals = sorted({r["M"] for r in gemm})
    m_plot = 512 if 512 in ms_vals else (ms_vals[0] if ms_vals else None)
    e2e = [r for r in rows if r["kind"] == "e2e" and "ms" in r]
    groups = sorted({(r["model"], r["images"]) for r in e2e})
    panels = (1 if gemm else 0) + len(groups)
    if not panels:
        return
    fig, axes = plt.subplots(1, panels, figsize=(max(7, 4.5 * panels), 4.2), squeeze=False)
    ax_i = 0
    colors = {p: plt.cm.tab20(i) for i, p in enumerate(ROWS)}
    if gemm:
        ax = axes[0][0]
        sel = [r for r in gemm if r["M"] == m_plot]
        shapes = list(dict.fromkeys(f"{r['model']} {r['shape']}" for r in sel))
        paths = [p for p in ROWS if any(r["path"] == p for r in sel)]
        width = 0.8 / max(len(paths), 1)
        for j, p in enumerate(paths):
            vals = {f"{r['model']} {r['shape']}": r["gops"] for r in sel if r["path"] == p}
            ax.bar([i + j * width for i in range(len(shapes))], [vals.get(s, 0) for s in shapes],
                   width, label=p, color=colors[p])
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], shapes, rotation=45,
                      ha="right")
        ax.set_ylabel(f"GOP/s at M = {m_plot}")
        ax.set_title("GEMMs")
        ax.legend(fontsize=6, ncol=2)
        ax_i = 1
    for ax, (model, images) in zip(axes[0][ax_i:], groups):
        sel = [r for r in e2e if r["model"] == model and r["images"] == images]
        ax.bar([r["path"] for r in sel], [r["ms"] for r in sel],
               color=[colors[r["path"]] for r in sel])
        ax.set_title(f"{model}, {images} image(s) + CFG")
        ax.set_ylabel("ms per forward")
        ax.tick_params(axis="x", rotation=60, labelsize=7)
    fig.suptitle(f"{meta['cpu']}, {meta['threads']} threads, {meta['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(meta: dict, rows: list[dict], out: Path, suffix: str = "") -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"cpu-{slug(meta['cpu'])}-{meta['date']}{suffix}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(meta, rows))
    try:
        plot(meta, rows, stem.with_suffix(".png"))
    except Exception as err:  # noqa: BLE001 - the numbers matter more than the chart
        print(f"plot skipped: {err}")
    return stem


# ---- CLI ----------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="*", choices=sorted(SHAPES), default=list(SHAPES),
                   help="GEMM shape sets (none: no GEMMs)")
    p.add_argument("--m", nargs="+", type=int, default=list(M_VALUES), help="GEMM rows M")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), metavar="ROW",
                   help=f"paths to run, GEMM and end to end (default: all of {', '.join(ROWS)})")
    p.add_argument("--e2e", nargs="*", choices=sorted(E2E_MODELS), default=list(E2E_MODELS),
                   help="end-to-end models (none: no end-to-end rows)")
    p.add_argument("--e2e-images", nargs="+", type=int, default=E2E_MODELS["600M"]["images"],
                   help="images (each + CFG) per forward of the 600M model (the demo runs 40)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="threads of every path (default: all cores)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: GEMM {QUICK_SHAPE[0]} {QUICK_SHAPE[1]} at M={QUICK_M[0]} and "
                        f"the demo model end to end")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                   help="exports and converted models, reused by later runs (delete a "
                        "model's folder there to rebuild it after the model or exporter changed)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--suffix", default="", help="appended to the result file names")
    p.add_argument("--prepare", nargs=2, metavar=("MODEL", "ARTIFACT"), help=argparse.SUPPRESS)
    p.add_argument("--one-row", metavar="JSON", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads {args.threads}: must be >= 1")
    if args.prepare:
        import cpu_models as cm
        try:
            build_artifact(args.cache, *args.prepare)
        except cm.Skip as err:
            print(f"SKIP: {err}")
            return 3
        return 0
    if args.one_row:
        spec = json.loads(args.one_row)
        print("ROW: " + json.dumps(one_row(spec)), flush=True)
        return 0

    import onnxruntime  # noqa: F401 - fail early when the core dependency is missing

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.quick:
        shapes = [QUICK_SHAPE]
        m_values, e2e = list(QUICK_M), ["demo"]
    else:
        shapes = [(model, *s) for model in args.shapes for s in SHAPES[model]]
        m_values, e2e = args.m, args.e2e
    meta = machine_info(args.threads)
    meta["argv"] = sys.argv[1:] if argv is None else list(argv)
    print(f"CPU: {meta['cpu']}, {meta['cores']} cores, {args.threads} threads, flags "
          f"{[f for f, on in meta['flags'].items() if on]}")
    tmp = args.cache / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rows: list[dict] = []
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    if shapes:
        import torch
        torch.set_num_threads(args.threads)
        rows += run_gemms(shapes, m_values, args.rows, args.threads, tmp, log)
        meta["seconds"] = round(time.time() - t0, 1)
        write_results(meta, rows, args.out, args.suffix)
    if e2e:
        rows += run_e2e(e2e, args.e2e_images, args.rows, args.cache, args.threads, tmp, log)
    meta["seconds"] = round(time.time() - t0, 1)
    stem = write_results(meta, rows, args.out, args.suffix)
    print(stem.with_suffix(".md").read_text())
    print(f"wrote {stem}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
