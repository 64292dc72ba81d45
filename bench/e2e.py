"""End-to-end speed of one denoising forward and of a 50-step DDIM sample (GPU).

    python bench/e2e.py [--models 600M 4.2B] [--images 1 8] [--quick]

For TerDiT-600M and 4.2B shapes (random weights in the official layout), 256x256 (32x32 latents),
1 and 8 images with classifier-free guidance (batch 2 and 16), it times in one run:
  ours            fused TernaryMatMul kernels + compiled blocks + CUDA graph (bf16, weight-only)
  ours-w2a8       the same with W1.58A8 token GEMMs: per-token e4m3 activations x the 2-bit
                  codes on FP8 tensor cores (terdit.kernels.accel w2a8=True; weights stay 2-bit)
  ours-fp8-e4m3w  comparison: the same quantization, cuBLASLt FP8 on an e4m3 weight copy
                  (w2a8_gemm="cublaslt", fast accumulation; one byte per weight)
  bf16-eager      dense bf16 DiT, eager PyTorch
  bf16-compiled   dense bf16 DiT, torch.compile'd blocks + CUDA graph (the strongest peer)
  official        the official deployment: unpack 2-bit HQQ codes to float, then F.linear
Each row: model, images, path, ms_per_forward (median, triton do_bench), weight_gib, peak_gib,
and ms per DDIM-50 sample (runtime pipeline, numpy scheduler) and images/s. W1.58A8 accuracy rows:
output and DDIM-50 final-latent max / mean relative error vs the weight-only path (same weights,
same noise). The markdown ends with the issue-11 targets, met or missed. JSON + markdown + a bar
chart in --out (default bench/results/).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from e2e_models import (DRY, CompiledGraphed, dense_model, device,  # noqa: E402
                        module_bytes, official_model, random_packed, sync)
from terdit import TerDiTConfig  # noqa: E402
from terdit.fused import FusedTerDiT  # noqa: E402
from terdit.kernels.accel import AcceleratedTerDiT  # noqa: E402

MODELS = {"600M": "TerDiT-600M", "4.2B": "TerDiT-4.2B"}
def model_config(label: str) -> TerDiTConfig:
    if DRY["on"]:
        return TerDiTConfig.from_name("TerDiT-tiny", num_classes=1000)
    return TerDiTConfig.from_name(MODELS[label])
PATHS = ("ours", "ours-w2a8", "ours-fp8-e4m3w", "bf16-eager", "bf16-compiled", "official")
# W1.58A8 variants: AcceleratedTerDiT keyword arguments
W2A8_PATHS = {"ours-w2a8": {"w2a8": True},
              "ours-fp8-e4m3w": {"w2a8": True, "w2a8_gemm": "cublaslt", "fp8_fast_accum": True}}
# Issue 11 targets: (model, images, path, max ratio of its ms_per_forward to bf16-compiled's)
TARGETS = [("4.2B", 1, "ours-w2a8", 0.60), ("4.2B", 1, "ours", 0.93),
           ("4.2B", 8, "ours-w2a8", 0.55), ("4.2B", 8, "ours", 0.90),
           ("600M", 1, "ours-w2a8", 0.75)]


# ---- measurement --------------------------------------------------------------------------------

def inputs(cfg, images: int, seed: int = 0):
    dev = device()
    g = torch.Generator(device=dev).manual_seed(seed)
    n = 2 * images
    x = torch.randn(images, cfg.in_channels, cfg.input_size, cfg.input_size, device=dev, generator=g)
    x = torch.cat([x, x])
    t = torch.full((n,), 500.0, device=dev)
    y = torch.cat([torch.randint(0, cfg.num_classes, (images,), device=dev, generator=g),
                   torch.full((images,), cfg.null_class, device=dev)])
    return x, t, y


def time_forward(fn, args, quick: bool) -> float:
    if DRY["on"]:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - t0) * 1e3)
        return float(np.median(times))
    import triton.testing
    return float(triton.testing.do_bench(lambda: fn(*args), warmup=25 if quick else 100,
                                         rep=50 if quick else 300, return_mode="median"))


def ddim_sample(fn, cfg, images: int, steps: int = 50, seed: int = 0):
    """(seconds, final latents) of a DDIM run through the runtime pipeline."""
    from runtime import SampleOptions, TerDiTPipeline
    from terdit_common.sampling import ModelInfo

    class Adapter:
        name = "bench"
        settings: dict = {}
        info = ModelInfo(cfg.to_dict(), "bench", "")

        @torch.no_grad()
        def forward(self, x, t, y, cfg_scale=None):
            dev = device()
            out = fn(torch.from_numpy(x).to(dev), torch.from_numpy(t).to(dev),
                     torch.from_numpy(y).to(dev))
            return out.float().cpu().numpy()

    pipe = TerDiTPipeline(Adapter())
    opts = SampleOptions(steps=steps, sampler="ddim", cfg_scale=4.0, seed=seed, batch_size=images)
    labels = [(17 * i) % cfg.num_classes for i in range(images)]
    pipe.sample(list(range(images)), labels, SampleOptions(steps=2, sampler="ddim", batch_size=images))
    sync()
    t0 = time.perf_counter()
    lat = pipe.sample(list(range(images)), labels, opts)
    sync()
    return time.perf_counter() - t0, lat


def measure(name, fn, weight_bytes, cfg, images, quick, do_ddim):
    args = inputs(cfg, images)
    sync()
    if DRY["on"]:
        fn(*args)
        out = fn(*args).clone()
        peak = weight_bytes
    else:
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(*args)  # first call: compile / capture (a CUDA graph's pool is allocated here)
        out = fn(*args).clone()
        torch.cuda.synchronize()
        # weights + all the path allocated beyond them (activations, graph pool, workspaces)
        peak = (torch.cuda.max_memory_allocated() - base + weight_bytes
                - out.numel() * out.element_size())
    ms = time_forward(fn, args, quick)
    row = {"path": name, "images": images, "batch": 2 * images, "ms_per_forward": round(ms, 3),
           "weight_gib": round(weight_bytes / 2**30, 3), "peak_gib": round(peak / 2**30, 3)}
    lat = None
    if do_ddim:
        sec, lat = ddim_sample(fn, cfg, images)
        row.update(ms_per_ddim50=round(sec * 1e3, 1), images_per_s=round(images / sec, 3))
    return row, out, lat


@torch.no_grad()
def run_model(label: str, images_list, quick: bool, paths, log) -> list[dict]:
    cfg = model_config(label)
    rows = []
    graphs = not DRY["on"]
    backend = "aot_eager" if DRY["on"] else "inductor"
    packed = random_packed(cfg)
    ours_model = FusedTerDiT(packed).to(torch.bfloat16)
    results = {}

    def add(path, images, factory_or_fn, wbytes):
        if path not in paths:
            return
        try:
            row, out, lat = measure(path, factory_or_fn, wbytes, cfg, images, quick, do_ddim=True)
            row["model"] = label
            rows.append(row)
            results[(path, images)] = (out, lat)
            log(f"{label:5} {path:14} images={images}: {row['ms_per_forward']:.2f} ms/forward, "
                f"DDIM-50 {row.get('ms_per_ddim50', float('nan')):.0f} ms, peak {row['peak_gib']:.2f} GiB")
        except Exception as err:  # noqa: BLE001 - one failing path must not stop the others
            rows.append({"model": label, "path": path, "images": images, "error": f"{type(err).__name__}: {err}"})
            log(f"{label} {path} images={images}: FAILED {type(err).__name__}: {err}")
            traceback.print_exc()

    ours = AcceleratedTerDiT(ours_model, compile=True, cuda_graphs=graphs, compile_backend=backend)
    wb = module_bytes(ours_model)
    for n in images_list:
        add("ours", n, ours, wb)
    fp8_ok = DRY["on"] or torch.cuda.get_device_capability() >= (8, 9)
    for name, kwargs in W2A8_PATHS.items():
        if name not in paths:
            continue
        if not fp8_ok:
            rows.append({"model": label, "path": name, "error": "needs FP8 tensor cores (sm_89+)"})
            continue
        try:
            w2a8_model = FusedTerDiT(random_packed(cfg)).to(torch.bfloat16)  # same codes (seed 0)
            fast = AcceleratedTerDiT(w2a8_model, compile=True, cuda_graphs=graphs,
                                     compile_backend=backend, **kwargs)
            wb8 = module_bytes(fast.model)
            for n in images_list:
                add(name, n, fast, wb8)
            del fast, w2a8_model
        except Exception as err:  # noqa: BLE001
            rows.append({"model": label, "path": name, "error": f"{type(err).__name__}: {err}"})
            traceback.print_exc()
    if "official" in paths:
        off = official_model(packed)
        for n in images_list:
            add("official", n, off, module_bytes(off))
        del off
    del ours, ours_model, packed
    gc.collect()
    if not DRY["on"]:
        torch.cuda.empty_cache()
    if "bf16-eager" in paths or "bf16-compiled" in paths:
        dense = dense_model(cfg)
        wd = module_bytes(dense)
        for n in images_list:
            add("bf16-eager", n, lambda x, t, y: dense(x, t, y), wd)
        comp = CompiledGraphed(dense)
        for n in images_list:
            add("bf16-compiled", n, comp, wd)
        del dense, comp
    gc.collect()
    if not DRY["on"]:
        torch.cuda.empty_cache()
    # W1.58A8 accuracy vs the weight-only path (same random codes: seed 0 in random_packed)
    for n in images_list:
        for name in W2A8_PATHS:
            if ("ours", n) not in results or (name, n) not in results:
                continue
            (o1, l1), (o2, l2) = results[("ours", n)], results[(name, n)]
            rel = (o2.float() - o1.float()).abs() / o1.float().abs().max()
            lat_rel = np.abs(l2 - l1) / np.abs(l1).max()
            rows.append({"model": label, "path": "w2a8-accuracy", "mode": name, "images": n,
                         "output_max_rel": float(rel.max()), "output_mean_rel": float(rel.mean()),
                         "ddim50_latent_max_rel": float(lat_rel.max()),
                         "ddim50_latent_mean_rel": float(lat_rel.mean())})
    return rows


def targets_markdown(rows) -> list[str]:
    """The issue-11 speed targets against this run's bf16-compiled rows, met or missed."""
    ms = {(r["model"], r["images"], r["path"]): r["ms_per_forward"] for r in rows
          if "ms_per_forward" in r}
    lines = ["", "Targets (ratio of ms per forward to bf16-compiled, same run):", "",
             "| model | images | path | ms | bf16-compiled ms | ratio | target | met |",
             "|---|---|---|---|---|---|---|---|"]
    for model, images, path, limit in TARGETS:
        ours, peer = ms.get((model, images, path)), ms.get((model, images, "bf16-compiled"))
        if ours is None or peer is None:
            lines.append(f"| {model} | {images} | {path} | - | - | - | <= {limit:.2f} | not run |")
            continue
        ratio = ours / peer
        lines.append(f"| {model} | {images} | {path} | {ours:.2f} | {peer:.2f} | {ratio:.2f} | "
                     f"<= {limit:.2f} | {'yes' if ratio <= limit else 'no'} |")
    return lines


def write_results(rows, out_dir: Path, meta: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"e2e-{meta['gpu'].replace(' ', '_')}-{meta['date']}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# End-to-end, {meta['gpu']}, {meta['date']} (torch {meta['torch']})", "",
             "256x256 (32x32 latents, 256 tokens/image), CFG batch = 2 x images. ms per forward: "
             "median of triton do_bench (L2 flushed). DDIM-50: runtime pipeline, numpy scheduler, "
             "host<->device copies included.", "",
             "| model | path | images | ms/forward | ms/DDIM-50 | images/s | weights GiB | peak GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "ms_per_forward" in r:
            lines.append(f"| {r['model']} | {r['path']} | {r['images']} | {r['ms_per_forward']:.2f} | "
                         f"{r.get('ms_per_ddim50', float('nan')):.0f} | {r.get('images_per_s', float('nan')):.2f} | "
                         f"{r['weight_gib']:.2f} | {r['peak_gib']:.2f} |")
        elif "error" in r:
            lines.append(f"| {r['model']} | {r['path']} | {r.get('images', '')} | failed: {r['error'][:80]} | | | | |")
    acc = [r for r in rows if r.get("path") == "w2a8-accuracy"]
    if acc:
        lines += ["", "W1.58A8 vs weight-only (same weights and noise):", "",
                  "| model | mode | images | output max rel | output mean rel | DDIM-50 latents max rel | mean rel |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r.get('mode', 'ours-w2a8')} | {r['images']} | {r['output_max_rel']:.2e} | "
                  f"{r['output_mean_rel']:.2e} | {r['ddim50_latent_max_rel']:.2e} | "
                  f"{r['ddim50_latent_mean_rel']:.2e} |" for r in acc]
    lines += targets_markdown(rows)
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        data = [r for r in rows if "ms_per_forward" in r]
        groups = sorted({(r["model"], r["images"]) for r in data})
        fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.6), squeeze=False)
        for ax, (m, n) in zip(axes[0], groups):
            sel = [r for r in data if r["model"] == m and r["images"] == n]
            ax.bar([r["path"] for r in sel], [r["ms_per_forward"] for r in sel],
                   color=["#1f77b4" if r["path"].startswith("ours") else "#999999" for r in sel])
            ax.set_title(f"TerDiT-{m}, {n} image(s) + CFG")
            ax.set_ylabel("ms per forward")
            ax.tick_params(axis="x", rotation=45)
        fig.suptitle(f"{meta['gpu']} {meta['date']}")
        fig.tight_layout()
        fig.savefig(stem.with_suffix(".png"), dpi=110)
    except Exception as err:  # noqa: BLE001
        print(f"chart skipped: {err}")
    return stem


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["600M", "4.2B"])
    p.add_argument("--images", nargs="+", type=int, default=[1, 8])
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    p.add_argument("--quick", action="store_true", help="fewer timing repetitions")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--dry-run", action="store_true",
                   help="run the script on the CPU with tiny models (checks the script only)")
    args = p.parse_args(argv)
    DRY["on"] = args.dry_run
    if not args.dry_run and not torch.cuda.is_available():
        print("bench/e2e.py needs a CUDA GPU (or --dry-run)", file=sys.stderr)
        return 2
    if args.dry_run:
        meta = {"gpu": "dry-run-cpu", "date": datetime.date.today().isoformat(),
                "torch": torch.__version__, "cuda": None, "sms": None}
    else:
        meta = {"gpu": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
                "torch": torch.__version__, "cuda": torch.version.cuda,
                "sms": torch.cuda.get_device_properties(0).multi_processor_count}
    print(f"GPU: {meta['gpu']}")
    rows = []
    t0 = time.time()
    for label in args.models:
        rows += run_model(label, args.images, args.quick, set(args.paths), print)
        stem = write_results(rows, args.out, {**meta, "seconds": round(time.time() - t0, 1)})
    print(Path(stem.with_suffix(".md")).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
