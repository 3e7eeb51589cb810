import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests import ckpt_utils directly

import torch

torch.set_num_threads(2)
