#!/usr/bin/env bash
# The project's GPU run (device tool), in two back-to-back calls on one warm machine:
#   run(command="bash scripts/gpu_check.sh kernels", carry=["build/kernels"], timeout_s=300)
#   run(command="bash scripts/gpu_check.sh fast",    carry=["build/kernels"], timeout_s=480)
# `all` runs both parts in one call. Results and the log go to $OUT (or bench/results).
#   kernels: load the kernel library built here (rebuild there if it does not load), the kernel
#            GPU tests, then bench/kernels.py
#   fast:    GPU tests of the fast backend, then bench/e2e.py (per forward and per DDIM-50
#            sample, all paths, FP8 accuracy)
# Every stage has its own time limit; a failing stage does not stop the next one.
set -u
cd "$(dirname "$0")/.."
part=${1:-all}
out=${OUT:-bench/results}
mkdir -p "$out"
log="$out/gpu_check-$part.log"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
stage() { echo; echo "=== $1 ($(date +%T))" | tee -a "$log"; }

stage "environment"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>&1 | tee -a "$log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$log"
lib=build/kernels/libterdit_kernels.so
if ! python3 -c "import ctypes, sys; ctypes.CDLL(sys.argv[1])" "$lib" >>"$log" 2>&1; then
    echo "carried $lib does not load here: building it" | tee -a "$log"
    cmake -S plugins/kernels -B /tmp/tk >/dev/null && cmake --build /tmp/tk -j16 >/dev/null || exit 1
    lib=/tmp/tk/libterdit_kernels.so
fi
export TERDIT_KERNELS_LIB=$(realpath "$lib")
per_test=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout 60")

pytest_args="-q -rs --tb=short -p no:cacheprovider -p no:logging -m gpu $per_test"
if [ "$part" = kernels ] || [ "$part" = all ]; then
    stage "GPU tests: kernels"
    timeout 90 python3 -m pytest $pytest_args tests/test_kernels_gpu.py 2>&1 | tail -40 | tee -a "$log"
    stage "bench/kernels.py"
    timeout 75 python3 bench/kernels.py --out-dir "$out" 2>&1 | tail -70 | tee -a "$log"
fi
if [ "$part" = fast ] || [ "$part" = all ]; then
    stage "GPU tests: fast backend"
    timeout 90 python3 -m pytest $pytest_args -s tests/test_accel_gpu.py 2>&1 | tail -60 | tee -a "$log"
    stage "bench/e2e.py"
    timeout 200 python3 bench/e2e.py --quick --out "$out" 2>&1 | tail -60 | tee -a "$log"
fi
stage "done"
ls -la "$out" | tee -a "$log"
