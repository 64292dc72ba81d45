#!/usr/bin/env bash
# The project's GPU run: ONE device call, tests + both benches inside a total time budget.
#
# Here (no GPU needed; nvcc 13, about 3 minutes on 2 cores):
#   .venv/bin/python -c "from terdit.kernels import build; build.build_library('build/kernels')"
# Then one call of the device tool:
#   run(command="bash scripts/gpu_check.sh", carry=["build/kernels"], timeout_s=540)
#
# Stages (a failing stage does not stop the next one; each gets min(its own limit, what is left
# of TERDIT_GPU_BUDGET_S, default 470 s, minus a reserve for the later stages)):
#   1. environment, and the carried libterdit_kernels.so loads (else it is rebuilt there, 16 cores);
#      a smoke test of every kernel path on one shape (90 s at most)
#   2. kernel GPU tests        tests/test_kernels_gpu.py, tests/test_kernels_w2a8_gpu.py (every path vs the reference)
#   3. fast-backend GPU tests  tests/test_accel_gpu.py (weight-only and W1.58A8 models)
#   4. bench/kernels.py        per layer: ours bf16, ours W1.58A8, cuBLAS bf16, cuBLASLt FP8, wgmma2
#   5. bench/e2e.py            ours, ours-w2a8, ours-fp8-e4m3w, bf16-compiled, bf16-eager, official;
#                              600M and 4.2B, 1 and 8 images + CFG; W1.58A8 accuracy rows; targets
# Results go to $OUT (at most 8 files come back: this log, kernels .json/.md, e2e .json/.md/.png);
# without $OUT (a local run) to bench/results. Copy them into bench/results and commit them.
set -u
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
mkdir -p "$out"
log="$out/gpu_check.log"
budget=${TERDIT_GPU_BUDGET_S:-470}
start=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
stage() { echo; echo "=== $1 ($(date +%T), $(( $(date +%s) - start )) s of $budget)" | tee -a "$log"; }
# limit LIMIT RESERVE: seconds for the next stage, leaving RESERVE for the ones after it.
limit() {
    local left=$(( budget - ($(date +%s) - start) - $2 ))
    [ "$left" -lt "$1" ] && echo $(( left > 10 ? left : 10 )) || echo "$1"
}

stage "environment"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>&1 | tee -a "$log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())" 2>&1 | tee -a "$log"
lib=build/kernels/libterdit_kernels.so
if ! python3 -c "import ctypes, sys; ctypes.CDLL(sys.argv[1])" "$lib" >>"$log" 2>&1; then
    echo "carried $lib does not load here: building it" | tee -a "$log"
    python3 -c "from terdit.kernels import build; build.build_library('/tmp/tk', jobs=16)" 2>&1 | tail -20 | tee -a "$log"
    lib=/tmp/tk/libterdit_kernels.so
fi
export TERDIT_KERNELS_LIB=$(realpath "$lib")
pytest_args="-q -rs --tb=short -p no:cacheprovider -p no:logging -m gpu --timeout 120"

stage "smoke: every path once (a hang or a wrong result shows here in seconds)"
timeout 90 python3 - <<'PY' 2>&1 | tee -a "$log"
import torch
from terdit.kernels import cuda as kernels
from terdit.formats import pack_k16
kernels.load()
g = torch.Generator(device="cuda").manual_seed(0)
for path, w2a8, m, n, k in [("skinny", False, 7, 256, 512), ("tc", False, 300, 256, 512),
                            ("wgmma", False, 300, 256, 512), ("wgmma", False, 1000, 384, 1024),
                            ("wgmma2", False, 300, 256, 512), ("generic", False, 33, 96, 80),
                            ("wgmma", True, 300, 256, 512), ("tc", True, 300, 256, 512),
                            ("generic", True, 33, 96, 80)]:
    t = torch.randint(-1, 2, (n, k), generator=g, device="cuda")
    w, scale = pack_k16(t), torch.rand(n, generator=g, device="cuda") + 0.5
    x = torch.randn(m, k, generator=g, device="cuda").to(torch.bfloat16)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    try:
        with kernels.force_path(path):
            if w2a8:
                xq, xs = torch.ops.terdit.quantize_rows_e4m3(x)
                kernels.matmul_e4m3_into(out, xq, xs, w, scale)
                ref = (xq.double() @ t.double().t()) * xs.double()[:, None] * scale.double()
            else:
                kernels.matmul_into(out, x, w, scale)
                ref = (x.double() @ t.double().t()) * scale.double()
        torch.cuda.synchronize()
        err = float((out.double() - ref).norm() / ref.norm())
        print(f"smoke {path:8s} {'W1.58A8' if w2a8 else 'bf16':8s} M={m} N={n} K={k}: rel err {err:.1e} "
              f"{'ok' if err < 1e-2 else 'WRONG'}", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"smoke {path} {'W1.58A8' if w2a8 else 'bf16'}: FAILED {type(e).__name__}: {e}", flush=True)
PY

stage "GPU tests: kernels"
timeout "$(limit 150 270)" python3 -m pytest $pytest_args tests/test_kernels_gpu.py tests/test_kernels_w2a8_gpu.py 2>&1 | tail -45 | tee -a "$log"
stage "GPU tests: fast backend"
timeout "$(limit 100 240)" python3 -m pytest $pytest_args -s tests/test_accel_gpu.py 2>&1 | tail -30 | tee -a "$log"
stage "bench/kernels.py"
timeout "$(limit 90 170)" python3 bench/kernels.py --out-dir "$out" > "$out/.kernels.txt" 2>&1
tail -80 "$out/.kernels.txt" | tee -a "$log"
rm -f "$out/.kernels.txt"
stage "bench/e2e.py"
timeout "$(limit 200 0)" python3 bench/e2e.py --quick --out "$out" 2>&1 | grep -v "^\s*$" | tail -75 | tee -a "$log"
stage "done"
ls -la "$out" | tee -a "$log"
