"""Multi-scale deformable attention: a CUDA kernel built on first use and an exact PyTorch fallback.

    from ops import ms_deform_attn, ms_deform_attn_pytorch

See ops/msda.py; `python -m ops.bench` prints the timing table, `python -m ops` builds the kernel.
"""
from .msda import ms_deform_attn, ms_deform_attn_pytorch

__all__ = ["ms_deform_attn", "ms_deform_attn_pytorch"]
