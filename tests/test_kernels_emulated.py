"""The real TernaryMatMul kernel sources run on the CPU (tests/kernel_emu): every kernel family
(skinny, tc, wgmma, wgmma2, generic) and the W1.58A8 variants (e4m3 activations on wgmma, tc and
generic) against the fp64 reference, with poisoned outputs, fenced buffers, misaligned weights,
K / N / M tails and SwiGLU, and the quantization kernel bit for bit against its torch
definition. This checks the kernels' index math and data flow under the emulator's model of
mma.sync (bf16 / fp16 / e4m3) / ldmatrix / cp.async / wgmma (asynchronous, retired by
wgmma.wait_group) / mbarrier / the bulk tensor copy, not the GPU itself (that is
tests/test_kernels_gpu.py). Every product also checks which kernel family ran
(terdit::lastKernelPath): the one the launcher's rules give for the case, so a path that silently
fell back to another family fails, and each test asserts the families its paths covered."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EMU_DIR = Path(__file__).resolve().parent / "kernel_emu"
sys.path.insert(0, str(EMU_DIR))

import emulator  # noqa: E402


@pytest.fixture(scope="module")
def emulated_lib(tmp_path_factory):
    if emulator.compiler() is None:
        pytest.skip("g++ not found: the kernel emulator cannot be built")
    return emulator.build(tmp_path_factory.mktemp("kernel_emu"))  # about 15 s on 2 cores


def drive(lib, *args, sms, cc=(9, 0)):
    env = dict(os.environ, TERDIT_EMU_SMS=str(sms), TERDIT_EMU_CC_MAJOR=str(cc[0]),
               TERDIT_EMU_CC_MINOR=str(cc[1]))
    proc = subprocess.run([sys.executable, str(EMU_DIR / "drive.py"), str(lib), *args],
                          capture_output=True, text=True, env=env, cwd=emulator.REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def families(out):
    """{requested path: sorted kernel families that ran} from drive.py's "ran" lines (each case
    already failed there unless the family that ran is the one the launcher's rules give)."""
    ran = {}
    for line in out.splitlines():
        if line.startswith("ran "):
            spec, _, counts = line[len("ran "):].partition(": ")
            ran[spec] = sorted(count.split("=")[0] for count in counts.split())
    return ran


def test_emulated_kernels_bf16(emulated_lib):
    # 2 "SMs": the quick shapes then reach every skinny (MT, R) instantiation, and the persistent
    # wgmma kernel's CTAs walk several tiles each.
    out = drive(emulated_lib, "--quick", "--paths", "skinny,tc,wgmma,wgmma2,generic", sms=2)
    assert " 0 failed" in out
    # wgmma hands the cases with misaligned weight rows to tc; every other family runs as asked
    assert families(out) == {"skinny": ["skinny"], "tc": ["tc"], "wgmma": ["tc", "wgmma"],
                             "wgmma2": ["wgmma2"], "generic": ["generic"]}


def test_emulated_kernels_w2a8(emulated_lib):
    # W1.58A8: e4m3 activations on the TMA / wgmma kernel (k32 fragments decoded by byte
    # permutes), on tc (mma.sync m16n8k32) and generic, with bf16 and float32 outputs.
    out = drive(emulated_lib, "--quick", "--paths", "wgmma@e4m3,tc@e4m3,generic@e4m3",
                "--dtypes", "bf16,fp32", sms=2)
    assert " 0 failed" in out
    assert families(out) == {"wgmma@e4m3": ["tc", "wgmma"], "tc@e4m3": ["tc"],
                             "generic@e4m3": ["generic"]}


def test_emulated_quantize_matches_definition(emulated_lib):
    out = drive(emulated_lib, "--quantize", sms=2)
    assert " 0 failed" in out


def test_emulated_kernels_fp16_fp32(emulated_lib):
    # fp16 decoders (word pairs: skinny; adjacent pairs: tc; fragment pairs: wgmma, wgmma2)
    # and the float32 path.
    out = drive(emulated_lib, "--quick", "--paths", "skinny,tc,wgmma", "--dtypes", "fp16", sms=2)
    assert " 0 failed" in out
    assert families(out) == {"skinny": ["skinny"], "tc": ["tc"], "wgmma": ["tc", "wgmma"]}
    out = drive(emulated_lib, "--quick", "--paths", "auto", "--dtypes", "fp32", sms=2)
    assert " 0 failed" in out
    assert families(out) == {"auto": ["generic"]}


@pytest.mark.slow
def test_emulated_kernels_full(emulated_lib):
    # Every family incl. auto and the W1.58A8 paths, bf16 and fp16, all shapes and M values
    # (several minutes).
    out = drive(emulated_lib, sms=1)
    assert " 0 failed" in out
    assert families(out) == {"auto": ["skinny", "tc", "wgmma"], "skinny": ["skinny"],
                             "tc": ["tc"], "wgmma": ["tc", "wgmma"], "wgmma2": ["wgmma2"],
                             "generic": ["generic"], "wgmma@e4m3": ["tc", "wgmma"],
                             "tc@e4m3": ["tc"], "generic@e4m3": ["generic"]}
