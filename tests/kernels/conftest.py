import os

# Kernel tests run Triton's interpreter on CPU (no GPU in CI); it must be set before triton is imported.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
