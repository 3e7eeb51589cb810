#!/usr/bin/env bash
# Every GPU measurement the open speed work needs, in one run that fits a lent device session (about 10 minutes).
# Each step has its own time limit and writes its output under $OUT as it goes, so a cut-off run still reports.
#
#   run on the device:  bash benchmarks/gpu_session.sh      (carry .whl/ and .whl_gpu/: diffusers, av, ftfy)
#
# Order: correctness first (cheap, must pass), then the issue targets (14B fp8 forward vs diffusers bf16; block
# offload of 14B fp8: peak VRAM and time ratio).
set -u
OUT=${OUT:-/tmp/x2v-gpu}
mkdir -p "$OUT"
pip install -q --no-deps .whl/*.whl .whl_gpu/*.whl 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/card.txt"

step() {  # name, seconds, command...
  local name=$1 limit=$2
  shift 2
  echo "== $name" | tee -a "$OUT/summary.txt"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "exit $? after ${SECONDS}s" | tee -a "$OUT/summary.txt"
  tail -n 12 "$OUT/$name.log" >> "$OUT/summary.txt"
}

step gpu_check 120 python benchmarks/gpu_check.py
step quant_tests 90 python -m pytest -q -x tests/test_quant_inference.py -k "linear or compiles"
step dit_step_14b 200 python benchmarks/dit_step.py --sizes 14B --iters 3 --json "$OUT/dit_step_14b.json"
step offload_14b 200 python benchmarks/offload.py --sizes 14B --weights fp8 --iters 2 --json "$OUT/offload_14b.json"
step dit_step_1_3b 90 python benchmarks/dit_step.py --sizes 1.3B --iters 3 --json "$OUT/dit_step_1_3b.json"
