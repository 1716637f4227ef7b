"""ops/: multi-scale deformable attention, fallback and CUDA kernel.

The reference below is written independently of ops/msda.py: explicit bilinear corner gathers
(no grid_sample), float64, reading the levels through level_start_index.
"""
import logging
import os
import shutil
import subprocess
import sysconfig
import time

import pytest
import torch

from ops import ms_deform_attn, ms_deform_attn_pytorch
from ops import msda

OPS_DIR = os.path.dirname(os.path.abspath(msda.__file__))


def naive_msda(value, spatial_shapes, level_start_index, loc, attn):
    """out[b, q, m] = sum_{l, p} attn * bilinear sample at (x * W - 0.5, y * H - 0.5), corners
    outside the map read 0. Written with explicit corner gathers; differentiable by autograd."""
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = loc.shape
    b = torch.arange(B)[:, None, None, None]                 # broadcast to [B, Q, M, P]
    m = torch.arange(M)[None, None, :, None]
    out = value.new_zeros(B, Q, M, D)
    for l in range(L):
        H, W = (int(s) for s in spatial_shapes[l])
        start = int(level_start_index[l])
        x = loc[:, :, :, l, :, 0] * W - 0.5                  # pixel coordinates, [B, Q, M, P]
        y = loc[:, :, :, l, :, 1] * H - 0.5
        x0, y0 = torch.floor(x).detach(), torch.floor(y).detach()
        for cx in (x0, x0 + 1):
            for cy in (y0, y0 + 1):
                corner_w = (1 - (x - cx).abs()) * (1 - (y - cy).abs())
                inside = (cx >= 0) & (cx <= W - 1) & (cy >= 0) & (cy <= H - 1)
                idx = start + cy.clamp(0, H - 1).long() * W + cx.clamp(0, W - 1).long()
                corner_v = value[b, idx, m]                   # [B, Q, M, P, D]
                wgt = corner_w * inside * attn[:, :, :, l]    # [B, Q, M, P]
                out = out + (wgt[..., None] * corner_v).sum(3)
    return out.flatten(2)                                     # [B, Q, M*D]


def make_inputs(B, M, D, shapes, Q, P, dtype=torch.float64, device="cpu", spread=0.3, seed=0):
    """Random inputs; locations in [-spread, 1 + spread] so that some fall outside the map."""
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    L, S = len(shapes), int(sizes.sum())
    value = torch.randn(B, S, M, D, generator=g, dtype=dtype)
    loc = torch.rand(B, Q, M, L, P, 2, generator=g, dtype=dtype) * (1 + 2 * spread) - spread
    attn = torch.rand(B, Q, M, L, P, generator=g, dtype=dtype)
    attn = attn / attn.sum((-1, -2), keepdim=True)
    return tuple(t.to(device) for t in (value, spatial_shapes, level_start_index, loc, attn))


# ------------------------------------------------------------------------------------------------
# fallback
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,M,D,shapes,Q,P", [
    (2, 3, 5, [(7, 11), (4, 6), (2, 3)], 13, 4),
    (1, 2, 8, [(5, 3)], 9, 2),
    (3, 1, 4, [(1, 9), (6, 1), (3, 4), (2, 2)], 6, 3),
])
def test_fallback_matches_naive_reference(B, M, D, shapes, Q, P):
    inputs = make_inputs(B, M, D, shapes, Q, P, seed=B * 100 + Q)
    loc = inputs[3]
    assert ((loc < 0) | (loc > 1)).any(), "the test must include locations outside the map"
    ref = naive_msda(*inputs)
    out = ms_deform_attn_pytorch(*inputs)
    assert out.shape == (B, Q, M * D) and out.dtype == torch.float64
    assert ref.abs().max() > 0.1
    assert (out - ref).abs().max().item() < 1e-10


def test_fallback_gradients_match_naive_reference():
    inputs = make_inputs(2, 2, 3, [(5, 7), (3, 2)], 6, 3, seed=3)
    value, shapes, starts, loc, attn = inputs
    grads = []
    for fn in (ms_deform_attn_pytorch, naive_msda):
        leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
        out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])
        grad_out = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        grads.append(torch.autograd.grad(out, leaves, grad_out))
    for mine, ref in zip(*grads):
        assert ref.abs().max() > 1e-3
        assert (mine - ref).abs().max().item() < 1e-10


def test_fallback_gradcheck_float64():
    value, shapes, starts, loc, attn = make_inputs(2, 2, 3, [(3, 4), (2, 3)], 3, 2, seed=7)
    value, loc, attn = (t.requires_grad_() for t in (value, loc, attn))
    assert torch.autograd.gradcheck(
        lambda v, x, a: ms_deform_attn_pytorch(v, shapes, starts, x, a), (value, loc, attn))


def test_fallback_float32_and_head_major_layout():
    value, shapes, starts, loc, attn = make_inputs(1, 3, 4, [(4, 5)], 2, 2, seed=5)
    out32 = ms_deform_attn_pytorch(value.float(), shapes, starts, loc.float(), attn.float())
    assert out32.dtype == torch.float32
    ref = naive_msda(value, shapes, starts, loc, attn)
    assert (out32.double() - ref).abs().max().item() < 1e-5
    # head-major: channels [m*D:(m+1)*D] are head m's; zeroing head 1's values changes only them
    value2 = value.clone()
    value2[:, :, 1] = 0
    out2 = ms_deform_attn_pytorch(value2, shapes, starts, loc, attn)
    ref64 = ms_deform_attn_pytorch(value, shapes, starts, loc, attn)
    assert torch.equal(out2[..., :4], ref64[..., :4]) and torch.equal(out2[..., 8:], ref64[..., 8:])
    assert out2[..., 4:8].abs().max() == 0


def test_pixel_centres_and_zero_outside():
    # one 2x3 level, one head, one channel: value = 10*row + col
    value = torch.tensor([[0., 1., 2.], [10., 11., 12.]], dtype=torch.float64).view(1, 6, 1, 1)
    shapes, starts = torch.tensor([[2, 3]]), torch.tensor([0])
    # pixel (row 1, col 2)'s centre; half-way between cols 0 and 1 of row 0; off the map to the
    # left; on the bottom edge (half of row 1 blended with the zero padding); a pixel below the map
    xy = torch.tensor([[2.5 / 3, 1.5 / 2], [1.0 / 3, 0.5 / 2], [-0.5, 0.5], [0.5, 1.0], [0.5, 1.25]],
                      dtype=torch.float64)
    loc = xy.view(1, 5, 1, 1, 1, 2)
    attn = torch.ones(1, 5, 1, 1, 1, dtype=torch.float64)
    out = ms_deform_attn_pytorch(value, shapes, starts, loc, attn).flatten()
    expected = torch.tensor([12., 0.5, 0., 5.5, 0.], dtype=torch.float64)
    assert (out - expected).abs().max().item() < 1e-12


def test_wrong_shapes_raise_clear_errors():
    value, shapes, starts, loc, attn = make_inputs(1, 2, 3, [(3, 4)], 2, 2)
    with pytest.raises(ValueError, match="spatial_shapes"):
        ms_deform_attn_pytorch(value[:, :-1], shapes, starts, loc, attn)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        ms_deform_attn(value, shapes, starts, loc, attn[:, :, :1])


# ------------------------------------------------------------------------------------------------
# CPU kernel (ops/msda_cpu.cpp): the same numbers as the fallback, forward and backward
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cpu_lib(tmp_path_factory):
    """The CPU kernel built into a fresh cache folder (a build failure fails the test; without any
    C++ compiler on the PATH the kernel cannot exist, and the test says so as it skips)."""
    try:
        msda.find_compiler()
    except RuntimeError as e:
        pytest.skip(f"CPU kernel not testable here: {e}")
    cache = tmp_path_factory.mktemp("ops_cache")
    old = os.environ.get(msda.CACHE_ENV)
    os.environ[msda.CACHE_ENV] = str(cache)
    try:
        yield msda.build_cpu_kernel()
    finally:
        if old is None:
            os.environ.pop(msda.CACHE_ENV)
        else:
            os.environ[msda.CACHE_ENV] = old


@pytest.fixture
def cpu_kernel(cpu_lib, monkeypatch):
    """ms_deform_attn routed to the CPU kernel."""
    monkeypatch.delenv(msda.FALLBACK_ENV, raising=False)
    monkeypatch.setattr(msda, "_cpu_lib", cpu_lib)
    monkeypatch.setattr(msda, "_cpu_tried", True)
    assert msda._cpu_kernel() is cpu_lib
    return cpu_lib


def _forward_and_grads(fn, inputs):
    value, shapes, starts, loc, attn = inputs
    leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
    out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(out.shape, generator=g, dtype=out.dtype).to(out.device)
    return (out,) + torch.autograd.grad(out, leaves, grad_out)


CPU_KERNEL_CASES = [  # (B, M, D, shapes, Q, P): odd sizes, one head, one channel, cpu-tiny's SCA
    (2, 3, 5, [(7, 11), (4, 6), (2, 3)], 13, 4),
    (3, 1, 4, [(1, 9), (6, 1), (3, 4), (2, 2)], 6, 3),
    (1, 2, 1, [(5, 3)], 9, 2),
    (2, 8, 16, [(16, 28), (8, 14)], 40, 8),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CPU_KERNEL_CASES)
def test_cpu_kernel_matches_fallback(cpu_kernel, case, dtype):
    inputs = make_inputs(*case, dtype=dtype, seed=len(case[3]))
    assert ((inputs[3] < 0) | (inputs[3] > 1)).any()        # some points off the map
    ref = _forward_and_grads(ms_deform_attn_pytorch, inputs)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    results = {}
    for threads in (1, 3):                                  # 3: shares of unequal head counts
        torch.set_num_threads(threads)
        try:
            results[threads] = _forward_and_grads(ms_deform_attn, inputs)
        finally:
            torch.set_num_threads(2)
        for name, a, b in zip(("out", "grad_value", "grad_loc", "grad_attn"), results[threads], ref):
            assert a.dtype == dtype and a.shape == b.shape
            assert b.abs().max() > 1e-3
            rel = ((a - b).abs().max() / b.abs().max()).item()
            assert rel < tol, f"{threads} threads, {name}: relative error {rel:.1e}"
    # each head is summed by one thread in a fixed order: the thread count changes nothing
    assert all(torch.equal(a, b) for a, b in zip(results[1], results[3]))


def test_cpu_kernel_gradcheck(cpu_kernel):
    value, shapes, starts, loc, attn = make_inputs(2, 2, 3, [(3, 4), (2, 3)], 3, 2, seed=7)
    value, loc, attn = (t.requires_grad_() for t in (value, loc, attn))
    assert torch.autograd.gradcheck(
        lambda v, x, a: ms_deform_attn(v, shapes, starts, x, a), (value, loc, attn))


def test_cpu_kernel_pixel_centres_far_points_and_non_contiguous_inputs(cpu_kernel):
    # the fallback's pixel-centre test, through the kernel; plus points far off the map and NaN
    value = torch.tensor([[0., 1., 2.], [10., 11., 12.]], dtype=torch.float64).view(1, 6, 1, 1)
    shapes, starts = torch.tensor([[2, 3]]), torch.tensor([0])
    xy = torch.tensor([[2.5 / 3, 1.5 / 2], [1.0 / 3, 0.5 / 2], [-0.5, 0.5], [0.5, 1.0], [0.5, 1.25],
                       [1e30, 0.5], [-1e30, -1e30], [float("nan"), 0.5]], dtype=torch.float64)
    loc = xy.view(1, 8, 1, 1, 1, 2)
    attn = torch.ones(1, 8, 1, 1, 1, dtype=torch.float64)
    out = ms_deform_attn(value, shapes, starts, loc, attn).flatten()
    expected = torch.tensor([12., 0.5, 0., 5.5, 0., 0., 0., 0.], dtype=torch.float64)
    assert (out - expected).abs().max().item() < 1e-12
    # non-contiguous views (the model hands such) give the numbers of their contiguous copies
    value, shapes, starts, loc, attn = make_inputs(2, 4, 6, [(5, 4)], 7, 3, seed=2)
    wide = torch.cat([value, value], dim=-1)[..., :6]
    assert not wide.is_contiguous()
    assert torch.equal(ms_deform_attn(wide, shapes, starts, loc, attn),
                       ms_deform_attn(value, shapes, starts, loc, attn))


def test_cpu_kernel_is_cached_and_a_compile_error_is_one_line(cpu_lib, tmp_path, monkeypatch):
    monkeypatch.setenv(msda.CACHE_ENV, str(tmp_path))
    path = msda.cpu_library_path(msda.find_compiler())
    assert os.path.dirname(path) == str(tmp_path)
    msda.build_cpu_kernel()
    built = os.stat(path).st_mtime_ns
    msda.build_cpu_kernel()                                 # the second call loads the cached file
    assert os.stat(path).st_mtime_ns == built and os.listdir(tmp_path) == [os.path.basename(path)]
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(msda, "_CPU_SOURCE", str(broken))
    assert msda.cpu_library_path(msda.find_compiler()) != path   # another source, another file
    with pytest.raises(RuntimeError, match="failed: .*broken.cpp") as e:
        msda.build_cpu_kernel()
    assert "\n" not in str(e.value)
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(path), "broken.cpp"])  # no debris


# ------------------------------------------------------------------------------------------------
# dispatch: CPU tensors, the environment switch, failing builds
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_dispatch(monkeypatch):
    """A clean dispatch state (no kernel, no build tried, nothing logged) and fake builds that fail;
    returns the list of build attempts, ('cuda' or 'cpu', verbose)."""
    calls = []

    def fake_build(verbose=False):
        calls.append(("cuda", verbose))
        raise RuntimeError("Error building extension 'fd_msda': nvcc not found")

    def fake_cpu_build(verbose=False):
        calls.append(("cpu", verbose))
        raise RuntimeError("no C++ compiler on the PATH (c++, g++ or clang++; or set CXX)")

    monkeypatch.setattr(msda, "_ext", None)
    monkeypatch.setattr(msda, "_ext_tried", False)
    monkeypatch.setattr(msda, "_cpu_lib", None)
    monkeypatch.setattr(msda, "_cpu_tried", False)
    monkeypatch.setattr(msda, "_logged", set())
    monkeypatch.setattr(msda, "build_extension", fake_build)
    monkeypatch.setattr(msda, "build_cpu_kernel", fake_cpu_build)
    monkeypatch.delenv(msda.FALLBACK_ENV, raising=False)
    return calls


def test_cpu_tensors_use_the_cpu_kernel_and_never_build_cuda(cpu_lib, fresh_dispatch, monkeypatch,
                                                             caplog):
    monkeypatch.setattr(msda, "build_cpu_kernel", lambda verbose=False: cpu_lib)
    inputs = make_inputs(2, 2, 3, [(3, 4), (2, 2)], 5, 2)
    with caplog.at_level(logging.INFO, logger="ops"):
        out = ms_deform_attn(*inputs)
        ms_deform_attn(*inputs)
    assert fresh_dispatch == []                             # the CUDA extension is never built
    assert msda._cpu_lib is cpu_lib
    assert (out - ms_deform_attn_pytorch(*inputs)).abs().max() < 1e-12
    lines = [r.getMessage() for r in caplog.records if r.name == "ops"]
    assert lines == ["ops: multi-scale deformable attention runs on the CPU kernel"]


def test_failed_cpu_build_warns_once_and_falls_back(fresh_dispatch, caplog):
    inputs = make_inputs(2, 2, 3, [(3, 4), (2, 2)], 5, 2)
    with caplog.at_level(logging.INFO, logger="ops"):
        out = ms_deform_attn(*inputs)
        ms_deform_attn(*inputs)
    assert fresh_dispatch == [("cpu", False)]               # tried once, never retried
    assert torch.equal(out, ms_deform_attn_pytorch(*inputs))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "CPU deformable-attention kernel (no C++ compiler" in warnings[0] and "fallback" in warnings[0]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert infos == ["ops: multi-scale deformable attention runs on the PyTorch fallback (cpu tensors)"]


def test_failed_build_warns_once_and_is_not_retried(fresh_dispatch, caplog):
    with caplog.at_level(logging.INFO, logger="ops"):
        assert msda._extension() is None
        assert msda._extension() is None
    assert fresh_dispatch == [("cuda", False)]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "\n" not in msg and "nvcc not found" in msg and "fallback" in msg


@pytest.mark.parametrize("setting,builds", [("1", False), ("0", True), ("", True)])
def test_env_var_forces_fallback(fresh_dispatch, monkeypatch, setting, builds):
    monkeypatch.setenv(msda.FALLBACK_ENV, setting)
    assert msda.fallback_forced() == (not builds)
    assert msda._extension() is None and msda._cpu_kernel() is None
    assert len(fresh_dispatch) == 2 * int(builds)
    inputs = make_inputs(1, 2, 3, [(3, 4)], 4, 2)
    assert torch.equal(ms_deform_attn(*inputs), ms_deform_attn_pytorch(*inputs))


def test_low_precision_inputs_are_computed_in_float32():
    value, shapes, starts, loc, attn = make_inputs(2, 2, 4, [(6, 5), (3, 3)], 7, 2,
                                                   dtype=torch.float32)
    ref = ms_deform_attn(value.bfloat16().float(), shapes, starts, loc, attn)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ms_deform_attn(value.bfloat16(), shapes, starts, loc, attn)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max().item() < 2e-2
    # gradients flow back to the low-precision input in its own dtype
    v = value.bfloat16().requires_grad_()
    ms_deform_attn(v, shapes, starts, loc, attn).float().sum().backward()
    assert v.grad.dtype == torch.bfloat16 and v.grad.abs().max() > 0


# ------------------------------------------------------------------------------------------------
# CUDA sources: compile without a GPU
# ------------------------------------------------------------------------------------------------
def test_cuda_sources_compile(tmp_path):
    """The kernel compiles for sm_80 and sm_90, and the binding against this torch's headers (a
    CPU-only torch is enough: the sources need only torch/extension.h and the CUDA runtime). The
    kernel file has no torch header (a few seconds); the binding is the slow part (~25 s CPU), so
    it is compiled at -O0 (a compile check) while the kernel compiles, in a second process."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on the PATH: the CUDA sources cannot be compile-checked here")
    from torch.utils.cpp_extension import include_paths
    torch_flags = [f"-I{p}" for p in include_paths()] + [
        f"-I{sysconfig.get_paths()['include']}", "-DTORCH_EXTENSION_NAME=fd_msda",
        "-DTORCH_API_INCLUDE_EXTENSION_H", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    common = [nvcc, "-c", "-std=c++20", "-Xcompiler", "-fPIC", "--output-directory", str(tmp_path)]
    kernel_cmd = common + [os.path.join(OPS_DIR, "msda_kernel.cu"), "-O3", "-Xptxas", "-v",
                           "-gencode=arch=compute_80,code=sm_80",
                           "-gencode=arch=compute_90,code=sm_90"]
    binding_cmd = common + [os.path.join(OPS_DIR, "msda_binding.cpp"), "-O0"] + torch_flags
    t0 = time.time()
    jobs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for cmd in (kernel_cmd, binding_cmd)]
    (kernel_out, kernel_err), (binding_out, binding_err) = (job.communicate() for job in jobs)
    assert jobs[0].returncode == 0, f"nvcc failed on msda_kernel.cu:\n{kernel_out}\n{kernel_err}"
    assert jobs[1].returncode == 0, f"nvcc failed on msda_binding.cpp:\n{binding_out}\n{binding_err}"
    objs = sorted(os.listdir(tmp_path))
    assert objs == ["msda_binding.o", "msda_kernel.o"], objs
    # ptxas (-Xptxas -v) reports each kernel for each architecture: both dtypes, both archs
    entries = [line for line in kernel_err.splitlines() if "Compiling entry function" in line]
    for kernel in ("msda_forward_kernel", "msda_backward_kernel"):
        for arch in ("sm_80", "sm_90"):
            found = [e for e in entries if kernel in e and f"'{arch}'" in e]
            assert len(found) == 2, (kernel, arch, kernel_err)  # float and double
    assert "spill" not in kernel_err.replace("0 bytes spill", ""), kernel_err
    print(f"compiled in {time.time() - t0:.0f} s")


# ------------------------------------------------------------------------------------------------
# CUDA kernel (skipped without a GPU: run `bash tests/gpu_check.sh` on a CUDA machine)
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def kernel(monkeypatch):
    """Builds the extension (a build failure fails the test) and routes ms_deform_attn to it."""
    monkeypatch.delenv(msda.FALLBACK_ENV, raising=False)
    ext = msda.build_extension()
    monkeypatch.setattr(msda, "_ext", ext)
    monkeypatch.setattr(msda, "_ext_tried", True)
    assert msda._extension() is ext
    return ext


KERNEL_CASES = [  # (B, M, D, shapes, Q, P): D covers one warp, several warps, odd sizes
    (2, 3, 32, [(7, 11), (4, 6), (2, 3)], 13, 4),
    (1, 2, 64, [(5, 9)], 20, 2),
    (2, 4, 6, [(3, 8), (5, 2)], 9, 3),
    (1, 1, 48, [(16, 12), (8, 6)], 33, 5),
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", KERNEL_CASES)
def test_kernel_matches_fallback(kernel, case, dtype):
    inputs = make_inputs(*case, dtype=dtype, device="cuda")
    mine = _forward_and_grads(ms_deform_attn, inputs)
    ref = _forward_and_grads(ms_deform_attn_pytorch, inputs)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for name, a, b in zip(("out", "grad_value", "grad_loc", "grad_attn"), mine, ref):
        assert a.dtype == dtype and a.shape == b.shape
        rel = ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
        assert rel < tol, f"{name}: relative error {rel:.2e}"


@pytest.mark.cuda
def test_kernel_gradcheck(kernel):
    value, shapes, starts, loc, attn = make_inputs(2, 2, 3, [(3, 4), (2, 3)], 3, 2, device="cuda")
    value, loc, attn = (t.requires_grad_() for t in (value, loc, attn))
    # atomicAdd makes the summation order vary between runs: allow float64 round-off
    assert torch.autograd.gradcheck(
        lambda v, x, a: ms_deform_attn(v, shapes, starts, x, a), (value, loc, attn),
        nondet_tol=1e-12)


@pytest.mark.cuda
def test_kernel_half_under_autocast(kernel):
    value, shapes, starts, loc, attn = make_inputs(2, 4, 32, [(20, 30), (10, 15)], 50, 4,
                                                   dtype=torch.float32, device="cuda")
    proj = torch.nn.Linear(32, 32).cuda()
    with torch.autocast("cuda", dtype=torch.float16):
        v = proj(value)                                     # half under autocast
        assert v.dtype == torch.float16
        out = ms_deform_attn(v, shapes, starts, loc, attn)
    assert out.dtype == torch.float16
    ref = ms_deform_attn_pytorch(v.float(), shapes, starts, loc, attn)
    assert (out.float() - ref).abs().max().item() < 1e-2
    out.float().sum().backward()
    assert proj.weight.grad is not None and torch.isfinite(proj.weight.grad).all()


@pytest.mark.cuda
def test_env_var_forces_fallback_on_cuda(kernel, monkeypatch):
    inputs = make_inputs(1, 2, 8, [(5, 6)], 7, 2, device="cuda")
    monkeypatch.setenv(msda.FALLBACK_ENV, "1")
    assert msda._extension() is None
    out = ms_deform_attn(*inputs)
    assert torch.equal(out, ms_deform_attn_pytorch(*inputs))


# ------------------------------------------------------------------------------------------------
# The kernel's device code on the CPU (slow): checks its indexing, the warp-shuffle reductions and
# the grid-stride loop on machines without a GPU. The kernels of msda_kernel.cu are compiled as
# plain C++ with one std::thread per CUDA thread, each warp in lockstep at the shuffles (a barrier),
# and atomicAdd under a mutex. The launchers (<<<...>>>) are cut off; the harness launches instead.
# ------------------------------------------------------------------------------------------------
EMULATION_PRELUDE = r"""
#include <torch/extension.h>
#include <barrier>
#include <cmath>
#include <mutex>
#include <thread>
#include <vector>
using std::floor;
#define __global__
#define __device__
#define __forceinline__ inline
struct Dim3 { int64_t x; };
thread_local Dim3 threadIdx, blockIdx;
Dim3 blockDim, gridDim;
struct MsdaSizes { int64_t B, S, M, D, L, Q, P; };
std::mutex atomic_mutex;
template <typename T> void atomicAdd(T* p, T v) { std::lock_guard<std::mutex> g(atomic_mutex); *p += v; }
struct Warp { double lanes[32]; std::barrier<> sync{32}; };
thread_local Warp* warp;
template <typename T> T __shfl_xor_sync(unsigned mask, T v, int offset) {
  TORCH_CHECK(mask == 0xffffffffu);
  const int lane = threadIdx.x & 31;
  warp->lanes[lane] = static_cast<double>(v);
  warp->sync.arrive_and_wait();
  const T other = static_cast<T>(warp->lanes[lane ^ offset]);
  warp->sync.arrive_and_wait();
  return other;
}
"""

EMULATION_DRIVER = r"""
template <typename F> void launch(int64_t blocks, int64_t threads, F kernel) {
  blockDim.x = threads; gridDim.x = blocks;
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t w = 0; w < threads / 32; ++w) {
      Warp wp; std::vector<std::thread> lanes;
      for (int lane = 0; lane < 32; ++lane)
        lanes.emplace_back([&, lane] { threadIdx.x = w * 32 + lane; blockIdx.x = b; warp = &wp; kernel(); });
      for (auto& t : lanes) t.join();
    }
}
template <typename T>
std::vector<torch::Tensor> run(torch::Tensor value, torch::Tensor shapes, torch::Tensor starts,
                               torch::Tensor loc, torch::Tensor attn, torch::Tensor grad_out,
                               int64_t blocks, int64_t threads) {
  MsdaSizes n{value.size(0), value.size(1), value.size(2), value.size(3), loc.size(3), loc.size(1), loc.size(4)};
  auto out = torch::full({n.B, n.Q, n.M * n.D}, 1e3, value.options());  // must be overwritten
  auto gv = torch::zeros_like(value), gl = torch::zeros_like(loc), ga = torch::zeros_like(attn);
  launch(blocks, threads, [&] { msda_forward_kernel<T>(value.data_ptr<T>(), shapes.data_ptr<int64_t>(),
      starts.data_ptr<int64_t>(), loc.data_ptr<T>(), attn.data_ptr<T>(), out.data_ptr<T>(), n); });
  launch(blocks, threads, [&] { msda_backward_kernel<T>(value.data_ptr<T>(), shapes.data_ptr<int64_t>(),
      starts.data_ptr<int64_t>(), loc.data_ptr<T>(), attn.data_ptr<T>(), grad_out.data_ptr<T>(),
      gv.data_ptr<T>(), gl.data_ptr<T>(), ga.data_ptr<T>(), n); });
  return {out, gv, gl, ga};
}
std::vector<torch::Tensor> emulate(torch::Tensor value, torch::Tensor shapes, torch::Tensor starts,
                                   torch::Tensor loc, torch::Tensor attn, torch::Tensor grad_out,
                                   int64_t blocks, int64_t threads) {
  if (value.scalar_type() == torch::kDouble)
    return run<double>(value, shapes, starts, loc, attn, grad_out, blocks, threads);
  return run<float>(value, shapes, starts, loc, attn, grad_out, blocks, threads);
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("emulate", &emulate); }
"""


@pytest.mark.slow
def test_kernel_device_code_emulated_on_cpu(tmp_path):
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on the PATH to build the CPU emulation of the kernel")
    from torch.utils.cpp_extension import load
    kernels = open(os.path.join(OPS_DIR, "msda_kernel.cu")).read()
    kernels = kernels.replace('#include "msda.h"', "")
    kernels = kernels[:kernels.index("int64_t blocks_for")] + "}  // namespace\n"
    source = tmp_path / "msda_emulated.cpp"
    source.write_text(EMULATION_PRELUDE + kernels + EMULATION_DRIVER)
    emu = load(name="msda_emulated", sources=[str(source)], build_directory=str(tmp_path),
               extra_cflags=["-O1", "-Wno-unknown-pragmas"])
    cases = KERNEL_CASES + [(1, 1, 1, [(3, 4)], 5, 2), (2, 2, 40, [(4, 5), (2, 2)], 3, 3),
                            (1, 3, 96, [(6, 4)], 4, 2)]
    for case in cases:
        for dtype in (torch.float64, torch.float32):
            B, M, D, _, Q, _ = case
            value, shapes, starts, loc, attn = make_inputs(*case, dtype=dtype)
            # one thread per output element; and 2 blocks of 64 threads, so the loop strides
            for blocks, threads in (((B * Q * M * D + 255) // 256, 256), (2, 64)):
                leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
                out = ms_deform_attn_pytorch(leaves[0], shapes, starts, leaves[1], leaves[2])
                grad_out = torch.randn(out.shape, dtype=dtype)
                ref = (out,) + torch.autograd.grad(out, leaves, grad_out)
                mine = emu.emulate(value, shapes, starts, loc, attn, grad_out, blocks, threads)
                tol = 1e-12 if dtype == torch.float64 else 1e-5
                for name, a, b in zip(("out", "grad_value", "grad_loc", "grad_attn"), mine, ref):
                    rel = ((a - b).abs().max() / b.abs().max()).item()
                    assert rel < tol, f"{case} {dtype} {blocks}x{threads} {name}: {rel:.1e}"


def test_dispatch_keeps_the_input_dtype_and_computes_half_in_float32():
    """ms_deform_attn returns value's dtype: float32 and float64 are computed as they are (float64 for
    reference checks); float16/bfloat16 inputs (autocast) are computed in float32 and cast back."""
    value, shapes, starts, loc, attn = make_inputs(1, 2, 4, [(4, 5), (2, 3)], 3, 2, seed=3)
    ref = ms_deform_attn_pytorch(value, shapes, starts, loc, attn)                       # float64
    out64 = ms_deform_attn(value, shapes, starts, loc, attn)
    assert out64.dtype == torch.float64 and (out64 - ref).abs().max() < 1e-12
    for half in (torch.float16, torch.bfloat16):
        out = ms_deform_attn(value.to(half), shapes, starts, loc.to(half), attn.to(half))
        assert out.dtype == half
        fp32 = ms_deform_attn(value.to(half).float(), shapes, starts, loc.to(half).float(),
                              attn.to(half).float())
        assert fp32.dtype == torch.float32
        assert torch.equal(out, fp32.to(half))                                           # computed in fp32
    out32 = ms_deform_attn(value.float(), shapes, starts, loc.float(), attn.float())
    assert out32.dtype == torch.float32 and (out32.double() - ref).abs().max() < 1e-5
