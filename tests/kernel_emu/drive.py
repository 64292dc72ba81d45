"""Sweeps the emulated kernel library (see emulator.py) against the fp64 reference.

    python tests/kernel_emu/drive.py LIB [--paths skinny,tc,wgmma,wgmma2,generic] [--quick]
    python tests/kernel_emu/drive.py LIB --quantize

A path followed by "@e4m3" runs the W1.58A8 product on that path (X quantized per token with the
torch definition, terdit.kernels.w2a8.quantize_rows_e4m3_ref; --dtypes then name Y's type) against
the fp64 product of the same e4m3 values. --quantize checks launchQuantizeRowsE4m3 bit for bit
against that definition (odd shapes, misaligned rows, NaN rows).

After every product the kernel family that ran (terditLastKernelPath) must be the one the
launcher's rules give for the case (tests/kernel_paths.py); "ran" lines before the last one count
the families that ran per requested path ("ran wgmma: tc=12 wgmma=36").

Run as its own process: the emulator aborts on a misaligned access. TERDIT_EMU_SMS (SM count
the dispatch sees), TERDIT_EMU_CC_MAJOR and TERDIT_EMU_CC_MINOR are read from the environment.
Every output buffer is NaN-poisoned and fenced by sentinels (out-of-bounds writes), every input
fenced by NaN / code-3 words (out-of-bounds reads show up as NaN or wrong values). Exit status 1
on any failure.
"""
from __future__ import annotations

import argparse
import collections
import ctypes
import itertools
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from terdit.kernels import cuda as kernels  # noqa: E402
from terdit.kernels import w2a8  # noqa: E402
from terdit.formats import pack_k16  # noqa: E402
from tests.kernel_paths import expected_family  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GUARD = 64  # elements of fence on each side (keeps 16-byte alignment for every dtype)


def fenced(t, fill, offset=0):
    """Copy of t inside a larger buffer filled with `fill`; `offset` extra elements misalign it."""
    buf = torch.full((t.numel() + 2 * GUARD + offset,), fill, dtype=t.dtype)
    view = buf[GUARD + offset:GUARD + offset + t.numel()].view(t.shape)
    view.copy_(t)
    return buf, view


def run_case(lib, m, n, k, dtype, path, swiglu, bias, misalign_w, gen, e4m3=False):
    t = torch.randint(-1, 2, (n, k), generator=gen)
    w = pack_k16(t)
    scale = torch.rand(n, generator=gen) + 0.5
    b = torch.randn(n, generator=gen) if bias else None
    x = torch.randn(m, k, generator=gen).to(dtype)
    xs = None
    if e4m3:
        xq, xs = w2a8.quantize_rows_e4m3_ref(x)  # X is e4m3 bytes, dtype is Y's type
        x = xq
        _, xv = fenced(xq.view(torch.uint8), 0x7F)  # 0x7F: e4m3 NaN
        _, sv = fenced(xs, float("nan"))
    else:
        _, xv = fenced(x, float("nan"))
    _, wv = fenced(w, -1, offset=1 if misalign_w else 0)  # -1: sixteen invalid codes 3
    cols = n // 2 if swiglu else n
    ybuf = torch.full((m * cols + 2 * GUARD,), 7.0, dtype=dtype)
    yv = ybuf[GUARD:GUARD + m * cols].view(m, cols)
    yv.fill_(float("nan"))
    args = (wv.data_ptr(), scale.data_ptr(), None if b is None else b.data_ptr(), yv.data_ptr(),
            m, n, k, kernels.DTYPE_CODES[dtype], 1 if swiglu else 0, kernels.PATHS[path])
    if e4m3:
        rc = lib.terditTernaryMatmulE4m3(xv.data_ptr(), sv.data_ptr(), *args, None)
    else:
        rc = lib.terditTernaryMatmulEx(xv.data_ptr(), *args, None)
    what = (f"path={path}{'@e4m3' if e4m3 else ''} {dtype} M={m} N={n} K={k} swiglu={swiglu} "
            f"bias={bias} misaligned_w={misalign_w}")
    if rc != 0:
        return f"{what}: rc={rc}"
    ran = kernels.FAMILIES[lib.terditLastKernelPath()]
    sms, cc = emulated_gpu()
    expected = expected_family(path, m=m, n=n, k=k, dtype=dtype, e4m3=e4m3, aligned_xy=True,
                               aligned_w=not misalign_w, sms=sms, cc=cc)
    if ran != expected:
        return f"{what}: the {ran} kernel ran, the rules give {expected}"
    ran_families[f"{path}{'@e4m3' if e4m3 else ''}"][ran] += 1
    if not (bool((ybuf[:GUARD] == 7).all()) and bool((ybuf[GUARD + m * cols:] == 7).all())):
        return f"{what}: wrote outside Y"
    if not bool(torch.isfinite(yv).all()):
        return f"{what}: {int((~torch.isfinite(yv)).sum())} non-finite outputs"
    a = (x.double() @ t.double().t()) * scale.double()
    if xs is not None:
        a = a * xs.double()[:, None]
    if b is not None:
        a = a + b.double()
    if swiglu:
        a = F.silu(a[:, :n // 2]) * a[:, n // 2:]
    err = float((yv.double() - a).norm() / a.norm())
    bound = 1e-5 if dtype == torch.float32 else (2e-3 if dtype == torch.float16 else 8e-3)
    if err > bound:
        return f"{what}: relative error {err:.2e} > {bound:.0e}"
    return None


ran_families: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def emulated_gpu():
    """(SM count, (major, minor)) the emulated launcher sees (fake/emu.h's defaults)."""
    env = os.environ
    return int(env.get("TERDIT_EMU_SMS", 4)), (int(env.get("TERDIT_EMU_CC_MAJOR", 9)),
                                                  int(env.get("TERDIT_EMU_CC_MINOR", 0)))


def cases(quick, path):
    shapes = [(16, 16), (48, 48), (80, 272), (208, 80), (64, 1040), (1024, 320), (96, 4112),
              (80, 576), (48, 2112)]  # the last two: K % 64 == 0 (16-byte weight rows), K tails
    ms = [1, 5, 8, 12, 17, 33, 130] if not quick else [3, 12, 17, 40]
    if quick and not path.startswith("skinny"):
        # (1024, 320) is there for the skinny planner's wide CTAs, and with the other two for
        # the 16-byte weight path of skinny (the others cover it at full size).
        for shape in ((1024, 320), (80, 576), (48, 2112)):
            shapes.remove(shape)
    if path == "wgmma":
        # The TMA kernel needs K % 64 == 0 (else it runs tc): N and M tails, several tiles along
        # N and M, K tails inside a 128-column e4m3 tile (K = 192, 576), persistent CTAs
        # walking several tiles (TERDIT_EMU_SMS), SwiGLU with N / 2 not a multiple of 64.
        shapes = [(16, 64), (96, 192), (272, 128), (160, 576), (48, 2112), (320, 64)]
        ms = [1, 37, 130, 300] if not quick else [5, 130, 270]
    for (n, k), m in itertools.product(shapes, ms):
        if n * k * m > 8_000_000:
            continue
        yield m, n, k


def quantize_cases(lib, gen):
    """launchQuantizeRowsE4m3 against quantize_rows_e4m3_ref, bit for bit."""
    failures, count = [], 0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for m, k, offset in ((1, 16, 0), (5, 64, 0), (9, 1040, 0), (3, 24, 0), (4, 80, 1),
                             (33, 512, 0), (2, 8, 3)):
            x = torch.randn(m, k, generator=gen) * torch.logspace(-6, 3, m)[:, None]
            x[0, :3] = torch.tensor([1e-9, -0.0, 300.0])  # a subnormal, a signed zero
            if m > 2:
                x[2, k // 2] = float("nan")  # the NaN row
            x = x.to(dtype)
            _, xv = fenced(x, float("nan"), offset=offset)
            qbuf = torch.full((m * k + 2 * GUARD + offset,), 0x55, dtype=torch.uint8)
            qv = qbuf[GUARD + offset:GUARD + offset + m * k].view(m, k)
            sbuf = torch.full((m + 2 * GUARD,), -1.0)
            sv = sbuf[GUARD:GUARD + m]
            rc = lib.terditQuantizeRowsE4m3(xv.data_ptr(), kernels.DTYPE_CODES[dtype], m, k,
                                            qv.data_ptr(), sv.data_ptr(), None)
            what = f"quantize {dtype} M={m} K={k} offset={offset}"
            count += 1
            ref_q, ref_s = w2a8.quantize_rows_e4m3_ref(x)
            ref_bits = ref_q.view(torch.uint8)
            ok_q = (qv == ref_bits) | (torch.isnan(ref_q.float()) & torch.isnan(
                qv.view(torch.float8_e4m3fn).float()))
            ok_s = (sv == ref_s) | (torch.isnan(ref_s) & torch.isnan(sv))
            if rc != 0:
                failures.append(f"{what}: rc={rc}")
            elif not (bool((qbuf[:GUARD + offset] == 0x55).all())
                      and bool((qbuf[GUARD + offset + m * k:] == 0x55).all())
                      and bool((sbuf[:GUARD] == -1).all()) and bool((sbuf[GUARD + m:] == -1).all())):
                failures.append(f"{what}: wrote outside xq / xScale")
            elif not bool(ok_q.all()) or not bool(ok_s.all()):
                bad = (~ok_q).nonzero()[:3].tolist()
                failures.append(f"{what}: {int((~ok_q).sum())} bytes and {int((~ok_s).sum())} "
                                f"scales differ from the reference, first at {bad}")
    for msg in failures:
        print("FAIL", msg, flush=True)
    return count, failures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lib", type=Path)
    parser.add_argument("--paths", default="auto,skinny,tc,wgmma,wgmma2,generic,wgmma@e4m3,"
                        "tc@e4m3,generic@e4m3")
    parser.add_argument("--dtypes", default="bf16,fp16")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--quantize", action="store_true",
                        help="check the quantization kernel instead of the products")
    args = parser.parse_args(argv)
    lib = kernels.open_library(args.lib)
    lib.terditLastKernelPath.restype = ctypes.c_int
    gen = torch.Generator().manual_seed(0)
    if args.quantize:
        count, failures = quantize_cases(lib, gen)
        print(f"{count - len(failures)} passed, {len(failures)} failed")
        return 1 if failures else 0
    failures, count = [], 0
    for spec in args.paths.split(","):
        path, _, variant = spec.partition("@")
        for dtype in args.dtypes.split(","):
            for i, (m, n, k) in enumerate(cases(args.quick, path)):
                swiglu = n % 32 == 0 and i % 3 == 1
                msg = run_case(lib, m, n, k, DTYPES[dtype], path, swiglu, bias=i % 2 == 0,
                               misalign_w=i % 4 == 3, gen=gen, e4m3=variant == "e4m3")
                count += 1
                if msg:
                    failures.append(msg)
                    print("FAIL", msg, flush=True)
    for spec, ran in ran_families.items():
        print(f"ran {spec}: " + " ".join(f"{name}={n}" for name, n in sorted(ran.items())))
    print(f"{count - len(failures)} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
