"""The real TernaryMatMul kernel sources run on the CPU (tests/kernel_emu): every kernel family
(skinny, skinny2, tc, wgmma, wgmma2, generic) against the fp64 reference, with poisoned outputs, fenced
buffers, misaligned weights, K / N / M tails and SwiGLU. This checks the kernels' index math and
data flow under the emulator's model of mma.sync / ldmatrix / cp.async / wgmma (asynchronous,
retired by wgmma.wait_group), not the GPU itself (that is tests/test_kernels_gpu.py)."""
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


def drive(lib, *args, sms):
    env = dict(os.environ, TERDIT_EMU_SMS=str(sms), TERDIT_EMU_CC_MAJOR="9")
    proc = subprocess.run([sys.executable, str(EMU_DIR / "drive.py"), str(lib), *args],
                          capture_output=True, text=True, env=env, cwd=emulator.REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def test_emulated_kernels_bf16(emulated_lib):
    # 2 "SMs": the quick shapes then reach every skinny (MT, R) instantiation; wgmma2 cycles its
    # three tile configurations over the cases.
    out = drive(emulated_lib, "--quick", "--paths", "skinny,skinny2,tc,wgmma,wgmma2@cycle,generic",
                sms=2)
    assert " 0 failed" in out


def test_emulated_kernels_fp16_fp32(emulated_lib):
    # fp16 decoders (word pairs: skinny; adjacent pairs: tc and wgmma; fragment pairs: wgmma2)
    # and the float32 path.
    out = drive(emulated_lib, "--quick", "--paths", "skinny,tc,wgmma2@cycle", "--dtypes", "fp16",
                sms=2)
    assert " 0 failed" in out
    out = drive(emulated_lib, "--quick", "--paths", "auto", "--dtypes", "fp32", sms=2)
    assert " 0 failed" in out


@pytest.mark.slow
def test_emulated_kernels_full(emulated_lib):
    # Every family incl. auto and every wgmma2 tile configuration, bf16 and fp16, all shapes
    # and M values (several minutes).
    out = drive(emulated_lib, sms=1)
    assert " 0 failed" in out
