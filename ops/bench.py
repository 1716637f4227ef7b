"""Benchmark of multi-scale deformable attention at the three BEVFormer sites.

    python -m ops.bench [--device cpu|cuda] [--runs 5] [--sites tsa,decoder,sca] [--dtype float32]
                        [--threads N] [--clock wall|cpu]

For each site and variant: median time of `--runs` runs after a warm-up, forward (no grad) and
forward+backward (grads of value, locations and weights), and the peak memory each needs beyond its
inputs (CPU: the torch profiler's allocation events; CUDA: torch.cuda.max_memory_allocated).
Variants: the usual grid_sample formulation (the BASELINE, written below as mmcv's
multi_scale_deformable_attn_pytorch computes it), our fallback (ops.ms_deform_attn_pytorch) and the
compiled kernel of the device. Targets (issue 2): on CPU the fallback needs <= 1.1x the baseline's time
and no more memory; on CUDA the kernel is >= 5x faster than the fallback (forward+backward, Base
spatial cross-attention) and needs less memory.
"""
import argparse
import contextlib
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from . import msda

# name: (description, B, M, D, levels [(H, W)], Q, P)
SITES = {
    "tsa": ("BEVFormer-Tiny temporal self-attn", 2, 8, 32, [(50, 50)], 2500, 4),
    "decoder": ("BEVFormer-Base decoder cross-attn", 1, 8, 32, [(200, 200)], 900, 4),
    "sca": ("BEVFormer-Base spatial cross-attn", 6, 8, 32,
            [(116, 200), (58, 100), (29, 50), (15, 25)], 1200, 8),
    # the default CPU model (cpu-tiny, batch 1): its three sites at the sizes of a training step
    "cpu-tsa": ("cpu-tiny temporal self-attn", 2, 8, 16, [(50, 50)], 2500, 4),
    "cpu-sca": ("cpu-tiny spatial cross-attn", 6, 8, 16, [(16, 28), (8, 14)], 667, 8),
    "cpu-decoder": ("cpu-tiny decoder cross-attn", 1, 8, 16, [(50, 50)], 300, 4),
}


def grid_sample_baseline(value, spatial_shapes, level_start_index, sampling_locations,
                         attention_weights):
    """BASELINE: the usual grid_sample formulation (mmcv's multi_scale_deformable_attn_pytorch):
    sample every level, stack all levels, multiply by the weights, sum. Same arguments and result
    as ops.ms_deform_attn_pytorch; kept here only to be measured against."""
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    sizes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    grids = 2 * sampling_locations - 1
    per_level = []
    for l, v in enumerate(value.split([h * w for h, w in sizes], dim=1)):
        h, w = sizes[l]
        v = v.flatten(2).transpose(1, 2).reshape(B * M, D, h, w)             # [B*M, D, H, W]
        g = grids[:, :, :, l].transpose(1, 2).flatten(0, 1)                  # [B*M, Q, P, 2]
        per_level.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros",
                                       align_corners=False))                 # [B*M, D, Q, P]
    weights = attention_weights.transpose(1, 2).reshape(B * M, 1, Q, L * P)
    out = (torch.stack(per_level, dim=-2).flatten(-2) * weights).sum(-1)     # [B*M, D, Q]
    return out.view(B, M * D, Q).transpose(1, 2).contiguous()               # [B, Q, M*D]


def make_site(B, M, D, levels, Q, P, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(levels, dtype=torch.long)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    L = len(levels)
    value = torch.randn(B, int(sizes.sum()), M, D, generator=g)
    loc = torch.rand(B, Q, M, L, P, 2, generator=g) * 1.2 - 0.1   # a few points off the map
    attn = torch.rand(B, Q, M, L, P, generator=g)
    attn = attn / attn.sum((-1, -2), keepdim=True)
    grad_out = torch.randn(B, Q, M * D, generator=g)
    to = dict(device=device)
    return ([value.to(dtype=dtype, **to), shapes.to(**to), starts.to(**to),
             loc.to(dtype=dtype, **to), attn.to(dtype=dtype, **to)], grad_out.to(dtype=dtype, **to))


def run_once(fn, inputs, grad_out, backward):
    """One call: forward only (no grad), or forward + backward for value, locations, weights."""
    value, shapes, starts, loc, attn = inputs
    if not backward:
        with torch.no_grad():
            return fn(value, shapes, starts, loc, attn)
    leaves = [t.detach().requires_grad_() for t in (value, loc, attn)]
    out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])
    return torch.autograd.grad(out, leaves, grad_out)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def quiet_stderr():
    """The profiler's C++ side prints start/stop lines on file descriptor 2: hide them."""
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_bytes(fn, inputs, grad_out, backward, device):
    """Peak memory allocated during one call beyond what existed before it (inputs)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = run_once(fn, inputs, grad_out, backward)
        sync(device)
        del result
        return torch.cuda.max_memory_allocated(device) - before
    # CPU: replay the profiler's allocation/free events in time order and keep the maximum
    from torch.profiler import ProfilerActivity, profile
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = run_once(fn, inputs, grad_out, backward)
        del result
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def bench_site(variants, inputs, grad_out, runs, device, clock=time.perf_counter):
    """{variant: dict(fwd=ms, fwdbwd=ms, mem_fwd=bytes, mem_fwdbwd=bytes)}, medians of `runs`."""
    times = {name: {"fwd": [], "fwdbwd": []} for name in variants}
    for name, fn in variants.items():  # warm-up (and a lazy build, if any)
        run_once(fn, inputs, grad_out, backward=True)
    for _ in range(runs):  # variants interleaved, so that a noisy neighbour hits all of them
        for name, fn in variants.items():
            for key, backward in (("fwd", False), ("fwdbwd", True)):
                sync(device)
                t0 = clock()
                result = run_once(fn, inputs, grad_out, backward)
                sync(device)
                times[name][key].append(clock() - t0)
                del result
    stats = {}
    for name, fn in variants.items():
        stats[name] = {key: 1e3 * statistics.median(ts) for key, ts in times[name].items()}
        for key, backward in (("mem_fwd", False), ("mem_fwdbwd", True)):
            stats[name][key] = peak_bytes(fn, inputs, grad_out, backward, device)
    return stats


def describe_machine(device):
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return (f"{p.name} ({p.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, "
                f"torch {torch.__version__}")
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = torch.get_num_threads()
    return (f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} with {threads} "
            f"thread{'s' if threads > 1 else ''}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ops.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=["cpu", "cuda"], help="default: cuda when available")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per variant (median)")
    parser.add_argument("--sites", default=",".join(SITES),
                        help=f"comma-separated subset of {','.join(SITES)}")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="wall-clock time, or the process's CPU time (all threads; steadier "
                             "than wall time on a busy shared CPU machine; ignored on CUDA)")
    args = parser.parse_args(argv)
    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    unknown = [s for s in sites if s not in SITES]
    if unknown:
        parser.error(f"--sites: unknown {unknown}; expected names from {list(SITES)}")
    if args.runs < 1:
        parser.error("--runs: expected a positive integer")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    dtype = getattr(torch, args.dtype)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        args.clock = "wall"
    clock = time.perf_counter if args.clock == "wall" else time.process_time

    variants = {"grid_sample (mmcv, BASELINE)": grid_sample_baseline,
                "fallback (ours)": msda.ms_deform_attn_pytorch}
    # the device's compiled kernel: (module attribute holding it, attribute "build tried", builder)
    kernels = {"cpu": ("_cpu_lib", "_cpu_tried", msda.build_cpu_kernel),
               "cuda": ("_ext", "_ext_tried", msda.build_extension)}
    name = f"{device.type} kernel"
    if msda.fallback_forced():
        print(f"{name}: skipped ({msda.FALLBACK_ENV} is set)")
    else:
        held, tried, build = kernels[device.type]
        try:
            setattr(msda, held, build())
            setattr(msda, tried, True)
            variants[name] = msda.ms_deform_attn
        except Exception as e:  # report, and still benchmark the other two
            print(f"{name}: not available, the build failed: {msda.error_line(e)}")

    print(f"ops.bench on {device.type}: {describe_machine(device)}")
    print(f"{args.dtype}, {args.clock} time, median of {args.runs} runs after a warm-up; peak "
          f"memory = most allocated beyond the inputs during one call")
    header = (f"{'site':<42}{'variant':<30}{'fwd ms':>9}{'fwd+bwd ms':>12}{'peak MiB fwd':>14}"
              f"{'peak MiB f+b':>14}{'time x base':>13}{'mem x base':>12}")
    print(header)
    print("-" * len(header))
    verdicts = []
    for site in sites:
        desc, B, M, D, levels, Q, P = SITES[site]
        inputs, grad_out = make_site(B, M, D, levels, Q, P, device, dtype)
        with torch.no_grad():  # every variant computes the same thing
            ref = grid_sample_baseline(*inputs)
            diffs = {n: (fn(*inputs) - ref).abs().max().item() for n, fn in variants.items()}
        stats = bench_site(variants, inputs, grad_out, args.runs, device, clock)
        base = stats["grid_sample (mmcv, BASELINE)"]
        for i, (name, s) in enumerate(stats.items()):
            label = f"{site}: {desc}" if i == 0 else (f"  B={B} Q={Q} P={P} L={len(levels)}"
                                                      if i == 1 else "")
            print(f"{label:<42}{name:<30}{s['fwd']:>9.1f}{s['fwdbwd']:>12.1f}"
                  f"{s['mem_fwd'] / 2**20:>14.1f}{s['mem_fwdbwd'] / 2**20:>14.1f}"
                  f"{s['fwdbwd'] / base['fwdbwd']:>13.2f}"
                  f"{s['mem_fwdbwd'] / max(base['mem_fwdbwd'], 1):>12.2f}")
        print(f"{'':<42}max |out - baseline|: "
              + ", ".join(f"{n.split(' (')[0]} {d:.1e}" for n, d in diffs.items()))
        ours = stats["fallback (ours)"]
        met = (max(ours["fwd"] / base["fwd"], ours["fwdbwd"] / base["fwdbwd"]) <= 1.1
               and ours["mem_fwd"] <= base["mem_fwd"] and ours["mem_fwdbwd"] <= base["mem_fwdbwd"])
        verdicts.append(f"{site}: fallback <= 1.1x baseline time and <= its memory: "
                        f"{'met' if met else 'NOT met'}")
        if "cpu kernel" in stats:
            k = stats["cpu kernel"]
            verdicts.append(f"{site}: cpu kernel {ours['fwdbwd'] / k['fwdbwd']:.1f}x faster than "
                            f"the fallback (fwd+bwd)")
        if "cuda kernel" in stats and site == "sca":
            k = stats["cuda kernel"]
            speedup = ours["fwdbwd"] / k["fwdbwd"]
            met = speedup >= 5 and k["mem_fwdbwd"] < ours["mem_fwdbwd"]
            verdicts.append(f"{site}: cuda kernel {speedup:.1f}x faster than the fallback "
                            f"(fwd+bwd, target >= 5x) and less memory: {'met' if met else 'NOT met'}")
    print("targets: " + "; ".join(verdicts))


if __name__ == "__main__":
    main()
