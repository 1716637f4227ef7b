"""What every file of the project shares, with no dependency beyond torch and numpy (so that
`import bevformer` works without nuscenes-devkit): the camera and class order, the one-line user error,
the loader's input options that model configs name, the one image resize, and checkpoint files.
"""
import os

import numpy as np
import torch
import torch.nn.functional as F

# README "Conventions": the order of the image stack, lidar2img and the camera embeddings; label indices
CAMERAS = ('CAM_FRONT', 'CAM_FRONT_RIGHT', 'CAM_FRONT_LEFT', 'CAM_BACK', 'CAM_BACK_LEFT', 'CAM_BACK_RIGHT')
CLASSES = ('car', 'truck', 'construction_vehicle', 'bus', 'trailer', 'barrier', 'motorcycle', 'bicycle',
           'pedestrian', 'traffic_cone')


class InputError(ValueError):
    """Bad user input (missing folder, wrong flag, corrupt file): the CLIs print `error: <message>`."""


# The loader's choices a model config names (data.View, DetectorConfig): how a camera image is decoded
# and resized (data.load_image), what fills can_bus[7:16] without the CAN-bus expansion, and how training
# draws the history frames of a queue (data.history_indices), or 'stream': no history frames are loaded,
# the previous BEV is the one the model made for the previous frame of the same scene a few iterations
# earlier (train.py `BEVStream`).
IMAGE_LOADING = ('official', 'fast')
CAN_BUS_FALLBACK = ('zeros', 'poses')
HISTORY_DRAW = ('random', 'previous', 'stream')


def streams(cfg):
    """True when a model config or a data.View is temporal (queue_length > 1) and trains with history_draw
    'stream' (no history frames; train.py's BEVStream carries the previous BEV over)."""
    return getattr(cfg, 'history_draw', None) == 'stream' and cfg.queue_length > 1


def cpu_has_bf16():
    """True where oneDNN runs bfloat16 natively on this CPU (AVX512-BF16 or AMX); elsewhere bfloat16 is
    emulated and --amp's bfloat16 image CNN on the CPU (`BEVFormer.cnn_bf16`) is slower than float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def keep_freed_memory():
    """Let glibc keep freed memory for reuse instead of handing large blocks back to the system.

    By default glibc serves big allocations with mmap and unmaps them when freed, so every large
    temporary of a CPU training step (spatial cross-attention's sampled values are ~16 MB each) comes
    back as fresh pages that the kernel must fault in and zero: ~9 % of a cpu-tiny step on the 2-core
    machine (docs/benchmarks.md). Raising the mmap and trim thresholds to 1 GiB keeps such blocks in the
    heap (what PyTorch's CPU tuning guide gets from jemalloc or tcmalloc). The numbers do not change.
    Linux with glibc only; elsewhere nothing happens. Returns True when the setting was made."""
    import ctypes
    import ctypes.util
    import sys
    if not sys.platform.startswith('linux'):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        mallopt = libc.mallopt
    except (OSError, AttributeError):        # musl and others: no mallopt
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3    # glibc's <malloc.h>
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def resize_images(img, size, antialias):
    """img float [..., 3, H, W] -> [..., 3, h, w] at size = (W, H): bilinear with half-pixel centres
    (pixel i at i + 0.5). antialias=False is mmcv's `imresize` (cv2 INTER_LINEAR) that the official
    pipeline applies to float images: each output pixel mixes its two nearest inputs per axis.
    antialias=True widens the filter by the scale when shrinking (no aliasing). One function for the
    loader, `predict` and the Distiller's downscale, so that all three make the same pixels."""
    W, H = int(size[0]), int(size[1])
    if tuple(img.shape[-2:]) == (H, W):
        return img
    x = img.reshape(-1, *img.shape[-3:])                        # [..., 3, H, W] -> [B', 3, H, W]
    x = F.interpolate(x, size=(H, W), mode='bilinear', align_corners=False, antialias=antialias)
    return x.view(*img.shape[:-2], H, W)                       # [..., 3, h, w]


# ------------------------------------------------------------------------------------------------
# Checkpoint files: read without running code, written atomically


def numpy_scalar_globals():
    """numpy's scalar reconstructor and its dtype classes: an mmcv checkpoint's `meta` may hold numpy
    scalars (an evaluation hook's best score, a seed). Exactly these are let through torch's weights_only
    unpickler (`load_weights_only`); arrays and everything else stay refused."""
    try:
        from numpy._core.multiarray import scalar
    except ImportError:                                             # numpy < 2
        from numpy.core.multiarray import scalar
    dtypes = {type(np.dtype(c)) for c in '?bBhHiIlLqQefdgFDG'}
    return [scalar, (scalar, 'numpy.core.multiarray.scalar'), (scalar, 'numpy._core.multiarray.scalar'),
            np.dtype, *sorted(dtypes, key=lambda t: t.__name__)]


def load_weights_only(path):
    """torch.load(path, weights_only=True) on the CPU, numpy scalars allowed (`numpy_scalar_globals`):
    a pickle that would build anything else raises pickle.UnpicklingError before any of its code runs."""
    with torch.serialization.safe_globals(numpy_scalar_globals()):
        return torch.load(path, map_location='cpu', weights_only=True)


def read_state_dict(path, expected='an official mmdet3d checkpoint .pth'):
    """The tensors of a checkpoint file, read with torch.load(weights_only=True) (no code runs).
    Accepts a bare state dict or one under 'state_dict' (mmcv) or 'model' (ours)."""
    try:
        obj = load_weights_only(path)
    except FileNotFoundError:
        raise InputError(f'{path}: no such file (expected {expected})')
    except Exception as e:
        raise InputError(f'{path}: not readable with torch.load(weights_only=True) ({type(e).__name__}); '
                         f'expected a checkpoint of plain tensors and builtins')
    state = obj
    for key in ('state_dict', 'model'):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise InputError(f'{path}: expected a dict of tensors, bare or under "state_dict" (mmcv) or "model"')
    return state


def save_checkpoint(obj, path):
    """torch.save to a temporary file, then os.replace: a crash never leaves half a checkpoint."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + '.tmp'
    torch.save(obj, tmp)
    os.replace(tmp, path)
