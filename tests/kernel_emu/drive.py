"""Sweeps the emulated kernel library (see emulator.py) against the fp64 reference.

    python tests/kernel_emu/drive.py LIB [--paths skinny,tc,wgmma,wgmma2,generic] [--quick]

A path may name a variant after "@": wgmma2@128x256 / @256x128 / @128x128 sets
TERDIT_WGMMA2_TILE (the wgmma2 tile configuration) for its cases; wgmma2@cycle gives each case
the next of the three (every configuration on a third of the cases, for the quick suite).

Run as its own process: the emulator aborts on a misaligned access. TERDIT_EMU_SMS (SM count
the dispatch sees) and TERDIT_EMU_CC_MAJOR are read from the environment. Every output buffer is
NaN-poisoned and fenced by sentinels (out-of-bounds writes), every input fenced by NaN / code-3
words (out-of-bounds reads show up as NaN or wrong values). Exit status 1 on any failure.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from terdit import kernels  # noqa: E402
from terdit.ternary import pack_k16  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WGMMA2_TILES = ("128x256", "256x128", "128x128")
GUARD = 64  # elements of fence on each side (keeps 16-byte alignment for every dtype)


def fenced(t, fill, offset=0):
    """Copy of t inside a larger buffer filled with `fill`; `offset` extra elements misalign it."""
    buf = torch.full((t.numel() + 2 * GUARD + offset,), fill, dtype=t.dtype)
    view = buf[GUARD + offset:GUARD + offset + t.numel()].view(t.shape)
    view.copy_(t)
    return buf, view


def run_case(lib, m, n, k, dtype, path, swiglu, bias, misalign_w, gen):
    t = torch.randint(-1, 2, (n, k), generator=gen)
    w = pack_k16(t)
    scale = torch.rand(n, generator=gen) + 0.5
    b = torch.randn(n, generator=gen) if bias else None
    x = torch.randn(m, k, generator=gen).to(dtype)
    _, xv = fenced(x, float("nan"))
    _, wv = fenced(w, -1, offset=1 if misalign_w else 0)  # -1: sixteen invalid codes 3
    cols = n // 2 if swiglu else n
    ybuf = torch.full((m * cols + 2 * GUARD,), 7.0, dtype=dtype)
    yv = ybuf[GUARD:GUARD + m * cols].view(m, cols)
    yv.fill_(float("nan"))
    rc = lib.terditTernaryMatmulEx(xv.data_ptr(), wv.data_ptr(), scale.data_ptr(),
                                   None if b is None else b.data_ptr(), yv.data_ptr(), m, n, k,
                                   kernels._DTYPES[dtype], 1 if swiglu else 0, kernels.PATHS[path],
                                   None)
    tile = os.environ.get("TERDIT_WGMMA2_TILE") if path == "wgmma2" else None
    what = (f"path={path}{'@' + tile if tile else ''} {dtype} M={m} N={n} K={k} swiglu={swiglu} "
            f"bias={bias} "
            f"misaligned_w={misalign_w}")
    if rc != 0:
        return f"{what}: rc={rc}"
    if not (bool((ybuf[:GUARD] == 7).all()) and bool((ybuf[GUARD + m * cols:] == 7).all())):
        return f"{what}: wrote outside Y"
    if not bool(torch.isfinite(yv).all()):
        return f"{what}: {int((~torch.isfinite(yv)).sum())} non-finite outputs"
    a = (x.double() @ t.double().t()) * scale.double()
    if b is not None:
        a = a + b.double()
    if swiglu:
        a = F.silu(a[:, :n // 2]) * a[:, n // 2:]
    err = float((yv.double() - a).norm() / a.norm())
    bound = 1e-5 if dtype == torch.float32 else (2e-3 if dtype == torch.float16 else 8e-3)
    if err > bound:
        return f"{what}: relative error {err:.2e} > {bound:.0e}"
    return None


def cases(quick, path):
    shapes = [(16, 16), (48, 48), (80, 272), (208, 80), (64, 1040), (1024, 320), (96, 4112),
              (80, 576), (48, 2112)]  # the last two: K % 64 == 0 (16-byte weight rows), K tails
    ms = [1, 5, 8, 12, 17, 33, 130] if not quick else [3, 12, 17, 40]
    if quick and not path.startswith("skinny"):
        # (1024, 320) is there for the skinny planner's wide CTAs, and with the other two for
        # the 16-byte weight path of skinny / skinny2 (the others cover it at full size).
        for shape in ((1024, 320), (80, 576), (48, 2112)):
            shapes.remove(shape)
    for (n, k), m in itertools.product(shapes, ms):
        if n * k * m > 8_000_000:
            continue
        yield m, n, k


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lib", type=Path)
    parser.add_argument("--paths", default="auto,skinny,skinny2,tc,wgmma,wgmma2,wgmma2@128x256,"
                        "wgmma2@256x128,wgmma2@128x128,generic")
    parser.add_argument("--dtypes", default="bf16,fp16")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    lib = kernels.open_library(args.lib)
    gen = torch.Generator().manual_seed(0)
    failures, count = [], 0
    for spec in args.paths.split(","):
        path, _, variant = spec.partition("@")
        for dtype in args.dtypes.split(","):
            for i, (m, n, k) in enumerate(cases(args.quick, path)):
                if path == "wgmma2":  # "" lets the launcher choose
                    os.environ["TERDIT_WGMMA2_TILE"] = (WGMMA2_TILES[i % len(WGMMA2_TILES)]
                                                        if variant == "cycle" else variant)
                swiglu = n % 32 == 0 and i % 3 == 1
                msg = run_case(lib, m, n, k, DTYPES[dtype], path, swiglu, bias=i % 2 == 0,
                               misalign_w=i % 4 == 3, gen=gen)
                count += 1
                if msg:
                    failures.append(msg)
                    print("FAIL", msg, flush=True)
    print(f"{count - len(failures)} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
