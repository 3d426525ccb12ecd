import os
import sys

import torch

# Without a GPU, Triton kernels run in its interpreter; this must be set before any @triton.jit.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
