import os
import sys
from pathlib import Path

# Test folders are not packages: shared helpers at this level (hf_fixtures) are imported by plain name.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

# Without a GPU, Triton kernels run in its interpreter. The switch must be on before anything imports triton
# (DeepSpeed and the FP8 plan do, from tests collected before tests/kernels), so it is set for the whole session.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
