#!/usr/bin/env bash
# Every GPU measurement the open speed work needs, in one run that fits a lent device session (about 9 minutes).
# Each step has its own time limit and writes its output under $OUT as it goes, so a cut-off run still reports.
#
#   run on the device:  bash benchmarks/gpu_session.sh [STEP...]   (default: every step; carry .whl/ and .whl_gpu/:
#                                                                    diffusers, sageattention, av, ftfy)
#
# Order: the targets first (14B forward vs diffusers: bf16 fused / unfused, fp8, fp8 + 8-bit attention;
# 14B fp8 block offload: peak memory and time ratio), then the correctness checks, then the extras.
set -u
OUT=${OUT:-/tmp/x2v-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl .whl_gpu/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$OUT/card.txt"
cat "$OUT/card.txt"

WANTED=" ${*:-all} "
step() {  # name, seconds, command...
  local name=$1 limit=$2
  shift 2
  [[ $WANTED == *" all "* || $WANTED == *" $name "* ]] || return 0
  echo "== $name" | tee -a "$OUT/summary.txt"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "exit $? after ${SECONDS}s" | tee -a "$OUT/summary.txt"
  grep -v "^USDT" "$OUT/$name.log" | tail -n 14 >> "$OUT/summary.txt"
}

step dit_step_14b 240 python3 benchmarks/dit_step.py --sizes 14B --iters 2 --profile 25 \
  --variants bf16 bf16-unfused fp8 fp8-sage_attn2 --attention-check sage_attn2 --json "$OUT/dit_step_14b.json"
step dit_step_14b_profile 200 python3 benchmarks/dit_step.py --sizes 14B --iters 2 --profile 30 \
  --variants bf16 fp8 int8 --json "$OUT/dit_step_14b_profile.json"
# Inductor's multi-kernel mode also generates one-pass (persistent) kernels for the norms' 5,120-wide reductions
# and keeps the faster: the candidate fix for the LayerNorm kernels that run at a third of memory speed.
step dit_step_14b_multikernel 200 env TORCHINDUCTOR_MULTI_KERNEL=1 python3 benchmarks/dit_step.py --sizes 14B \
  --iters 2 --profile 30 --variants bf16 fp8 --json "$OUT/dit_step_14b_multikernel.json"
step offload_14b 150 python3 benchmarks/offload.py --sizes 14B --weights fp8 --iters 2 --json "$OUT/offload_14b.json"
step gpu_check 90 python3 benchmarks/gpu_check.py
step dit_step_14b_compiled 120 python3 benchmarks/dit_step.py --sizes 14B --iters 2 --variants bf16-compiled \
  --json "$OUT/dit_step_14b_compiled.json"
step dit_step_1_3b 60 python3 benchmarks/dit_step.py --sizes 1.3B --iters 3 --variants bf16 fp8 \
  --json "$OUT/dit_step_1_3b.json"
cat "$OUT/summary.txt"
