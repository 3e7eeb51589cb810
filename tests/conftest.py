import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests import ckpt_utils directly

# Triton kernels (the sage_triton attention) run in Triton's interpreter on the CPU. Triton decides when a kernel
# (or one of its own library functions) is defined, so this is set before anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

torch.set_num_threads(2)
