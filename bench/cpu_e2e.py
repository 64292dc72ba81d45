"""bench/cpu.py's end-to-end rows: cached artifacts (exports, converted models) built in
subprocesses, and one forward per row in its own process (`bench/cpu.py --one-row`)."""
from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from cpu_settings import CFG_SCALE, E2E_MODELS, ROOT

CPU_SCRIPT = str(Path(__file__).with_name("cpu.py"))    # --prepare and --one-row run there


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
    res = subprocess.run([sys.executable, CPU_SCRIPT, "--prepare", model, artifact,
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
        from runtime import open_backend
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
        from runtime import open_backend
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
                env = dict(os.environ)
                if path.startswith("ours-torch"):
                    # what the runtime's torch backend sets before torch loads (the row's process
                    # imports torch first): terdit_common.cpukernels.prefer_passive_openmp
                    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
                res = subprocess.run([sys.executable, CPU_SCRIPT, "--one-row", json.dumps(spec)],
                                     cwd=ROOT, capture_output=True, text=True, env=env)
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
