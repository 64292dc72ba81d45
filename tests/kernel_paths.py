"""Which kernel family launchTernaryMatmul runs for a call (docs/design.md section 8), as
plugins/kernels/ternaryMatmul.h states the rules (KernelPath), for the tests that check the family that really ran
(terdit::lastKernelPath): the emulated kernels (tests/kernel_emu/drive.py). Needs only torch."""
from __future__ import annotations

import torch

SKINNY_MAX_M = 32  # kernels::kSKINNY_MAX_M


def expected_family(path: str, *, m: int, n: int, k: int, dtype: torch.dtype, e4m3: bool,
                    aligned_xy: bool, aligned_w: bool, sms: int, cc: tuple[int, int]) -> str:
    """The family ("skinny", "tc", "generic", "wgmma", "wgmma2") that runs a product forced to
    `path` ("auto" or a family): `dtype` is X's type (with `e4m3`, Y's), `aligned_*` whether the
    pointers are 16-byte aligned, `sms` and `cc` the GPU's SM count and compute capability."""
    if not aligned_xy or (not e4m3 and dtype == torch.float32) or (e4m3 and cc < (8, 9)):
        return "generic"
    if path == "auto":
        col_blocks = (n + 127) // 128
        skinny = m <= SKINNY_MAX_M or (m <= 2 * SKINNY_MAX_M and col_blocks < sms)
        path = "skinny" if skinny and not e4m3 else "wgmma"
    if path == "wgmma2" and e4m3:
        path = "wgmma"
    if path in ("wgmma", "wgmma2") and cc[0] != 9:
        path = "tc"                      # the wgmma kernels are built for sm_90a only
    if path == "wgmma" and (k % 64 or not aligned_w):
        path = "tc"                      # the tensor map needs 16-byte weight rows
    if path == "skinny" and e4m3:
        path = "tc"
    return path
