"""Benchmark of the TernaryMatMul CUDA kernels on every TerDiT layer shape (GPU).

For each TerDiT-600M / 4.2B ternary GEMM (fused qkv, wo, fused w1|w3, w2, adaLN, the stacked
adaLN of all blocks) and M in {2, 16, 512, 2048, 8192}, in bf16, times
  ours      terdit::ternary_matmul (k16 weights, libterdit_kernels.so)
  cublas    F.linear on the bf16 weight
  official  the official path: unpack the 2-bit HQQ uint8 weight elementwise, alpha * (codes - 1)
            in fp32, cast to bf16, F.linear (what the release does every forward)
with triton.testing.do_bench (L2 flushed before every rep, medians), plus the stacked-adaLN
comparison: one stacked call vs 32 (or 16) separate cuBLAS adaLN calls at M=2. On Hopper the
opt-in large-M kernels are timed too for M > 32, each in its own columns: wgmma, wgmma2 (the
launcher's tile choice) and wgmma2 with each tile configuration forced (TERDIT_WGMMA2_TILE);
for M <= 32 the opt-in skinny2 kernel (weights through cp.async rings) has its own columns, and
the stacked-adaLN comparison times it too.

    python bench/kernels.py            # full run (about a minute on an H200)
    python bench/kernels.py --quick    # smoke run

Writes bench/results/kernels-<gpu>-<date>.{json,md} and prints the table.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import re
import sys
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from terdit import kernels  # noqa: E402
from terdit.ternary import codes_to_hqq, codes_to_k16  # noqa: E402

RESULTS_DIR = REPO / "bench" / "results"
DEVICE = "cuda"
M_VALUES = (2, 16, 512, 2048, 8192)
QUICK_M_VALUES = (2, 512)
MODELS = {"600M": (1536, 4096, 16), "4.2B": (3072, 8192, 32)}  # dim, FFN hidden, blocks
WGMMA2_TILES = ("128x256", "256x128", "128x128")  # TERDIT_WGMMA2_TILE values


@dataclass(frozen=True)
class Shape:
    model: str
    layer: str
    n: int
    k: int
    bias: bool


@dataclass
class Row:
    model: str
    layer: str
    n: int
    k: int
    m: int
    ours_us: float
    cublas_us: float
    official_us: float
    speedup_vs_cublas: float
    speedup_vs_official: float
    ours_tflops: float
    ours_weight_gbps: float
    rel_err_vs_cublas: float
    wgmma_us: Optional[float] = None  # the opt-in sm_90a kernel (M > 32 on Hopper only)
    wgmma_rel_err_vs_cublas: Optional[float] = None
    wgmma2_us: Optional[float] = None  # the pipelined sm_90a kernel, launcher's tile choice
    wgmma2_rel_err_vs_cublas: Optional[float] = None
    wgmma2_tile_us: Optional[Dict[str, float]] = None  # each tile configuration forced
    wgmma2_tile_max_rel_err: Optional[float] = None
    skinny2_us: Optional[float] = None  # the opt-in small-M ring kernel (M <= 32)
    skinny2_rel_err_vs_cublas: Optional[float] = None


def layer_shapes(models: Sequence[str]) -> List[Shape]:
    out = []
    for model in models:
        dim, hidden, blocks = MODELS[model]
        out += [Shape(model, "qkv", 3 * dim, dim, False),
                Shape(model, "wo", dim, dim, False),
                Shape(model, "w1w3", 2 * hidden, dim, False),
                Shape(model, "w2", dim, hidden, False),
                Shape(model, "adaln", 6 * dim, 1024, True),
                Shape(model, "adaln_stacked", blocks * 6 * dim, 1024, True)]
    return out


def timer(rep_ms: float, warmup_ms: float) -> Callable[[Callable[[], object]], float]:
    """Median microseconds of fn, L2 flushed before each rep (triton.testing.do_bench)."""
    try:
        from triton.testing import do_bench
    except ImportError as e:  # pragma: no cover - triton ships with CUDA builds of torch
        raise SystemExit(f"bench/kernels.py needs triton (triton.testing.do_bench): {e}") from e

    def measure(fn):
        return 1e3 * float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    return measure


class Layer:
    """One layer's weights in the three forms the three paths use."""

    def __init__(self, shape: Shape, gen: torch.Generator):
        n, k = shape.n, shape.k
        codes = torch.randint(0, 3, (n, k), generator=gen, device=DEVICE, dtype=torch.uint8)
        self.alpha = torch.rand((), generator=gen, device=DEVICE) * 0.02 + 0.01
        self.k16 = codes_to_k16(codes)
        self.scale = self.alpha.expand(n).contiguous()
        self.hqq = codes_to_hqq(codes)  # official uint8 [N/4, K]
        self.w_bf16 = (self.alpha * (codes.float() - 1)).to(torch.bfloat16)
        self.bias = torch.randn(n, generator=gen, device=DEVICE) if shape.bias else None
        self.bias_bf16 = None if self.bias is None else self.bias.to(torch.bfloat16)
        del codes

    def ours(self, x, out):
        return kernels.matmul_into(out, x, self.k16, self.scale, self.bias)

    def cublas(self, x):
        return F.linear(x, self.w_bf16, self.bias_bf16)

    def official(self, x):
        p = self.hqq
        codes = torch.cat([(p >> 6) & 3, (p >> 4) & 3, (p >> 2) & 3, p & 3], 0)
        w = (self.alpha * (codes.float() - 1)).to(torch.bfloat16)
        return F.linear(x, w, self.bias_bf16)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))


@contextlib.contextmanager
def env(name: str, value: str):
    """Sets an environment variable the kernel launcher reads on every call."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def bench_layers(shapes: Sequence[Shape], m_values: Sequence[int], measure,
                 with_wgmma: bool = False) -> List[Row]:
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    rows = []
    for shape in shapes:
        layer = Layer(shape, gen)
        for m in m_values:
            x = torch.randn(m, shape.k, generator=gen, device=DEVICE).to(torch.bfloat16)
            out = torch.empty(m, shape.n, device=DEVICE, dtype=torch.bfloat16)
            # Sanity check on the first tokens (a full fp32 copy of the largest output is 19 GB).
            head = min(m, 64)
            ref = layer.cublas(x[:head]).float()
            ours_us = measure(partial(layer.ours, x, out))
            rel = relative_error(out[:head], ref)
            wg_us = wg_rel = wg2_us = wg2_rel = wg2_tiles = wg2_tile_err = None
            if with_wgmma and m > 32:
                out.fill_(float("nan"))
                with kernels.force_path("wgmma"):
                    wg_us = measure(partial(layer.ours, x, out))
                wg_rel = relative_error(out[:head], ref)
                out.fill_(float("nan"))
                with kernels.force_path("wgmma2"):
                    wg2_us = measure(partial(layer.ours, x, out))
                wg2_rel = relative_error(out[:head], ref)
                wg2_tiles, errs = {}, []
                for tile in WGMMA2_TILES:
                    out.fill_(float("nan"))
                    with kernels.force_path("wgmma2"), env("TERDIT_WGMMA2_TILE", tile):
                        wg2_tiles[tile] = measure(partial(layer.ours, x, out))
                    errs.append(relative_error(out[:head], ref))
                wg2_tile_err = max(errs)
            sk2_us = sk2_rel = None
            if m <= 32:
                out.fill_(float("nan"))
                with kernels.force_path("skinny2"):
                    sk2_us = measure(partial(layer.ours, x, out))
                sk2_rel = relative_error(out[:head], ref)
            cublas_us = measure(partial(layer.cublas, x))
            official_us = measure(partial(layer.official, x))
            flops = 2.0 * m * shape.n * shape.k
            rows.append(Row(shape.model, shape.layer, shape.n, shape.k, m, ours_us, cublas_us,
                            official_us, cublas_us / ours_us, official_us / ours_us,
                            flops / ours_us * 1e-6, shape.n * shape.k / 4 / ours_us * 1e-3, rel,
                            wg_us, wg_rel, wg2_us, wg2_rel, wg2_tiles, wg2_tile_err, sk2_us,
                            sk2_rel))
            wg_text = "" if wg_us is None else (
                f"  wgmma {wg_us:9.1f} us (rel_err {wg_rel:.1e})  wgmma2 {wg2_us:9.1f} us (rel_err "
                f"{wg2_rel:.1e}; tiles " + " ".join(f"{t} {v:.1f}" for t, v in wg2_tiles.items())
                + f", max rel_err {wg2_tile_err:.1e})")
            if sk2_us is not None:
                wg_text += f"  skinny2 {sk2_us:9.1f} us (rel_err {sk2_rel:.1e})"
            print(f"  {shape.model:5s} {shape.layer:14s} N={shape.n:6d} K={shape.k:5d} M={m:5d}: "
                  f"ours {ours_us:9.1f} us  cublas {cublas_us:9.1f} us  official "
                  f"{official_us:9.1f} us  rel_err {rel:.1e}{wg_text}", flush=True)
            x = out = ref = None  # free before the next size
        layer = None
        torch.cuda.empty_cache()
    return rows


def bench_stacked_adaln(model: str, m: int, measure) -> Dict[str, float]:
    """One stacked adaLN GEMM (all blocks share the condition input) vs one cuBLAS call per
    block."""
    dim, _, blocks = MODELS[model]
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    n, k = 6 * dim, 1024
    stacked = Layer(Shape(model, "adaln_stacked", blocks * n, k, True), gen)
    per_block = [torch.randn(n, k, generator=gen, device=DEVICE).to(torch.bfloat16)
                 for _ in range(blocks)]
    per_bias = [torch.randn(n, generator=gen, device=DEVICE).to(torch.bfloat16)
                for _ in range(blocks)]
    x = torch.randn(m, k, generator=gen, device=DEVICE).to(torch.bfloat16)
    out = torch.empty(m, blocks * n, device=DEVICE, dtype=torch.bfloat16)

    def skinny2():
        with kernels.force_path("skinny2"):
            stacked.ours(x, out)

    def separate():
        for w, b in zip(per_block, per_bias, strict=True):
            F.linear(x, w, b)

    res = {"model": model, "m": m, "blocks": blocks, "n_per_block": n, "k": k,
           "ours_stacked_us": measure(lambda: stacked.ours(x, out)),
           "ours_skinny2_stacked_us": measure(skinny2),
           "cublas_separate_us": measure(separate),
           "cublas_stacked_us": measure(lambda: stacked.cublas(x))}
    res["speedup_vs_separate"] = res["cublas_separate_us"] / res["ours_stacked_us"]
    res["speedup_vs_cublas_stacked"] = res["cublas_stacked_us"] / res["ours_stacked_us"]
    res["skinny2_speedup_vs_separate"] = res["cublas_separate_us"] / res["ours_skinny2_stacked_us"]
    return res


def markdown(gpu: str, rows: Sequence[Row], stacked: Sequence[Dict[str, float]]) -> str:
    lines = [f"# TernaryMatMul kernels on {gpu}", "",
             "bf16, medians of triton.testing.do_bench (L2 flushed), microseconds.", "",
             "| model | layer | N | K | M | ours | cuBLAS bf16 | official unpack | x cuBLAS "
             "| x official | ours TFLOP/s | ours weight GB/s | ours rel err | wgmma (opt-in) "
             "| wgmma x cuBLAS | wgmma rel err | wgmma2 (opt-in) | wgmma2 x cuBLAS | wgmma2 rel err "
             + "".join(f"| wgmma2 {t} " for t in WGMMA2_TILES) + "| wgmma2 tiles max rel err "
             "| skinny2 (opt-in) | skinny2 x cuBLAS | skinny2 rel err |",
             "|---" * (23 + len(WGMMA2_TILES)) + "|"]
    for r in rows:
        wg = ("| - | - | -" if r.wgmma_us is None else
              f"| {r.wgmma_us:.1f} | {r.cublas_us / r.wgmma_us:.2f} | "
              f"{r.wgmma_rel_err_vs_cublas:.1e}")
        wg += ((" | - | - | -" + " | -" * len(WGMMA2_TILES) + " | -") if r.wgmma2_us is None else
               f" | {r.wgmma2_us:.1f} | {r.cublas_us / r.wgmma2_us:.2f} | "
               f"{r.wgmma2_rel_err_vs_cublas:.1e} | "
               + " | ".join(f"{r.wgmma2_tile_us[t]:.1f}" for t in WGMMA2_TILES)
               + f" | {r.wgmma2_tile_max_rel_err:.1e}")
        wg += (" | - | - | -" if r.skinny2_us is None else
               f" | {r.skinny2_us:.1f} | {r.cublas_us / r.skinny2_us:.2f} | "
               f"{r.skinny2_rel_err_vs_cublas:.1e}")
        lines.append(f"| {r.model} | {r.layer} | {r.n} | {r.k} | {r.m} | {r.ours_us:.1f} | "
                     f"{r.cublas_us:.1f} | {r.official_us:.1f} | {r.speedup_vs_cublas:.2f} | "
                     f"{r.speedup_vs_official:.2f} | {r.ours_tflops:.1f} | "
                     f"{r.ours_weight_gbps:.0f} | {r.rel_err_vs_cublas:.1e} {wg} |")
    if stacked:
        lines += ["", "Stacked adaLN (one GEMM for all blocks) vs one cuBLAS bf16 call per block:",
                  "",
                  "| model | M | blocks | ours stacked | cuBLAS separate | cuBLAS stacked "
                  "| x separate | x cuBLAS stacked | skinny2 stacked | skinny2 x separate |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for s in stacked:
            lines.append(f"| {s['model']} | {s['m']} | {s['blocks']} | "
                         f"{s['ours_stacked_us']:.1f} | "
                         f"{s['cublas_separate_us']:.1f} | {s['cublas_stacked_us']:.1f} | "
                         f"{s['speedup_vs_separate']:.2f} | {s['speedup_vs_cublas_stacked']:.2f} | "
                         f"{s['ours_skinny2_stacked_us']:.1f} | "
                         f"{s['skinny2_speedup_vs_separate']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 4.2B shapes, M in {2, 512}, short reps")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None,
                        help="models whose layer shapes to run (default: both; --quick: 4.2B)")
    parser.add_argument("--m", nargs="+", type=int, default=None, metavar="M",
                        help=f"token counts (default: {' '.join(map(str, M_VALUES))})")
    parser.add_argument("--rep-ms", type=float, default=None,
                        help="do_bench rep time per measurement in ms (default 40; --quick 10)")
    parser.add_argument("--lib", type=Path, default=None,
                        help="libterdit_kernels.so to load (default: terdit.kernels search order)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR,
                        help="where the JSON and markdown results go")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    kernels.load(args.lib)
    models = args.models or (["4.2B"] if args.quick else ["600M", "4.2B"])
    m_values = args.m or (QUICK_M_VALUES if args.quick else M_VALUES)
    rep_ms = args.rep_ms or (10.0 if args.quick else 40.0)
    measure = timer(rep_ms, warmup_ms=rep_ms / 5)

    gpu = torch.cuda.get_device_name()
    print(f"GPU: {gpu} (sm_{''.join(map(str, torch.cuda.get_device_capability()))}, "
          f"{torch.cuda.get_device_properties(0).multi_processor_count} SMs), torch "
          f"{torch.__version__}, library {kernels.library_path()}", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    with_wgmma = torch.cuda.get_device_capability()[0] == 9
    rows = bench_layers(layer_shapes(models), m_values, measure, with_wgmma)
    stacked = [bench_stacked_adaln(model, 2, measure) for model in models]

    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-").lower()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    base = args.out_dir / f"kernels-{slug}-{stamp}{'-quick' if args.quick else ''}"
    md = markdown(gpu, rows, stacked)
    base.with_suffix(".json").write_text(json.dumps(
        {"gpu": gpu, "date": stamp, "torch": torch.__version__, "rep_ms": rep_ms,
         "library": str(kernels.library_path()), "rows": [asdict(r) for r in rows],
         "stacked_adaln": stacked}, indent=1) + "\n")
    base.with_suffix(".md").write_text(md)
    print()
    print(md)
    print(f"wrote {base}.json and {base}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
