"""Multi-scale deformable attention (MSDA): the sampling-and-weighting core of Deformable DETR
(Zhu et al., ICLR 2021, Eq. 3) that BEVFormer's temporal self-attention, spatial cross-attention and
decoder all run on, with the semantics of mmcv's MultiScaleDeformableAttnFunction:

    out[b, q, m, :] = sum_l sum_p A[b, q, m, l, p] * bilinear(V_l[b, :, :, m, :], x_l, y_l),
    x_l = loc_x * W_l - 0.5, y_l = loc_y * H_l - 0.5   (pixel i's centre at loc (i + 0.5) / W_l)

with bilinear corners outside the map reading zero, and the output head-major [B, Q, M*D].

Three implementations with one signature and the same numbers (up to float rounding):
- `ms_deform_attn_pytorch`: plain PyTorch (F.grid_sample per level), autograd does the backward;
  runs on any device; the reference the two kernels are tested against.
- the CPU kernel (msda_cpu.cpp): forward and backward in one pass over the sampling points, the heads
  split over threads; plain C++ built by the system's C++ compiler (`c++`, or $CXX) the first time CPU
  tensors reach `ms_deform_attn` (about a second), cached on disk (FD_OPS_CACHE, default
  ~/.cache/focaldistiller) and loaded with ctypes. Its forward + backward is 2-4x faster than the
  fallback's at the default model's sizes, the training step ~20 % (docs/benchmarks.md).
- the CUDA kernel (msda_kernel.cu + msda_binding.cpp), compiled with torch.utils.cpp_extension.load
  the first time CUDA tensors reach `ms_deform_attn`, cached on disk by torch and here in memory.
If a build fails, one warning line and the fallback. FD_MSDA_FALLBACK=1 forces the fallback.
"""
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

log = logging.getLogger("ops")

FALLBACK_ENV = "FD_MSDA_FALLBACK"  # set to 1 to never build or use the CPU and CUDA kernels
CACHE_ENV = "FD_OPS_CACHE"         # where the CPU kernel's shared library is kept
_HERE = os.path.dirname(os.path.abspath(__file__))
_SOURCES = [os.path.join(_HERE, "msda_binding.cpp"), os.path.join(_HERE, "msda_kernel.cu")]
_CPU_SOURCE = os.path.join(_HERE, "msda_cpu.cpp")
_CPU_FLAGS = ["-O3", "-fopenmp-simd", "-std=c++14", "-shared", "-fPIC"]


# ------------------------------------------------------------------------------------------------
# PyTorch fallback
# ------------------------------------------------------------------------------------------------
def _level_sizes(spatial_shapes):
    """spatial_shapes [L, 2] (H, W) as a list of Python (H, W) pairs."""
    if torch.is_tensor(spatial_shapes):
        spatial_shapes = spatial_shapes.tolist()  # one small device->host copy on CUDA
    return [(int(h), int(w)) for h, w in spatial_shapes]


def ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations,
                           attention_weights):
    """Multi-scale deformable attention in plain PyTorch (differentiable through autograd).

    value [B, S, M, D] (levels concatenated along S, each flattened row-major), spatial_shapes
    [L, 2] int64 rows (H, W), level_start_index [L] (the exclusive cumulative sum of H*W; the
    levels are taken by splitting S, so it is not read here), sampling_locations [B, Q, M, L, P, 2]
    normalised (x, y) with 0 and 1 the outer edges of the map, attention_weights [B, Q, M, L, P].
    Returns [B, Q, M*D] (head-major). Samples outside the map read zeros.

    Unlike the usual formulation (mmcv's multi_scale_deformable_attn_pytorch: sample every level,
    stack, weight, sum) the weighted sum is accumulated level by level: no stacked [.., L*P] copy
    is made, so it is faster and needs less memory (`python -m ops.bench`).
    """
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    sizes = _level_sizes(spatial_shapes)
    if sum(h * w for h, w in sizes) != S:
        raise ValueError(f"ms_deform_attn: value has S={S} positions but spatial_shapes "
                         f"{sizes} cover {sum(h * w for h, w in sizes)}")
    dtype = value.dtype
    # grid_sample's coordinates: -1 and 1 are the outer edges (align_corners=False), as ours 0 and 1.
    # Level-major, so that each level's slice is contiguous: the weighting below then runs over one
    # contiguous Q*P block per (b, m) instead of rows of P (several times faster on the CPU).
    grid = (2 * sampling_locations.to(dtype) - 1).permute(0, 2, 3, 1, 4, 5).reshape(B * M, L, Q, P, 2)
    weights = attention_weights.to(dtype).permute(0, 2, 3, 1, 4).reshape(B * M, L, Q, P)
    out = None
    for l, v in enumerate(value.split([h * w for h, w in sizes], dim=1)):     # v [B, H*W, M, D]
        h, w = sizes[l]
        v = v.flatten(2).transpose(1, 2).reshape(B * M, D, h, w)               # [B*M, D, H, W]
        sampled = F.grid_sample(v, grid[:, l], mode="bilinear", padding_mode="zeros",
                                align_corners=False)                           # [B*M, D, Q, P]
        level_out = (sampled * weights[:, None, l]).sum(-1)                     # [B*M, D, Q]
        out = level_out if out is None else out + level_out
    return out.view(B, M * D, Q).transpose(1, 2).contiguous()                   # [B, Q, M*D]


# ------------------------------------------------------------------------------------------------
# CPU kernel: build with the system's C++ compiler, load with ctypes, split the heads over threads
# ------------------------------------------------------------------------------------------------
_cpu_lib = None        # the loaded shared library, once built
_cpu_tried = False     # build attempted (success or not): never retried in this process
_pool = None           # worker threads for the heads beyond the calling thread's share
_pool_size = 0


def fallback_forced():
    """True when the environment variable FD_MSDA_FALLBACK asks for the PyTorch fallback."""
    return os.environ.get(FALLBACK_ENV, "").strip() not in ("", "0")


def error_line(e):
    """The first line of an exception's message (or its type's name): a build error in one line."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _build_or_warn(build, kind, command):
    """build(), or None after one warning line: any failure (no compiler, a compiler error, a file
    that does not load) means the fallback. `kind` names the kernel, `command` shows its build."""
    try:
        return build()
    except Exception as e:
        log.warning("ops: could not build the %s deformable-attention kernel (%s); using the PyTorch "
                    "fallback (`%s` shows the compiler output)", kind, error_line(e)[:200], command)
        return None


def find_compiler():
    found = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") \
        or shutil.which("clang++")
    if not found:
        raise RuntimeError("no C++ compiler on the PATH (c++, g++ or clang++; or set CXX)")
    return found


def cpu_library_path(compiler):
    """Where the CPU kernel built by `compiler` is cached: one file per source, flags, compiler and
    machine type, so that an edited source or another compiler builds anew."""
    key = hashlib.sha1()
    with open(_CPU_SOURCE, "rb") as f:
        key.update(f.read())
    key.update(" ".join([compiler] + _CPU_FLAGS + [platform.machine()]).encode())
    cache = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "focaldistiller")
    return os.path.join(cache, f"msda_cpu-{key.hexdigest()[:16]}.so")


def build_cpu_kernel(verbose=False):
    """Compile msda_cpu.cpp (or find it in the cache) and load it; raises if the build fails. The
    library is written under a temporary name and renamed, so that processes building at the same
    time never load half a file."""
    compiler = find_compiler()
    path = cpu_library_path(compiler)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
        os.close(fd)
        cmd = [compiler, *_CPU_FLAGS, _CPU_SOURCE, "-o", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True)
            if verbose:
                print(" ".join(cmd), done.stdout, done.stderr, sep="\n")
            if done.returncode != 0:
                lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
                raise RuntimeError(f"{os.path.basename(compiler)} failed: "
                                   f"{lines[0] if lines else 'exit status ' + str(done.returncode)}")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    lib = ctypes.CDLL(path)
    ptr, size = ctypes.c_void_p, ctypes.c_int64
    for dtype in ("f32", "f64"):
        getattr(lib, f"msda_forward_{dtype}").argtypes = [ptr] * 6 + [size] * 9
        getattr(lib, f"msda_backward_{dtype}").argtypes = [ptr] * 9 + [size] * 9
    return lib


def _cpu_kernel():
    """The loaded CPU kernel, or None (fallback forced, or the build failed: one warning)."""
    global _cpu_lib, _cpu_tried
    if fallback_forced():
        return None
    if not _cpu_tried:
        _cpu_tried = True
        _cpu_lib = _build_or_warn(build_cpu_kernel, "CPU", "python -m ops --cpu")
    return _cpu_lib


def _run_over_heads(fn, args, heads):
    """fn(*args, m_begin, m_end) on torch.get_num_threads() shares of the heads at once: the calling
    thread takes the first share, pool threads the others (ctypes lets go of the GIL in the call)."""
    global _pool, _pool_size
    shares = max(1, min(torch.get_num_threads(), heads))
    bounds = [i * heads // shares for i in range(shares + 1)]
    if shares - 1 > _pool_size:
        _pool, _pool_size = ThreadPoolExecutor(shares - 1, thread_name_prefix="msda"), shares - 1
    others = [_pool.submit(fn, *args, bounds[i], bounds[i + 1]) for i in range(1, shares)]
    fn(*args, bounds[0], bounds[1])
    for job in others:
        job.result()


def _cpu_entry(direction, dtype):
    """The CPU kernel's C function for 'forward' or 'backward' in float32 or float64."""
    return getattr(_cpu_lib, f"msda_{direction}_{'f64' if dtype == torch.float64 else 'f32'}")


class _MSDeformAttnCPU(torch.autograd.Function):
    """The CPU kernel as an autograd Function: inputs contiguous, float32 or float64, on the CPU;
    spatial_shapes and level_start_index int64."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations,
                attention_weights):
        B, S, M, D = value.shape
        _, Q, _, L, P, _ = sampling_locations.shape
        out = value.new_empty(B, Q, M * D)                                             # [B, Q, M*D]
        fn = _cpu_entry("forward", value.dtype)
        tensors = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights, out)
        _run_over_heads(fn, [t.data_ptr() for t in tensors] + [B, S, M, D, L, Q, P], M)
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        value, spatial_shapes, level_start_index, loc, attn = ctx.saved_tensors
        B, S, M, D = value.shape
        _, Q, _, L, P, _ = loc.shape
        grad_out = grad_out.contiguous()
        grad_value, grad_loc, grad_attn = torch.zeros_like(value), torch.empty_like(loc), \
            torch.empty_like(attn)
        fn = _cpu_entry("backward", value.dtype)
        tensors = (value, spatial_shapes, level_start_index, loc, attn, grad_out, grad_value,
                   grad_loc, grad_attn)
        _run_over_heads(fn, [t.data_ptr() for t in tensors] + [B, S, M, D, L, Q, P], M)
        return grad_value, None, None, grad_loc, grad_attn


# ------------------------------------------------------------------------------------------------
# CUDA kernel: lazy build, autograd wrapper, dispatch
# ------------------------------------------------------------------------------------------------
_ext = None          # the compiled module, once built
_ext_tried = False   # build attempted (success or not): never retried in this process
_logged = set()      # which paths have been announced in the log


def build_extension(verbose=False):
    """Compile (or load from torch's cache) the CUDA extension; raises if the build fails."""
    from torch.utils.cpp_extension import load
    return load(name="fd_msda", sources=_SOURCES, extra_cuda_cflags=["-O3"], verbose=verbose)


def _extension():
    """The compiled CUDA extension, or None (fallback forced, or the build failed: one warning)."""
    global _ext, _ext_tried
    if fallback_forced():
        return None
    if not _ext_tried:
        _ext_tried = True
        _ext = _build_or_warn(build_extension, "CUDA", "python -m ops")
    return _ext


def _log_path_once(path):
    if path not in _logged:
        _logged.add(path)
        log.info("ops: multi-scale deformable attention runs on %s", path)


class _MSDeformAttnCUDA(torch.autograd.Function):
    """The compiled kernel as an autograd Function: inputs contiguous, float32 or float64, on one
    CUDA device. The device is set by the caller (torch.cuda.device) and the current stream is
    handed to the kernel as an integer."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations,
                attention_weights):
        stream = torch.cuda.current_stream(value.device).cuda_stream
        out = _ext.forward(value, spatial_shapes, level_start_index, sampling_locations,
                           attention_weights, stream)                              # [B, Q, M*D]
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = \
            ctx.saved_tensors
        with torch.cuda.device(value.device):
            stream = torch.cuda.current_stream(value.device).cuda_stream
            grad_value, grad_loc, grad_attn = _ext.backward(
                value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                grad_out.contiguous(), stream)
        return grad_value, None, None, grad_loc, grad_attn


def _check_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Shape checks that need no device->host copy (the kernel path stays asynchronous)."""
    if value.dim() != 4 or sampling_locations.dim() != 6 or attention_weights.dim() != 5:
        raise ValueError("ms_deform_attn: expected value [B, S, M, D], sampling_locations "
                         "[B, Q, M, L, P, 2], attention_weights [B, Q, M, L, P]; got "
                         f"{tuple(value.shape)}, {tuple(sampling_locations.shape)}, "
                         f"{tuple(attention_weights.shape)}")
    B, S, M, D = value.shape
    Bq, Q, Mq, L, P, two = sampling_locations.shape
    if (Bq, Mq, two) != (B, M, 2) or tuple(attention_weights.shape) != (B, Q, M, L, P):
        raise ValueError("ms_deform_attn: inconsistent shapes: value "
                         f"{tuple(value.shape)}, sampling_locations "
                         f"{tuple(sampling_locations.shape)}, attention_weights "
                         f"{tuple(attention_weights.shape)}")
    if tuple(spatial_shapes.shape) != (L, 2) or tuple(level_start_index.shape) != (L,):
        raise ValueError(f"ms_deform_attn: spatial_shapes must be [L={L}, 2] and "
                         f"level_start_index [L={L}]; got {tuple(spatial_shapes.shape)} and "
                         f"{tuple(level_start_index.shape)}")


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                   attention_weights):
    """Multi-scale deformable attention; same arguments and result as `ms_deform_attn_pytorch`.

    CUDA tensors use the CUDA kernel and CPU tensors the CPU kernel (each built on first use) unless
    FD_MSDA_FALLBACK=1 or the build failed; other devices use the PyTorch fallback. The result has
    value's dtype; it is computed in float64 if any input is float64, else in float32 (half/bfloat16
    inputs under autocast are computed in float32 and the result cast back, as BEVFormer does).
    """
    _check_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    out_dtype = value.dtype
    floats = (value.dtype, sampling_locations.dtype, attention_weights.dtype)
    compute = torch.float64 if torch.float64 in floats else torch.float32
    value, sampling_locations, attention_weights = (
        t.to(compute) for t in (value, sampling_locations, attention_weights))
    device = value.device

    if device.type == "cpu" and _cpu_kernel() is not None:
        _log_path_once("the CPU kernel")
        out = _MSDeformAttnCPU.apply(
            value.contiguous(), spatial_shapes.to("cpu", torch.long).contiguous(),
            level_start_index.to("cpu", torch.long).contiguous(),
            sampling_locations.contiguous(), attention_weights.contiguous())
        return out.to(out_dtype)

    if device.type != "cuda" or _extension() is None:
        _log_path_once(f"the PyTorch fallback ({device.type} tensors)")
        out = ms_deform_attn_pytorch(value, spatial_shapes, level_start_index,
                                     sampling_locations, attention_weights)
        return out.to(out_dtype)

    _log_path_once("the CUDA kernel")
    with torch.cuda.device(device):
        out = _MSDeformAttnCUDA.apply(
            value.contiguous(),
            spatial_shapes.to(device=device, dtype=torch.long).contiguous(),
            level_start_index.to(device=device, dtype=torch.long).contiguous(),
            sampling_locations.contiguous(), attention_weights.contiguous())
    return out.to(out_dtype)
