"""CPU benchmark: the ternary TernaryMatMul paths against the CPU peers (GEMMs and end to end).

    python bench/cpu.py [--shapes 600M 4.2B] [--m 256 512 2048] [--rows ...] [--e2e demo 600M]
    python bench/cpu.py --quick          # smoke run: one small GEMM shape + the demo model

GEMMs: Y = X @ (scale * T)^T + bias, X fp32 [M, K] random normal, T ternary random (~1/3 zeros)
packed k16, per-channel fp32 scale, zero bias, for the TerDiT-600M / 4.2B block shapes (K->N:
qkv, wo, w13, w2) and M in {256, 512, 2048}. Rows (paths):
  ours                one terdit::TernaryMatMul node in onnxruntime with the terdit CPU kernel
                      library registered (terdit_common.cpukernels.register_ort)
  ours-int8           the same node with act_quant="int8" (per-token int8 activations)
  ours-torch          torch.ops.terdit.ternary_matmul after terdit.kernels.cpu_ops.load()
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
import json
import os
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_e2e import build_artifact, one_row, run_e2e  # noqa: E402
from cpu_gemm import run_gemms  # noqa: E402
from cpu_report import machine_info, write_results  # noqa: E402
from cpu_settings import (DEFAULT_CACHE, E2E_MODELS, M_VALUES, QUICK_M, QUICK_SHAPE,  # noqa: E402
                          ROOT, ROWS, SHAPES)

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
