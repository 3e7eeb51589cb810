#!/usr/bin/env bash
# Every GPU measurement the open speed work needs, in one run (about 14 minutes of steps; a session's device time
# is 15 minutes with the machine's start, so the first call should be `attention_8bit vae_720p` (7.5 min), then
# `gpu_check` and `multikernel` if time is left).
# Each step has its own time limit and writes its output under $OUT as it goes, so a cut-off run still reports.
#
#   run on the device:  bash benchmarks/gpu_session.sh [STEP...]   (default: steps 1-4; carry .whl/ and .whl_gpu/)
#
# The wheels the device image lacks (both folders are git-ignored), fetched here once for its Python 3.12:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
#   same -d .whl_gpu nvidia-cudnn-frontend==1.32.0 av ftfy wcwidth   (cudnn_fp8; mp4 writing; umT5's text cleaning)
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
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cudnn', torch.backends.cudnn.version(),
    'triton', triton.__version__)"; } > "$OUT/card.txt"
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

# 1. x2v's 8-bit attention types alone (sage_triton with each candidate tiling and precision option, cudnn_fp8:
#    speed, accuracy against float32), then the 14B forward next to diffusers: bf16, fp8, fp8 + each 8-bit attention.
step attention_8bit 300 python3 benchmarks/dit_step.py --sizes 14B --iters 2 --attention-check sage_triton cudnn_fp8 \
  --variants bf16 fp8 fp8-sage_triton fp8-cudnn_fp8 --json "$OUT/attention_8bit.json"
# 2. VAE decode at 720P, 81 frames, untiled vs tiled: seconds and peak memory (does it fit a 24 GB card).
step vae_720p 150 python3 benchmarks/vae_decode.py --json "$OUT/vae_720p.json"
# 3. Correctness on the card: 8-bit attention types, pipelines GPU vs CPU, 8-bit linears, offload modes.
step gpu_check 180 python3 benchmarks/gpu_check.py
# 4. Inductor's multi-kernel mode also generates one-pass (persistent) kernels for the norms' 5,120-wide
#    reductions and keeps the faster: the candidate fix for LayerNorm kernels at a third of memory speed.
step multikernel 200 env TORCHINDUCTOR_MULTI_KERNEL=1 python3 benchmarks/dit_step.py --sizes 14B --iters 2 \
  --variants bf16 fp8-cudnn_fp8 --json "$OUT/multikernel.json"
# Extras, by name only: offload (measured before the norm fusions), the 1.3B model, a profile of the forward.
[[ $WANTED == *" all "* ]] && WANTED=" done "
step offload_14b 150 python3 benchmarks/offload.py --sizes 14B --weights fp8 --iters 2 --json "$OUT/offload_14b.json"
step dit_step_1_3b 60 python3 benchmarks/dit_step.py --sizes 1.3B --iters 3 --variants bf16 fp8 fp8-cudnn_fp8 \
  --json "$OUT/dit_step_1_3b.json"
step profile_14b 200 python3 benchmarks/dit_step.py --sizes 14B --iters 1 --profile 30 --variants bf16 fp8-cudnn_fp8 \
  --json "$OUT/profile_14b.json"
cat "$OUT/summary.txt"
