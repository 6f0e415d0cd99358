#!/usr/bin/env bash
# On a CUDA machine: correctness of every attention path on CUDA, then the side-by-side benchmark at about 1B
# parameters and 4096 tokens. Fits in 8 minutes on one H100/H200-class GPU; results land in benchmarks/results/gpu/.
#   bash benchmarks/gpu_check.sh
# The same steps on the CPU at a tiny size, which checks the script itself (tests/test_benchmarks.py runs this):
#   DEVICE=cpu PRESET=tiny OUT=/tmp/gpu-check bash benchmarks/gpu_check.sh
# PYTHON names the interpreter (default: python on PATH), e.g. PYTHON=.venv/bin/python; CHECKS_SECONDS and
# BENCH_SECONDS bound the two steps (default 150 and 300, the GPU machine's budget); REPEATS the benchmark's timed
# repeats (default 3).
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
device=${DEVICE:-cuda}
preset=${PRESET:-gpu-1b}
out=${OUT:-benchmarks/results/gpu}
mkdir -p "$out"
if [ "$device" = cuda ]; then
    "$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" ||
        exit 1
fi
timeout "${CHECKS_SECONDS:-150}" "$python" benchmarks/cuda_checks.py --device "$device" --out "$out/cuda_checks.json" 2>&1 |
    tee "$out/cuda_checks.log"
checks=${PIPESTATUS[0]}
# --skip-train-peak: a fresh process per model for peak training memory does not fit this script's time budget
timeout "${BENCH_SECONDS:-300}" "$python" benchmarks/perf.py --preset "$preset" --device "$device" --repeats "${REPEATS:-3}" --skip-train-peak \
    --out "$out/perf" 2>&1 |
    tee "$out/perf.log"
perf=${PIPESTATUS[0]}
echo "cuda checks exit $checks, benchmark exit $perf; results in $out"
exit $(( checks != 0 || perf != 0 ))
