"""bench/cpu.py's results: the machine, the JSON + markdown table + PNG of a run."""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
from pathlib import Path


from cpu_settings import INTERESTING_FLAGS, ROWS, SHAPES


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
