"""`python -m ops`: build the CUDA deformable-attention extension (or load it from torch's cache),
showing the compiler output; exits non-zero if the build fails. tests/gpu_check.sh starts with it."""
import sys
import time

from .msda import build_extension

t0 = time.time()
try:
    ext = build_extension(verbose=True)
except Exception as e:  # the compiler output is above; one line to close
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    sys.exit(f"error: building the CUDA deformable-attention kernel failed: {first}")
print(f"ops: CUDA kernel ready in {time.time() - t0:.0f} s ({ext.__file__})")
