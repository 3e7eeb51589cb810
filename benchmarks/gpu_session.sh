#!/usr/bin/env bash
# Every GPU measurement of the speed work, in one run (about 15 minutes of steps at most). A session's device
# time is 15 minutes including the machine's start and one command may run 10, so the first call should be the
# default (steps 1-4: about 7 minutes as last measured, 12.5 at their limits: a cut-off still reports); the rest
# are extras.
# Each step has its own time limit and writes its output under $OUT as it goes, so a cut-off run still reports.
#
#   run on the device:  bash benchmarks/gpu_session.sh [STEP...]   (default: steps 1-4; carry .whl/ and .whl_gpu/)
#
# The wheels the device image lacks (both folders are git-ignored), fetched here once for its Python 3.12:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
#   same -d .whl_gpu nvidia-cudnn-frontend==1.32.0 av ftfy wcwidth   (cudnn_fp8; mp4 writing; umT5's text cleaning)
# (pytest, for the gpu_check step, is in the image: /work/.library/device/KINDS.md lists it.)
#
# Order: the speed issue's targets first, then the correctness checks, then the extras.
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

# 1. The 14B 480P forward next to diffusers: bf16 and fp8 with cuDNN's fp8 attention, each with x2v's one-pass
#    row kernels (norms, RoPE, activation quantization) and with the same functions compiled by Inductor instead
#    (-inductor); then fp8 with SDPA and with sage_triton (figures: docs/performance.md; about 205 s).
step forward_14b 300 python3 benchmarks/dit_step.py --sizes 14B --iters 2 \
  --variants bf16 bf16-inductor fp8-cudnn_fp8 fp8-cudnn_fp8-inductor fp8 fp8-sage_triton --json "$OUT/forward_14b.json"
# 2. Correctness on the card, the GPU tests (tests/test_gpu.py, marked gpu): row kernels, 8-bit attention types
#    (and cudnn_fp8's fp8 hand-over to the fp8 o-projection), quantized loading and 8-bit linears, pipelines GPU vs
#    CPU, offload modes. Failures are listed at the end of the log (pytest's short summary).
step gpu_check 180 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
# 3. Each row kernel against its Inductor-compiled function at 14B / 480P shapes, and with 4 / 8 / 16 warps: ms and
#    memory speed.
step row_kernels 180 python3 benchmarks/row_kernel_speed.py --json "$OUT/row_kernels.json"
# 4. Where the time goes now: a profile of one bf16 and one fp8 + cudnn_fp8 forward (its log only: at most 8
#    files come back from a call).
step profile_14b 200 python3 benchmarks/dit_step.py --sizes 14B --iters 1 --profile 30 --variants bf16 fp8-cudnn_fp8
# Extras, by name only: the attention kernels alone, the VAE at 720P, offload, the 1.3B model.
[[ $WANTED == *" all "* ]] && WANTED=" done "
step attention_kernels 140 python3 benchmarks/dit_step.py --sizes 14B --iters 3 --attention-check sage_triton \
  cudnn_fp8 --variants --json "$OUT/attention_kernels.json"
step vae_720p 140 python3 benchmarks/vae_decode.py --json "$OUT/vae_720p.json"
step offload_14b 150 python3 benchmarks/offload.py --sizes 14B --weights fp8 --iters 2 --json "$OUT/offload_14b.json"
step dit_step_1_3b 60 python3 benchmarks/dit_step.py --sizes 1.3B --iters 3 --variants bf16 bf16-inductor fp8 \
  fp8-cudnn_fp8 --json "$OUT/dit_step_1_3b.json"
cat "$OUT/summary.txt"
