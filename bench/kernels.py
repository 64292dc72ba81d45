"""Benchmark of the TernaryMatMul CUDA kernels on every TerDiT layer shape (GPU).

For each TerDiT-600M / 4.2B ternary GEMM (fused qkv, wo, fused w1|w3, w2, adaLN, the stacked
adaLN of all blocks) and M in {2, 16, 512, 2048, 8192}, times
  ours bf16       terdit::ternary_matmul (k16 weights, libterdit_kernels.so, bf16 X and Y)
  ours W1.58A8    terdit::ternary_matmul_e4m3 on e4m3 X (per-token scales) and the same k16
                  codes, bf16 Y; `+quant` adds the quantize kernel (launchQuantizeRowsE4m3)
  cuBLAS bf16     F.linear on the bf16 weight
  cuBLASLt FP8    torch._scaled_mm row-wise (the same e4m3 X and scales, an e4m3 copy of the
                  weights, fast accumulation: the accumulation our FP8 kernels have)
  wgmma2          on Hopper for M > 32: the previous large-M default (cp.async producer inside the
                  MMA warps), for the comparison that decides its deletion
  official        with --official: unpack the 2-bit HQQ uint8 weight to bf16 every call, F.linear
with triton.testing.do_bench (L2 flushed before every rep, medians), plus one stacked adaLN call vs
32 (or 16) separate cuBLAS adaLN calls at M=2. Each row carries relative errors on the first 64
tokens (ours vs cuBLAS, W1.58A8 vs cuBLASLt) as a sanity check.

    python bench/kernels.py            # full run (about a minute on an H200)
    python bench/kernels.py --quick    # smoke run

Writes <out-dir>/kernels-<gpu>-<date>.{json,md} and prints the table.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
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

from terdit.kernels import cuda as kernels  # noqa: E402
from terdit.formats import codes_to_hqq, codes_to_k16  # noqa: E402

RESULTS_DIR = REPO / "bench" / "results"
DEVICE = "cuda"
M_VALUES = (2, 16, 512, 2048, 8192)
QUICK_M_VALUES = (2, 512)
MODELS = {"600M": (1536, 4096, 16), "4.2B": (3072, 8192, 32)}  # dim, FFN hidden, blocks


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
    ours_us: float                  # bf16, auto dispatch
    cublas_us: float
    ours_x_cublas: float            # cublas_us / ours_us (> 1: ours faster)
    ours_tflops: float
    ours_weight_gbps: float
    rel_err_vs_cublas: float
    w2a8_us: Optional[float] = None        # W1.58A8 GEMM on quantized X
    w2a8_quant_us: Optional[float] = None  # quantize kernel + W1.58A8 GEMM
    cublaslt_fp8_us: Optional[float] = None
    w2a8_x_cublaslt: Optional[float] = None  # cublaslt_fp8_us / w2a8_us
    w2a8_x_cublas_bf16: Optional[float] = None
    w2a8_rel_err_vs_cublaslt: Optional[float] = None
    wgmma2_us: Optional[float] = None      # previous Hopper default, M > 32
    wgmma2_rel_err_vs_cublas: Optional[float] = None
    official_us: Optional[float] = None


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
    """One layer's weights in the forms the paths use."""

    def __init__(self, shape: Shape, gen: torch.Generator, official: bool, fp8: bool):
        n, k = shape.n, shape.k
        codes = torch.randint(0, 3, (n, k), generator=gen, device=DEVICE, dtype=torch.uint8)
        self.alpha = torch.rand((), generator=gen, device=DEVICE) * 0.02 + 0.01
        self.k16 = codes_to_k16(codes)
        self.scale = self.alpha.expand(n).contiguous()
        self.hqq = codes_to_hqq(codes) if official else None  # official uint8 [N/4, K]
        self.w_bf16 = (self.alpha * (codes.float() - 1)).to(torch.bfloat16)
        self.w_e4m3 = (codes.to(torch.int8) - 1).to(torch.float8_e4m3fn) if fp8 else None
        self.scale_row = self.scale[None, :].contiguous()  # (1, N) for _scaled_mm
        self.bias = torch.randn(n, generator=gen, device=DEVICE) if shape.bias else None
        self.bias_bf16 = None if self.bias is None else self.bias.to(torch.bfloat16)
        del codes

    def ours(self, x, out):
        return kernels.matmul_into(out, x, self.k16, self.scale, self.bias)

    def w2a8(self, xq, xs, out):
        return kernels.matmul_e4m3_into(out, xq, xs, self.k16, self.scale, self.bias)

    def w2a8_quant(self, x, out):
        xq, xs = torch.ops.terdit.quantize_rows_e4m3(x)
        return kernels.matmul_e4m3_into(out, xq, xs, self.k16, self.scale, self.bias)

    def cublaslt_fp8(self, xq, xs_col):
        return torch._scaled_mm(xq, self.w_e4m3.t(), scale_a=xs_col, scale_b=self.scale_row,
                                bias=self.bias_bf16, out_dtype=torch.bfloat16, use_fast_accum=True)

    def cublas(self, x):
        return F.linear(x, self.w_bf16, self.bias_bf16)

    def official(self, x):
        p = self.hqq
        codes = torch.cat([(p >> 6) & 3, (p >> 4) & 3, (p >> 2) & 3, p & 3], 0)
        w = (self.alpha * (codes.float() - 1)).to(torch.bfloat16)
        return F.linear(x, w, self.bias_bf16)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def bench_layers(shapes: Sequence[Shape], m_values: Sequence[int], measure,
                 hopper: bool = False, fp8: bool = False, official: bool = False) -> List[Row]:
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    rows = []
    for shape in shapes:
        layer = Layer(shape, gen, official, fp8)
        for m in m_values:
            x = torch.randn(m, shape.k, generator=gen, device=DEVICE).to(torch.bfloat16)
            out = torch.empty(m, shape.n, device=DEVICE, dtype=torch.bfloat16)
            # Sanity checks on the first tokens (a full fp32 copy of the largest output is 19 GB).
            head = min(m, 64)
            ref = layer.cublas(x[:head]).float()
            out.fill_(float("nan"))
            ours_us = measure(partial(layer.ours, x, out))
            rel = relative_error(out[:head], ref)
            cublas_us = measure(partial(layer.cublas, x))
            flops = 2.0 * m * shape.n * shape.k
            row = Row(shape.model, shape.layer, shape.n, shape.k, m, ours_us, cublas_us,
                      cublas_us / ours_us, flops / ours_us * 1e-6,
                      shape.n * shape.k / 4 / ours_us * 1e-3, rel)
            text = ""
            if fp8:
                xq, xs = torch.ops.terdit.quantize_rows_e4m3(x)
                out.fill_(float("nan"))
                row.w2a8_us = measure(partial(layer.w2a8, xq, xs, out))
                w2a8_head = out[:head].float()
                row.w2a8_quant_us = measure(partial(layer.w2a8_quant, x, out))
                xs_col = xs[:, None].contiguous()
                try:
                    lt_ref = layer.cublaslt_fp8(xq[:head], xs_col[:head]).float()
                    row.cublaslt_fp8_us = measure(partial(layer.cublaslt_fp8, xq, xs_col))
                    row.w2a8_x_cublaslt = row.cublaslt_fp8_us / row.w2a8_us
                    row.w2a8_rel_err_vs_cublaslt = relative_error(w2a8_head, lt_ref)
                except RuntimeError as err:  # cuBLASLt refuses some shapes (e.g. tiny M)
                    print(f"    cuBLASLt FP8 skipped: {str(err).splitlines()[0][:100]}")
                row.w2a8_x_cublas_bf16 = cublas_us / row.w2a8_us
                text += (f"  w2a8 {row.w2a8_us:8.1f} (+quant {row.w2a8_quant_us:8.1f}) us  "
                         f"cublasLt-fp8 {row.cublaslt_fp8_us or float('nan'):8.1f} us")
                xq = xs = xs_col = None
            if hopper and m > 32:
                out.fill_(float("nan"))
                with kernels.force_path("wgmma2"):
                    row.wgmma2_us = measure(partial(layer.ours, x, out))
                row.wgmma2_rel_err_vs_cublas = relative_error(out[:head], ref)
                text += f"  wgmma2 {row.wgmma2_us:8.1f} us"
            if official:
                row.official_us = measure(partial(layer.official, x))
            rows.append(row)
            print(f"  {shape.model:5s} {shape.layer:14s} N={shape.n:6d} K={shape.k:5d} M={m:5d}: "
                  f"ours {ours_us:8.1f} us  cublas {cublas_us:8.1f} us  rel_err {rel:.1e}{text}",
                  flush=True)
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
    stacked = Layer(Shape(model, "adaln_stacked", blocks * n, k, True), gen, False, False)
    per_block = [torch.randn(n, k, generator=gen, device=DEVICE).to(torch.bfloat16)
                 for _ in range(blocks)]
    per_bias = [torch.randn(n, generator=gen, device=DEVICE).to(torch.bfloat16)
                for _ in range(blocks)]
    x = torch.randn(m, k, generator=gen, device=DEVICE).to(torch.bfloat16)
    out = torch.empty(m, blocks * n, device=DEVICE, dtype=torch.bfloat16)

    def separate():
        for w, b in zip(per_block, per_bias, strict=True):
            F.linear(x, w, b)

    res = {"model": model, "m": m, "blocks": blocks, "n_per_block": n, "k": k,
           "ours_stacked_us": measure(lambda: stacked.ours(x, out)),
           "cublas_separate_us": measure(separate),
           "cublas_stacked_us": measure(lambda: stacked.cublas(x))}
    res["speedup_vs_separate"] = res["cublas_separate_us"] / res["ours_stacked_us"]
    res["speedup_vs_cublas_stacked"] = res["cublas_stacked_us"] / res["ours_stacked_us"]
    return res


def _f(v: Optional[float], fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)


def markdown(gpu: str, rows: Sequence[Row], stacked: Sequence[Dict[str, float]]) -> str:
    lines = [f"# TernaryMatMul kernels on {gpu}", "",
             "Medians of triton.testing.do_bench (L2 flushed), microseconds. bf16 X / Y; W1.58A8 = "
             "e4m3 X with per-token scales, the same 2-bit codes, bf16 Y (+quant: with the "
             "quantize kernel); cuBLASLt FP8 = torch._scaled_mm row-wise on an e4m3 weight copy "
             "(fast accumulation). x columns: the other time over ours (> 1: ours faster).", "",
             "| model | layer | N | K | M | ours bf16 | cuBLAS bf16 | x cuBLAS | ours W1.58A8 "
             "| +quant | cuBLASLt FP8 | x cuBLASLt | W1.58A8 x cuBLAS bf16 | wgmma2 (previous) "
             "| ours TFLOP/s | rel err bf16 | rel err W1.58A8 | official |",
             "|---" * 18 + "|"]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.layer} | {r.n} | {r.k} | {r.m} | {r.ours_us:.1f} | {r.cublas_us:.1f} "
            f"| {r.ours_x_cublas:.2f} | {_f(r.w2a8_us)} | {_f(r.w2a8_quant_us)} "
            f"| {_f(r.cublaslt_fp8_us)} | {_f(r.w2a8_x_cublaslt, '.2f')} "
            f"| {_f(r.w2a8_x_cublas_bf16, '.2f')} | {_f(r.wgmma2_us)} | {r.ours_tflops:.1f} "
            f"| {r.rel_err_vs_cublas:.1e} | {_f(r.w2a8_rel_err_vs_cublaslt, '.1e')} "
            f"| {_f(r.official_us)} |")
    if stacked:
        lines += ["", "Stacked adaLN (one GEMM for all blocks) vs one cuBLAS bf16 call per block:",
                  "",
                  "| model | M | blocks | ours stacked | cuBLAS separate | cuBLAS stacked "
                  "| x separate | x cuBLAS stacked |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in stacked:
            lines.append(f"| {s['model']} | {s['m']} | {s['blocks']} | "
                         f"{s['ours_stacked_us']:.1f} | "
                         f"{s['cublas_separate_us']:.1f} | {s['cublas_stacked_us']:.1f} | "
                         f"{s['speedup_vs_separate']:.2f} | {s['speedup_vs_cublas_stacked']:.2f} |")
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
                        help="libterdit_kernels.so to load (default: terdit.kernels.cuda search order)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR,
                        help="where the JSON and markdown results go")
    parser.add_argument("--official", action="store_true",
                        help="also time the official unpack-then-F.linear path")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    kernels.load(args.lib)
    models = args.models or (["4.2B"] if args.quick else ["4.2B", "600M"])
    m_values = args.m or (QUICK_M_VALUES if args.quick else M_VALUES)
    rep_ms = args.rep_ms or (10.0 if args.quick else 40.0)
    measure = timer(rep_ms, warmup_ms=rep_ms / 5)

    gpu = torch.cuda.get_device_name()
    print(f"GPU: {gpu} (sm_{''.join(map(str, torch.cuda.get_device_capability()))}, "
          f"{torch.cuda.get_device_properties(0).multi_processor_count} SMs), torch "
          f"{torch.__version__}, library {kernels.library_path()}", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    cc = torch.cuda.get_device_capability()
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-").lower()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    base = args.out_dir / f"kernels-{slug}-{stamp}{'-quick' if args.quick else ''}"
    rows, stacked = [], []
    for model in models:  # results are written after each model (a time limit keeps them)
        rows += bench_layers(layer_shapes([model]), m_values, measure, hopper=cc[0] == 9,
                             fp8=cc >= (8, 9), official=args.official)
        stacked.append(bench_stacked_adaln(model, 2, measure))
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
