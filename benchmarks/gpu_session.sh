#!/usr/bin/env bash
# Every GPU measurement the open speed work needs, in one run that fits a lent device session (about 13 minutes of
# steps: split it over two calls, e.g. `attention_8bit multikernel` then `gpu_check vae_720p`).
# Each step has its own time limit and writes its output under $OUT as it goes, so a cut-off run still reports.
#
#   run on the device:  bash benchmarks/gpu_session.sh [STEP...]   (default: steps 1-4; carry .whl/ and .whl_gpu/:
#                                                                    diffusers, sageattention, av, ftfy)
#
# Order: the open targets of the speed issue first, then the correctness checks, then the extras.
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

# 1. x2v's 8-bit attention (sage_triton): each candidate tiling and precision option alone (speed, accuracy against
#    float32), then the 14B forward with the fastest tiling next to diffusers, bf16 and fp8.
step attention_8bit 300 python3 benchmarks/dit_step.py --sizes 14B --iters 2 --attention-check sage_triton sage_attn2 \
  --variants bf16 fp8 fp8-sage_triton bf16-sage_triton --json "$OUT/attention_8bit.json"
# 2. Inductor's multi-kernel mode also generates one-pass (persistent) kernels for the norms' 5,120-wide
#    reductions and keeps the faster: the candidate fix for LayerNorm kernels at a third of memory speed.
step multikernel 200 env TORCHINDUCTOR_MULTI_KERNEL=1 python3 benchmarks/dit_step.py --sizes 14B --iters 2 \
  --variants bf16 fp8-sage_triton --json "$OUT/multikernel.json"
# 3. Correctness on the card: pipelines GPU vs CPU, 8-bit linears and attention, offload modes.
step gpu_check 180 python3 benchmarks/gpu_check.py
# 4. VAE decode at 720P, 81 frames, untiled vs tiled: seconds and peak memory (does it fit a 24 GB card).
step vae_720p 150 python3 benchmarks/vae_decode.py --json "$OUT/vae_720p.json"
# Extras, by name only: offload (measured before the norm fusions), the 1.3B model, a profile of the forward.
[[ $WANTED == *" all "* ]] && WANTED=" done "
step offload_14b 150 python3 benchmarks/offload.py --sizes 14B --weights fp8 --iters 2 --json "$OUT/offload_14b.json"
step dit_step_1_3b 60 python3 benchmarks/dit_step.py --sizes 1.3B --iters 3 --variants bf16 fp8 fp8-sage_triton \
  --json "$OUT/dit_step_1_3b.json"
step profile_14b 200 python3 benchmarks/dit_step.py --sizes 14B --iters 1 --profile 30 --variants bf16 fp8-sage_triton \
  --json "$OUT/profile_14b.json"
cat "$OUT/summary.txt"
