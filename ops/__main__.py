"""`python -m ops`: build the CUDA deformable-attention extension (or load it from torch's cache),
showing the compiler output; exits non-zero if the build fails. tests/gpu_check.sh starts with it.
`python -m ops --cpu`: the same for the CPU kernel (ops/msda_cpu.cpp)."""
import sys
import time

from .msda import build_cpu_kernel, build_extension, cpu_library_path, error_line, find_compiler

cpu = "--cpu" in sys.argv[1:]
name = "CPU" if cpu else "CUDA"
t0 = time.time()
try:
    ext = build_cpu_kernel(verbose=True) if cpu else build_extension(verbose=True)
except Exception as e:  # the compiler output is above; one line to close
    sys.exit(f"error: building the {name} deformable-attention kernel failed: {error_line(e)}")
where = cpu_library_path(find_compiler()) if cpu else ext.__file__
print(f"ops: {name} kernel ready in {time.time() - t0:.0f} s ({where})")
