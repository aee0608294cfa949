#!/usr/bin/env bash
# Everything a GPU session checks, in one command (device time is scarce; see README):
#   bash benchmarks/gpu_session.sh [gpu] [ops] [tests] [bench] [positions] [e2e]
# builds the extension for this GPU (CUDA C++ fallback included), runs the whole test suite
# (tests/op/test_op_gpu.py and the CUDA backends of every op test), then the op and end-to-end
# benchmarks (OMP_NUM_THREADS=1 for the parallel test run: 12 workers x 16 threads starved the
# CPU training fixtures into timeouts); logs and the benchmark JSON go to $OUT (default /tmp/fire-gpu).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fire-gpu}
mkdir -p "$OUT"
steps=${*:-gpu tests bench e2e}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/gpu.txt"
cat "$OUT/gpu.txt"
cap=$(python3 -c "import torch; p=torch.cuda.get_device_capability(); print(f'{p[0]}.{p[1]}')")
start=$(date +%s)
# an in-place build (no pip: the GPU machine has no network for build requirements)
TORCH_CUDA_ARCH_LIST=$cap MAX_JOBS=16 python3 setup.py -q build_ext --inplace \
    > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
mv python/_C*.so python/fire_repair/ 2>/dev/null || true
export PYTHONPATH=$PWD/python:$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import fire_repair._ext as e, torch; print('extension', e.AVAILABLE, e.LOAD_ERROR, *(torch._C._dispatch_has_kernel_for_dispatch_key(op, 'CUDA') for op in ('fire::_repair_native', 'fire::repair')))"
echo "build: $(( $(date +%s) - start )) s"
name=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-').lower())")
for step in $steps; do
  case $step in
    gpu)   timeout 200 python3 -m pytest tests/op/test_op_gpu.py -v -p no:randomly -rfEs --timeout=120 \
               > "$OUT/test_gpu.log" 2>&1
           echo "test_gpu rc=$?"; tail -15 "$OUT/test_gpu.log" ;;
    ops)   OMP_NUM_THREADS=1 timeout 300 python3 -m pytest tests/op tests/repair/test_hardening_round1.py --deselect tests/op/test_op_gpu.py -q -n 12 -p no:randomly -rfE --timeout=90 \
               > "$OUT/ops.log" 2>&1
           echo "ops rc=$?"; grep -E "FAILED|ERROR|Timeout|passed|failed" "$OUT/ops.log" | tail -25 ;;
    tests) OMP_NUM_THREADS=1 timeout 330 python3 -m pytest tests -v -n 12 -p no:randomly -rfE --timeout=90 --deselect tests/op/test_op_gpu.py \
               > "$OUT/tests.log" 2>&1
           echo "tests rc=$?"; grep -E "FAILED|ERROR|Timeout|passed|failed" "$OUT/tests.log" | tail -25 ;;
    bench) FIRE_BENCH_BATCHES=${FIRE_BENCH_BATCHES:-1,256,1024} timeout 420 python3 -m pytest benchmarks/test_bench_op.py -q -p no:randomly \
               --benchmark-min-rounds=5 --benchmark-max-time=0.5 --benchmark-json="$OUT/$name-op.json" \
               > "$OUT/bench.log" 2>&1
           echo "bench rc=$?"; tail -5 "$OUT/bench.log"
           python3 benchmarks/summarize.py "$OUT/$name-op.json" > "$OUT/$name-op.md" ;;  # strips raw timings
    positions) FIRE_BENCH_BATCHES=${FIRE_BENCH_BATCHES:-1,256} timeout 420 python3 -m pytest benchmarks/test_bench_positions.py -q -p no:randomly \
               --benchmark-min-rounds=5 --benchmark-max-time=0.5 --benchmark-json="$OUT/$name-positions.json" \
               > "$OUT/positions.log" 2>&1
           echo "positions rc=$?"; tail -5 "$OUT/positions.log"
           python3 benchmarks/summarize.py "$OUT/$name-positions.json" > "$OUT/$name-positions.md" ;;
    e2e)   timeout 200 python3 -m pytest benchmarks/test_bench_e2e.py -q -p no:randomly \
               --benchmark-min-rounds=5 --benchmark-max-time=0.5 --benchmark-json="$OUT/$name-e2e.json" \
               > "$OUT/e2e.log" 2>&1
           echo "e2e rc=$?"; tail -5 "$OUT/e2e.log"
           python3 benchmarks/summarize.py "$OUT/$name-e2e.json" > "$OUT/$name-e2e.md" ;;
  esac
done
