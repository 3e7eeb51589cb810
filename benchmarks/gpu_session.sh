#!/usr/bin/env bash
# Every GPU measurement the open speed work needs, in one run (about 16 minutes of steps at most). A session's device
# time is 15 minutes including the machine's start and one command may run 10, so the first call should be
# `attention_kernels forward_14b vae_720p` (at most 9.7 min), then `gpu_check` if time is left, `multikernel` after.
# Each step has its own time limit and writes its output under $OUT as it goes, so a cut-off run still reports.
#
#   run on the device:  bash benchmarks/gpu_session.sh [STEP...]   (default: steps 1-5; carry .whl/ and .whl_gpu/)
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

# 1. x2v's 8-bit attention types alone at the 14B self- and cross-attention shapes, next to cuDNN's bf16 attention:
#    sage_triton with each candidate tiling and precision option, cudnn_fp8; speed and accuracy against float32.
step attention_kernels 140 python3 benchmarks/dit_step.py --sizes 14B --iters 3 --attention-check sage_triton \
  cudnn_fp8 --variants --json "$OUT/attention_kernels.json"
# 2. The 14B 480P forward next to diffusers: bf16, fp8, and fp8 with each 8-bit self-attention (sage_triton with its
#    default tiling; step 1 says whether another is faster). bf16-multikernel: the fused norms compiled in
#    Inductor's multi-kernel mode, which also generates one-pass (persistent) kernels for their 5,120-wide rows and
#    keeps the faster: the candidate fix for LayerNorm kernels at a third of memory speed.
step forward_14b 300 python3 benchmarks/dit_step.py --sizes 14B --iters 2 \
  --variants bf16 bf16-multikernel fp8 fp8-sage_triton fp8-cudnn_fp8 --json "$OUT/forward_14b.json"
# 3. VAE decode at 720P, 81 frames, in float32 as the pipeline runs it, untiled vs tiled: seconds and peak
#    memory (does it fit a 24 GB card). Written after each VAE: a cut-off keeps Wan2.1's figures.
step vae_720p 140 python3 benchmarks/vae_decode.py --json "$OUT/vae_720p.json"
# 4. Correctness on the card: 8-bit attention types, pipelines GPU vs CPU, 8-bit linears, offload modes.
step gpu_check 180 python3 benchmarks/gpu_check.py
# 5. Multi-kernel mode with 8-bit linears and attention, whose per-token activation quantization is a 5,120-wide
#    reduction too.
step multikernel 200 python3 benchmarks/dit_step.py --sizes 14B --iters 2 \
  --variants fp8-sage_triton-multikernel fp8-cudnn_fp8-multikernel --json "$OUT/multikernel.json"
# Extras, by name only: offload (measured before the norm fusions), the 1.3B model, a profile of the forward.
[[ $WANTED == *" all "* ]] && WANTED=" done "
step offload_14b 150 python3 benchmarks/offload.py --sizes 14B --weights fp8 --iters 2 --json "$OUT/offload_14b.json"
step dit_step_1_3b 60 python3 benchmarks/dit_step.py --sizes 1.3B --iters 3 --variants bf16 fp8 fp8-cudnn_fp8 \
  --json "$OUT/dit_step_1_3b.json"
step profile_14b 200 python3 benchmarks/dit_step.py --sizes 14B --iters 1 --profile 30 --variants bf16 fp8-cudnn_fp8 \
  --json "$OUT/profile_14b.json"
cat "$OUT/summary.txt"
