"""BEVFormer in plain PyTorch, in the order of the paper.

Paper: Li et al., "BEVFormer: Learning Bird's-Eye-View Representation from Multi-Camera Images via
Spatiotemporal Transformers", ECCV 2022. Official code: github.com/fundamentalvision/BEVFormer
(mmcv/mmdet3d). The data path: six camera images -> ResNet + FPN (backbone.py, shared with DETR3D) ->
BEV queries -> encoder layers of temporal self-attention (TSA) over the ego-motion-aligned previous BEV
and spatial cross-attention (SCA) into the cameras -> BEV features -> DETR-style decoder with iterative
box refinement -> heads -> Hungarian matching, focal + L1 losses; NMS-free decoding at test time.

Reading order (each section names the paper part it implements):
  1. BEV queries and the BEV grid (Sec. 3.2)          `bev_grid`, `bev_queries`, `can_bus_delta`
  2. Deformable attention, the shared building block  `msda`
  3. Temporal self-attention (Sec. 3.4, Eq. 5)        `align_prev_bev`, `TemporalSelfAttention`
  4. Spatial cross-attention (Sec. 3.3, Eq. 3-4)      `pillar_points`, `project_points`, `compact_cameras`,
                                                      `SpatialCrossAttention`
  5. The encoder (Sec. 3.2)                           `EncoderLayer`, `BEVEncoder`
  6. The decoder with iterative box refinement        `DecoderLayer`, `refine_boxes`
  7. The box code                                     `encode_boxes`, `decode_boxes`
  8. Matching and losses                              `hungarian_match_batch`, `sigmoid_focal_loss`
  9. Configuration                                    `DetectorConfig`, `BEVFormerConfig`
 10. The detector: forward, loss, decode, predict     `BEVFormer`
 11. Presets (official checkpoints, the paper's pairs, the CPU presets)   `PRESETS`
 12. Official checkpoints and the `convert` command   `load_official`
Every function takes the preset's config `cfg` (a BEVFormerConfig, section 9) where it needs sizes.

Where we differ from the official code (docs/official-differences.md has the whole list and why):
* Boxes use the nuScenes-native yaw (README "Conventions"); the official checkpoints' mmdet3d yaw
  (yaw' = -yaw - pi/2) is converted once, in `load_official`.
* `official_quirks=False` (our default; the official presets turn it on) fixes: the rotation of the
  previous BEV about (100, 100) for every BEV size, the aliased shift of both TSA reference halves,
  the TSA value that is not updated per layer, and the unwrapped yaw delta (359 -> 1 deg gives -358).
* The official code's batch-size-1 assumptions (TSA `value[:B]`, SCA index lists built from sample 0)
  are not kept even under `official_quirks`: at B = 1 they are what our per-sample code computes, at
  B > 1 they mix samples.
* Batches may mix samples with and without a previous BEV (the official code is all-or-none).
* No mmcv registries; the deformable attention is `ops.ms_deform_attn` (CUDA kernel or fallback).

Shape letters: B batch, T time, N cameras, C channels, Q queries (BEV cells or object queries),
M heads, L levels, P points, Z pillar anchors, H/W sizes, K boxes, S flattened feature tokens.
"""
import argparse
import math
import os
import sys
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from scipy.optimize import linear_sum_assignment

from common import (CAN_BUS_FALLBACK, HISTORY_DRAW, IMAGE_LOADING, InputError, read_state_dict, resize_images,
                    save_checkpoint)
from backbone import build_image_backbone, normalize_images
from ops import ms_deform_attn


# ---------------------------------------------------------------------------------------------
# 1. BEV queries and the BEV grid (paper Sec. 3.2; official `BEVFormerHead`, `get_bev_features`)
# ---------------------------------------------------------------------------------------------

def bev_grid(cfg, device, dtype=torch.float32):
    """Normalised (x, y) of the BEV cell centres [Q, 2], flat index q = h * W + w (column = x)."""
    ys, xs = torch.meshgrid((torch.arange(cfg.bev_h, device=device, dtype=dtype) + 0.5) / cfg.bev_h,
                            (torch.arange(cfg.bev_w, device=device, dtype=dtype) + 0.5) / cfg.bev_w, indexing='ij')
    return torch.stack([xs, ys], -1).view(-1, 2)                       # [H, W, 2] -> [Q, 2]


def can_bus_delta(can_bus, prev_can_bus, has_prev, wrap_angle=True):
    """Absolute can_bus [B, 18] -> BEVFormer's input: translation (0:3) and yaw in degrees (17) as
    deltas against the previous frame, zero without one (official `CustomNuScenesDataset.union2one`).
    The official code does not wrap the yaw delta (359 -> 1 deg gives -358): `wrap_angle=False`."""
    delta = can_bus.clone()
    d_pos = can_bus[:, :3] - prev_can_bus[:, :3]
    d_yaw = can_bus[:, 17] - prev_can_bus[:, 17]
    if wrap_angle:
        d_yaw = torch.remainder(d_yaw + 180.0, 360.0) - 180.0
    has = has_prev.to(can_bus.dtype)
    delta[:, :3] = d_pos * has[:, None]
    delta[:, 17] = d_yaw * has
    return delta


def make_positional_encoding(cfg):
    """The BEV queries' learned positional encoding (mmdet `LearnedPositionalEncoding`): a row and a
    column embedding of C/2 channels each (initialised uniformly by `BEVFormer.__init__`)."""
    pe = nn.Module()
    pe.row_embed = nn.Embedding(cfg.bev_h, cfg.embed_dims // 2)
    pe.col_embed = nn.Embedding(cfg.bev_w, cfg.embed_dims // 2)
    return pe


def make_can_bus_mlp(C):
    """The CAN-bus MLP: the 18 ego-motion values (`can_bus_delta`) -> C channels added to every BEV
    query (official `get_bev_features`). Keys '0', '2', 'norm' as in the official checkpoints."""
    return nn.Sequential(OrderedDict([
        ('0', nn.Linear(18, C // 2)), ('1', nn.ReLU(inplace=True)),
        ('2', nn.Linear(C // 2, C)), ('3', nn.ReLU(inplace=True)), ('norm', nn.LayerNorm(C))]))


def bev_queries(bev_embedding, positional_encoding, can_bus_mlp, can_delta, cfg):
    """The BEV queries of a batch (paper Sec. 3.2: one learnable query per BEV cell, flat index
    q = row * W + col) and their positional encoding.

    bev_embedding nn.Embedding [H*W, C]; can_delta [B, 18] (`can_bus_delta`) -> (x [B, Q, C], the
    queries plus the CAN-bus embedding when cfg.use_can_bus; pos [B, Q, C], first half the column
    (x) embedding, second half the row (y) embedding)."""
    B, H, W = can_delta.shape[0], cfg.bev_h, cfg.bev_w
    x = bev_embedding.weight[None].expand(B, -1, -1)                         # [B, Q, C]
    if cfg.use_can_bus:
        x = x + can_bus_mlp(can_delta.to(x.dtype))[:, None]                  # [B, 1, C] to every cell
    pe = positional_encoding
    pos = torch.cat([pe.col_embed.weight[None].expand(H, -1, -1),            # [H, W, C/2] column (x)
                     pe.row_embed.weight[:, None].expand(-1, W, -1)], -1)    # [H, W, C]
    pos = pos.view(1, H * W, -1).expand(B, -1, -1)                           # [B, Q, C]
    return x, pos


# ---------------------------------------------------------------------------------------------
# 2. Deformable attention (Deformable DETR), the building block of TSA, SCA and the decoder
# ---------------------------------------------------------------------------------------------

def msda(value, shapes, loc, attn):
    """`ops.ms_deform_attn` with the level start indices computed here.
    value [B, S, M, D]; shapes [L, 2] (h, w); loc [B, Q, M, L, P, 2]; attn [B, Q, M, L, P] -> [B, Q, M*D]."""
    start = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])   # [L]
    # outside autocast: the op computes half/bfloat16 inputs in fp32 (as the official fp32 wrapper;
    # sampling locations need the precision) and keeps float32/float64 as they are
    with torch.autocast(device_type=value.device.type, enabled=False):
        return ms_deform_attn(value, shapes, start, loc, attn)


def _init_deformable(attn, heads, groups, points):
    """Deformable-DETR init of a deformable attention's `sampling_offsets` (zero weights, biases pointing
    in `heads` directions, growing per point; the same for each of `groups` levels or queue slots) and
    `attention_weights` (zero: uniform weights at the start)."""
    linear = attn.sampling_offsets
    nn.init.zeros_(linear.weight)
    thetas = torch.arange(heads, dtype=torch.float32) * (2.0 * math.pi / heads)
    grid = torch.stack([thetas.cos(), thetas.sin()], -1)                 # [M, 2] one direction per head
    grid = grid / grid.abs().max(-1, keepdim=True)[0]
    grid = grid.view(heads, 1, 1, 2).repeat(1, groups, points, 1)        # [M, groups, P, 2]
    grid = grid * torch.arange(1, points + 1, dtype=torch.float32).view(1, 1, points, 1)   # point k at k + 1
    with torch.no_grad():
        linear.bias.copy_(grid.flatten())                                # [M * groups * P * 2], the layer's order
    nn.init.zeros_(attn.attention_weights.weight)
    nn.init.zeros_(attn.attention_weights.bias)


def _xavier(*linears):
    for m in linears:
        nn.init.xavier_uniform_(m.weight)
        nn.init.zeros_(m.bias)

# ---------------------------------------------------------------------------------------------
# 3. Temporal self-attention (paper Sec. 3.4, Eq. 5; official temporal_self_attention.py):
#    the previous BEV aligned with the ego motion, then deformable attention over (previous, current)
# ---------------------------------------------------------------------------------------------

def ego_shift(can_delta, cfg):
    """Ego translation since the previous frame in normalised BEV units [B, 2] (x, y) (official
    `get_bev_features`): the global delta is expressed in the current LIDAR_TOP frame using the
    absolute ego yaw (can_bus[16]); x = right, y = forward. A static point seen at p now was at
    p + shift in the previous frame (before its rotation, see `rotate_bev`)."""
    dx, dy = can_delta[:, 0], can_delta[:, 1]
    length = torch.sqrt(dx ** 2 + dy ** 2)
    trans_ang = torch.atan2(dy, dx)                                     # heading of the motion (global)
    bev_ang = can_delta[:, 16] - trans_ang                              # ego yaw - motion heading
    x0, y0, _, x1, y1, _ = cfg.pc_range
    shift_x = length * torch.sin(bev_ang) / (x1 - x0)
    shift_y = length * torch.cos(bev_ang) / (y1 - y0)
    return torch.stack([shift_x, shift_y], -1)                          # [B, 2]


def rotate_bev(bev, angle_deg, center):
    """Rotate BEV maps [B, C, H, W] by angle_deg [B] counter-clockwise (as displayed with row 0 on
    top) about `center` = (x, y) in pixel-edge units (pixel j spans [j, j + 1]); nearest neighbour,
    zero fill. This is torchvision's `rotate(x, angle, center=...)`, which the official code uses:
    output(p) = input(c + R(angle) (p - c)) with p = (column, row) of the pixel centre."""
    B, C, H, W = bev.shape
    a = torch.deg2rad(angle_deg.to(bev.dtype))[:, None, None]          # [B, 1, 1]
    ys, xs = torch.meshgrid(torch.arange(H, device=bev.device, dtype=bev.dtype) + 0.5,
                            torch.arange(W, device=bev.device, dtype=bev.dtype) + 0.5, indexing='ij')
    dx, dy = xs - center[0], ys - center[1]                              # [H, W]
    sx = center[0] + torch.cos(a) * dx - torch.sin(a) * dy               # [B, H, W] source column
    sy = center[1] + torch.sin(a) * dx + torch.cos(a) * dy               # [B, H, W] source row
    grid = torch.stack([2 * sx / W - 1, 2 * sy / H - 1], -1)            # [B, H, W, 2] align_corners=False units
    return F.grid_sample(bev, grid, mode='nearest', padding_mode='zeros', align_corners=False)


def align_prev_bev(prev_bev, can_delta, cfg):
    """Ego-motion alignment of the previous BEV (paper Sec. 3.4). prev_bev [B, Q, C] ->
    (rotated [B, Q, C], shift [B, 2]). TSA then samples the rotated map around ref + shift.
    The official code rotates about pixel (100, 100) for every BEV size (right only for 200x200;
    issue #96): kept under `official_quirks`, otherwise about the BEV centre."""
    B, Q, C = prev_bev.shape
    shift = ego_shift(can_delta, cfg) * float(cfg.use_shift)
    if not cfg.rotate_prev_bev:
        return prev_bev, shift
    center = (100.0, 100.0) if cfg.official_quirks else (cfg.bev_w / 2, cfg.bev_h / 2)
    bev = prev_bev.transpose(1, 2).reshape(B, C, cfg.bev_h, cfg.bev_w)   # [B, Q, C] -> [B, C, H, W]
    bev = rotate_bev(bev, can_delta[:, 17], center)                     # yaw delta in degrees
    return bev.flatten(2).transpose(1, 2), shift                        # [B, C, H, W] -> [B, Q, C]


class TemporalSelfAttention(nn.Module):
    """Deformable self-attention over the pair (aligned previous BEV, current BEV queries).

    Offsets and weights are predicted from [previous BEV, query + pos] (2C channels); the two queue
    slots are sampled separately (the pair is stacked along the batch) and averaged."""

    def __init__(self, C, heads, points, dropout):
        super().__init__()
        self.heads, self.points = heads, points
        self.sampling_offsets = nn.Linear(2 * C, heads * 2 * points * 2)
        self.attention_weights = nn.Linear(2 * C, heads * 2 * points)
        self.value_proj = nn.Linear(C, C)
        self.output_proj = nn.Linear(C, C)
        self.dropout = nn.Dropout(dropout)
        _init_deformable(self, heads, 2, points)
        _xavier(self.value_proj, self.output_proj)

    def sampling_points(self, x, pos, prev, ref_prev, ref_cur, bev_hw):
        """Where, and with which weights, each BEV query samples the two slots (evaluate.py draws them):
        loc [2B, Q, M, 1, P, 2] normalised (x, y) and aw [2B, Q, M, 1, P], row b * 2 + t (t = 0: the
        aligned previous BEV, t = 1: the current queries). Inputs as `forward`."""
        B, Q, C = x.shape
        M, P = self.heads, self.points
        H, W = bev_hw
        # official: cat([value[:B], query]) with value's rows ordered b * 2 + t, so value[:B] is every
        # sample's previous BEV only at B = 1 (issue #96); that is `prev` itself, which we use at any B
        q = torch.cat([prev, x + pos], -1)                                # [B, Q, 2C]
        off = self.sampling_offsets(q).view(B, Q, M, 2, 1, P, 2)          # [B, Q, M, slot, level, P, xy]
        # softmax over the P points of each slot: each queue slot is a separate attention, averaged below
        aw = self.attention_weights(q).view(B, Q, M, 2, P).softmax(-1).view(B, Q, M, 2, 1, P)
        # the two slots into the batch, row b * 2 + t as `value`: [2B, Q, M, 1, P, 2] and [2B, Q, M, 1, P]
        off = off.permute(0, 3, 1, 2, 4, 5, 6).reshape(2 * B, Q, M, 1, P, 2)
        aw = aw.permute(0, 3, 1, 2, 4, 5).reshape(2 * B, Q, M, 1, P)
        ref = torch.stack([ref_prev, ref_cur], 1).flatten(0, 1)          # [2B, Q, 2]
        return ref[:, :, None, None, None, :] + off / off.new_tensor([W, H]), aw

    def forward(self, x, pos, prev, cur, ref_prev, ref_cur, bev_hw):
        """x [B, Q, C] layer input; pos [B, Q, C]; prev/cur [B, Q, C] the two value slots;
        ref_prev/ref_cur [B, Q, 2] normalised (x, y). Returns [B, Q, C]."""
        B, Q, C = x.shape
        H, W = bev_hw
        value = torch.stack([prev, cur], 1).flatten(0, 1)                 # [2B, Q, C], row b*2 + t
        v = self.value_proj(value).view(2 * B, Q, self.heads, C // self.heads)   # [2B, Q, M, C/M]
        loc, aw = self.sampling_points(x, pos, prev, ref_prev, ref_cur, bev_hw)
        shapes = torch.tensor([[H, W]], device=x.device)
        out = msda(v, shapes, loc, aw)                                    # [2B, Q, C]
        out = out.view(B, 2, Q, C).mean(1)                                # [2B, Q, C] -> [B, Q, C]: mean of the slots
        return self.dropout(self.output_proj(out)) + x

# ---------------------------------------------------------------------------------------------
# 4. Spatial cross-attention (paper Sec. 3.3, Eq. 3-4; official spatial_cross_attention.py):
#    pillars of Z anchors per BEV cell, projected into the cameras they hit
# ---------------------------------------------------------------------------------------------

def pillar_points(cfg, device, dtype=torch.float32):
    """Metric 3D reference points of every pillar [Z, Q, 3] in the LIDAR_TOP frame (paper Sec. 3.3:
    each BEV query is lifted to Z anchors; official `get_reference_points('3d')`)."""
    x0, y0, z0, x1, y1, z1 = cfg.pc_range
    zs = torch.linspace(0.5, (z1 - z0) - 0.5, cfg.num_z, device=device, dtype=dtype) / (z1 - z0)  # normalised
    xy = bev_grid(cfg, device, dtype)                                                 # [Q, 2]
    ref = torch.cat([xy[None].expand(cfg.num_z, -1, -1),                              # [Z, Q, 2]
                     zs[:, None, None].expand(-1, xy.shape[0], 1)], -1)               # [Z, Q, 3]
    lo = ref.new_tensor([x0, y0, z0])
    return ref * ref.new_tensor([x1 - x0, y1 - y0, z1 - z0]) + lo


def project_points(points, lidar2img, pad_hw, eps=1e-5):
    """Project metric LIDAR_TOP points into every camera (official `point_sampling`, at least in fp32:
    float64 inputs stay float64, half precision is never used).

    points [Z, Q, 3]; lidar2img [B, N, 4, 4]; pad_hw: (H, W) of the padded image tensor.
    Returns uv [N, B, Q, Z, 2] normalised by the padded size (0..1 inside the image) and
    mask [N, B, Q, Z]: in front of the camera and strictly inside the image."""
    dt = torch.float64 if torch.float64 in (points.dtype, lidar2img.dtype) else torch.float32
    with torch.autocast(device_type=points.device.type, enabled=False):
        pts = torch.cat([points.to(dt), points.new_ones(*points.shape[:-1], 1, dtype=dt)], -1)   # [Z, Q, 4] homogeneous
        cam = torch.einsum('bnij,zqj->nbqzi', lidar2img.to(dt), pts)               # [N, B, Q, Z, 4]
        front = cam[..., 2] > eps
        uv = cam[..., :2] / cam[..., 2:3].clamp(min=eps)
        uv = uv / uv.new_tensor([pad_hw[1], pad_hw[0]])
        mask = front & (uv[..., 0] > 0) & (uv[..., 0] < 1) & (uv[..., 1] > 0) & (uv[..., 1] < 1)
    return torch.nan_to_num(uv), mask


def compact_cameras(uv, mask):
    """Per (sample, camera), the BEV queries whose pillar has at least one anchor in the image.

    uv [N, B, Q, Z, 2], mask [N, B, Q, Z] from `project_points`. Returns a dict with
    idx [B, N, R] query indices (hit ones first, R = the largest count), valid [B, N, R],
    ref [B*N, R, Z, 2] their projected anchors, count [B, Q] cameras hit (>= 1).
    The official code builds the index lists from sample 0 only, which is right only at B = 1 (there
    it is what we compute); we build them per sample."""
    N, B, Q, Z = mask.shape
    hit = mask.any(-1)                                                    # [N, B, Q]
    n_sel = hit.sum(-1)                                                   # [N, B]
    R = max(int(n_sel.max()), 1)
    order = torch.argsort((~hit).to(torch.uint8), dim=-1, stable=True)[..., :R]   # [N, B, R]
    valid = torch.arange(R, device=uv.device) < n_sel[..., None]           # [N, B, R]
    idx = order.transpose(0, 1).contiguous()                              # [B, N, R]
    ref = uv.transpose(0, 1).gather(2, idx[..., None, None].expand(-1, -1, -1, Z, 2))  # [B, N, R, Z, 2]
    count = hit.sum(0).clamp(min=1).to(uv.dtype)                          # [B, Q]
    # valid [N, B, R] -> [B, N, R]; ref [B, N, R, Z, 2] -> [B*N, R, Z, 2] (one attention batch row per camera)
    return {'idx': idx, 'valid': valid.transpose(0, 1).contiguous().to(uv.dtype), 'ref': ref.flatten(0, 1),
            'count': count}


class MSDeformableAttention3D(nn.Module):
    """Deformable attention in one camera around the Z projected anchors of a pillar: the P points
    are grouped as P/Z points around each anchor; point k uses anchor k mod Z. No output_proj."""

    def __init__(self, C, heads, levels, points, num_z):
        super().__init__()
        self.heads, self.levels, self.points, self.num_z = heads, levels, points, num_z
        self.sampling_offsets = nn.Linear(C, heads * levels * points * 2)
        self.attention_weights = nn.Linear(C, heads * levels * points)
        self.value_proj = nn.Linear(C, C)
        _init_deformable(self, heads, levels, points)
        _xavier(self.value_proj)

    def forward(self, query, value, ref, shapes):
        """query [B', Q', C]; value [B', S, C]; ref [B', Q', Z, 2] normalised image points;
        shapes [L, 2]. Returns ([B', Q', C], loc [B', Q', M, L, P, 2], attn [B', Q', M, L, P])."""
        Bp, Qp, C = query.shape
        M, L, P, Z = self.heads, self.levels, self.points, self.num_z
        v = self.value_proj(value).view(Bp, -1, M, C // M)                           # [B', S, M, C/M]
        wh = torch.stack([shapes[:, 1], shapes[:, 0]], -1).to(query.dtype)           # [L, 2] (w, h)
        off = self.sampling_offsets(query).view(Bp, Qp, M, L, P, 2) / wh[:, None, :]  # pixels -> normalised
        # softmax over all levels and points of a head together: [B', Q', M, L*P] -> [B', Q', M, L, P]
        aw = self.attention_weights(query).view(Bp, Qp, M, L * P).softmax(-1).view(Bp, Qp, M, L, P)
        off = off.view(Bp, Qp, M, L, P // Z, Z, 2)                                  # point k -> anchor k mod Z
        loc = (ref[:, :, None, None, None, :, :] + off).view(Bp, Qp, M, L, P, 2)   # [B', Q', M, L, P, 2]
        return msda(v, shapes, loc, aw), loc, aw


class SpatialCrossAttention(nn.Module):
    """Each BEV query attends to the cameras its pillar projects into, and the results are averaged
    over the cameras hit (paper Eq. 4). As the official code, each camera processes only the BEV
    cells that project into it ("compaction": gather, attend, scatter back)."""

    def __init__(self, C, heads, levels, points, num_z, dropout):
        super().__init__()
        self.deformable_attention = MSDeformableAttention3D(C, heads, levels, points, num_z)
        self.output_proj = nn.Linear(C, C)
        self.dropout = nn.Dropout(dropout)
        _xavier(self.output_proj)

    def forward(self, x, feats, shapes, cams):
        """x [B, Q, C]; feats [B, N, S, C]; cams: `compact_cameras` output. Returns [B, Q, C]."""
        B, Q, C = x.shape
        N, S = feats.shape[1], feats.shape[2]
        idx, valid, ref, count = cams['idx'], cams['valid'], cams['ref'], cams['count']
        R = idx.shape[-1]
        q = x.gather(1, idx.view(B, N * R, 1).expand(-1, -1, C)).view(B * N, R, C)   # [B*N, R, C]
        out, _, _ = self.deformable_attention(q, feats.reshape(B * N, S, C), ref, shapes)   # [B*N, R, C]
        out = out.view(B, N * R, C) * valid.view(B, N * R, 1)             # [B, N*R, C], padding rows zeroed
        slots = torch.zeros_like(x).scatter_add(1, idx.view(B, N * R, 1).expand(-1, -1, C), out)   # [B, Q, C] sum
        slots = slots / count[..., None]                                  # mean over cameras hit
        return self.dropout(self.output_proj(slots)) + x

# ---------------------------------------------------------------------------------------------
# 5. Encoder (paper Sec. 3.2; official encoder.py): TSA -> LN -> SCA -> LN -> FFN -> LN, post-norm
# ---------------------------------------------------------------------------------------------

class FFN(nn.Module):
    """x + Drop(fc2(Drop(ReLU(fc1(x)))))."""

    def __init__(self, C, hidden, dropout):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(C, hidden), nn.Linear(hidden, C)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        """x [B, Q, C] -> [B, Q, C] (with the residual)."""
        return x + self.dropout(self.fc2(self.dropout(F.relu(self.fc1(x)))))


class EncoderLayer(nn.Module):
    """One BEVFormer encoder layer (paper Fig. 2): TSA -> LN -> SCA -> LN -> FFN -> LN."""

    def __init__(self, cfg):
        super().__init__()
        C = cfg.embed_dims
        self.tsa = TemporalSelfAttention(C, cfg.num_heads, cfg.tsa_points, cfg.dropout)
        self.sca = SpatialCrossAttention(C, cfg.num_heads, cfg.fpn_levels, cfg.sca_points,
                                         cfg.num_z, cfg.dropout)
        self.ffn = FFN(C, cfg.ffn_dims, cfg.dropout)
        self.norms = nn.ModuleList(nn.LayerNorm(C) for _ in range(3))

    def forward(self, x, pos, prev, cur, ref_prev, ref_cur, bev_hw, feats, shapes, cams):
        """x, pos [B, Q, C]; prev/cur [B, Q, C] TSA's value slots, ref_prev/ref_cur [B, Q, 2] their
        reference points; feats [B, N, S, C] camera features with shapes [L, 2]; cams the per-camera
        BEV cells (`compact_cameras`). Returns [B, Q, C]."""
        x = self.norms[0](self.tsa(x, pos, prev, cur, ref_prev, ref_cur, bev_hw))
        x = self.norms[1](self.sca(x, feats, shapes, cams))
        return self.norms[2](self.ffn(x))


class BEVEncoder(nn.Module):
    """enc_layers encoder layers; decides what TSA attends to in each layer (history or not, quirk 4)."""

    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_layers))

    def forward(self, x, pos, prev, has_prev, ref_prev, ref_cur, bev_hw, feats, shapes, cams, quirks):
        """x [B, Q, C] BEV queries (+ CAN bus); prev [B, Q, C] aligned previous BEV (ignored where
        has_prev [B] is False). Returns the BEV features [B, Q, C] (no final norm)."""
        x0 = x
        hp = has_prev[:, None, None]
        for layer in self.layers:
            # without history the official TSA attends to (x, x): the pair is the layer's input
            prev_slot = torch.where(hp, prev, x)
            # quirk 4: with history the official "current" slot stays the encoder input x0
            cur_slot = torch.where(hp, x0, x) if quirks else x
            x = layer(x, pos, prev_slot, cur_slot, ref_prev, ref_cur, bev_hw, feats, shapes, cams)
        return x

# ---------------------------------------------------------------------------------------------
# 6. Decoder with iterative box refinement (official decoder.py; Deformable DETR Sec. 4.2)
# ---------------------------------------------------------------------------------------------

def inverse_sigmoid(x, eps=1e-5):
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def object_queries(query_embedding, reference_points, B):
    """The learned object queries (official `PerceptionTransformer`): the embedding's halves are the positional and
    content parts -> (pos [B, Q, C], content [B, Q, C], reference points [B, Q, 3] normalised to pc_range)."""
    pos, x = query_embedding.weight.split(query_embedding.weight.shape[1] // 2, -1)   # [Q, C] each
    pos, x = pos[None].expand(B, -1, -1), x[None].expand(B, -1, -1)                   # [B, Q, C] each
    return pos, x, reference_points(pos).sigmoid()


class CustomMSDeformableAttention(nn.Module):
    """Object queries attend to the BEV features around their reference point (1 level)."""

    def __init__(self, C, heads, points, dropout):
        super().__init__()
        self.heads, self.points = heads, points
        self.sampling_offsets = nn.Linear(C, heads * points * 2)
        self.attention_weights = nn.Linear(C, heads * points)
        self.value_proj = nn.Linear(C, C)
        self.output_proj = nn.Linear(C, C)
        self.dropout = nn.Dropout(dropout)
        _init_deformable(self, heads, 1, points)
        _xavier(self.value_proj, self.output_proj)

    def forward(self, x, pos, bev, ref, bev_hw):
        """x, pos [B, Q, C]; bev [B, H*W, C]; ref [B, Q, 2]. Returns (out [B, Q, C],
        loc [B, Q, M, 1, P, 2], attn [B, Q, M, 1, P])."""
        B, Q, C = x.shape
        M, P = self.heads, self.points
        H, W = bev_hw
        q = x + pos
        v = self.value_proj(bev).view(B, -1, M, C // M)                   # [B, H*W, M, C/M]
        off = self.sampling_offsets(q).view(B, Q, M, 1, P, 2)             # [B, Q, M, 1 level, P, 2] in cells
        aw = self.attention_weights(q).view(B, Q, M, P).softmax(-1).view(B, Q, M, 1, P)   # [B, Q, M, 1, P]
        loc = ref[:, :, None, None, None, :] + off / off.new_tensor([W, H])
        shapes = torch.tensor([[H, W]], device=x.device)
        out = msda(v, shapes, loc, aw)
        return self.dropout(self.output_proj(out)) + x, loc, aw


class DecoderLayer(nn.Module):
    """self-attn -> LN -> cross-attn over the BEV -> LN -> FFN -> LN (mmdet DetrTransformerDecoderLayer).

    `cross_attn` (default: CustomMSDeformableAttention over the BEV) may be another module with the
    same contract, forward(x, pos, *cross_args) -> (x, *extras): DETR3D passes its Detr3DCrossAtten."""

    def __init__(self, cfg, cross_attn=None):
        super().__init__()
        C = cfg.embed_dims
        self.self_attn = nn.MultiheadAttention(C, cfg.num_heads, dropout=cfg.dropout, batch_first=True)
        self.self_attn_drop = nn.Dropout(cfg.dropout)
        self.cross_attn = (cross_attn if cross_attn is not None else
                           CustomMSDeformableAttention(C, cfg.num_heads, cfg.dec_points, cfg.dropout))
        self.ffn = FFN(C, cfg.ffn_dims, cfg.dropout)
        self.norms = nn.ModuleList(nn.LayerNorm(C) for _ in range(3))

    def forward(self, x, pos, *cross_args):
        """x, pos [B, Q, C] object queries and their positional part; BEVFormer's cross_args =
        (bev [B, H*W, C], ref [B, Q, 2], bev_hw) -> (x [B, Q, C], loc [B, Q, M, 1, P, 2], aw [B, Q, M, 1, P])."""
        q = x + pos
        x = self.norms[0](x + self.self_attn_drop(self.self_attn(q, q, x, need_weights=False)[0]))
        x, *extras = self.cross_attn(x, pos, *cross_args)
        x = self.norms[1](x)
        return (self.norms[2](self.ffn(x)), *extras)


def refine_boxes(t, ref, pc_range):
    """Iterative box refinement (Deformable DETR Sec. 4.2; official `DetectionTransformerDecoder`): the regression
    t [B, Q, 10] of a layer whose INPUT reference was ref [B, Q, 3] (normalised to pc_range) ->
    (box [B, Q, 10] code with metric centres, the next reference [B, Q, 3], not yet detached)."""
    x0, y0, z0, x1, y1, z1 = pc_range
    r = inverse_sigmoid(ref)
    cxy = (t[..., 0:2] + r[..., 0:2]).sigmoid()
    cz = (t[..., 4:5] + r[..., 2:3]).sigmoid()
    box = torch.cat([cxy[..., 0:1] * (x1 - x0) + x0, cxy[..., 1:2] * (y1 - y0) + y0,        # [B, Q, 10]
                     t[..., 2:4], cz * (z1 - z0) + z0, t[..., 5:10]], -1)           # metric centres
    return box, torch.cat([cxy, cz], -1)                                          # next ref [B, Q, 3]


def cls_branch(C, num_classes):
    """Linear -> LN -> ReLU -> Linear -> LN -> ReLU -> Linear (indices 0..6 as in the checkpoints)."""
    m = nn.Sequential(nn.Linear(C, C), nn.LayerNorm(C), nn.ReLU(inplace=True),
                      nn.Linear(C, C), nn.LayerNorm(C), nn.ReLU(inplace=True), nn.Linear(C, num_classes))
    nn.init.constant_(m[-1].bias, -math.log((1 - 0.01) / 0.01))     # prior probability 0.01
    return m


def reg_branch(C):
    """Linear -> ReLU -> Linear -> ReLU -> Linear(C, 10) (indices 0, 2, 4)."""
    return nn.Sequential(nn.Linear(C, C), nn.ReLU(inplace=True), nn.Linear(C, C), nn.ReLU(inplace=True),
                         nn.Linear(C, 10))

# ---------------------------------------------------------------------------------------------
# 7. Box code (README "Conventions"): [x, y, z, w, l, h, yaw, vx, vy] <-> regression code
# ---------------------------------------------------------------------------------------------

def encode_boxes(boxes):
    """[..., 9] boxes -> [..., 10] code (cx, cy, log w, log l, cz, log h, sin yaw, cos yaw, vx, vy);
    metric centres (official `normalize_bbox`, which does not normalise the centres)."""
    x, y, z, w, l, h, yaw, vx, vy = boxes.unbind(-1)
    return torch.stack([x, y, w.log(), l.log(), z, h.log(), yaw.sin(), yaw.cos(), vx, vy], -1)   # [..., 10]


def decode_boxes(code):
    """[..., 10] code -> [..., 9] boxes [x, y, z, w, l, h, yaw, vx, vy] (centre z, nuScenes wlh)."""
    cx, cy, lw, ll, cz, lh, s, c, vx, vy = code.unbind(-1)
    return torch.stack([cx, cy, cz, lw.exp(), ll.exp(), lh.exp(), torch.atan2(s, c), vx, vy], -1)   # [..., 9]


def official_yaw_to_ours(yaw_official):
    """mmdet3d < 1.0 LiDAR yaw' -> nuScenes-native yaw: yaw = -yaw' - pi/2 (docs/official-differences.md)."""
    return -yaw_official - math.pi / 2


def convert_official_reg_rows(weight):
    """Rows (sin yaw', cos yaw') of an official final regression layer -> our (sin yaw, cos yaw):
    sin yaw = -cos yaw', cos yaw = -sin yaw'. Works for the weight [10, C] and the bias [10]."""
    out = weight.clone()
    out[6], out[7] = -weight[7], -weight[6]
    return out

# ---------------------------------------------------------------------------------------------
# 8. Hungarian matching and losses (official HungarianAssigner3D, bevformer_head.loss_single)
# ---------------------------------------------------------------------------------------------

def focal_cost(cls_logits, labels, alpha=0.25, gamma=2.0, eps=1e-12):
    """FocalLossCost: cost [Q, K] of assigning each query to each GT label."""
    p = cls_logits.sigmoid()
    neg = -(1 - p + eps).log() * (1 - alpha) * p.pow(gamma)
    pos = -(p + eps).log() * alpha * (1 - p).pow(gamma)
    return pos[:, labels] - neg[:, labels]


def match_cost(cls_logits, box_code, gt_boxes, gt_labels, cls_weight=2.0, reg_weight=0.25,
               alpha=0.25, gamma=2.0):
    """C = w_cls * focal cost + w_reg * L1(pred[:, :8], target[:, :8]) [Q, K] (no velocity, no IoU)."""
    target = encode_boxes(gt_boxes.to(box_code.dtype))
    cost = (cls_weight * focal_cost(cls_logits, gt_labels, alpha, gamma)
            + reg_weight * torch.cdist(box_code[:, :8], target[:, :8], p=1))
    return torch.nan_to_num(cost, nan=100.0, posinf=100.0, neginf=-100.0)


@torch.no_grad()
def hungarian_match(cls_logits, box_code, gt_boxes, gt_labels, **weights):
    """One sample: cls_logits [Q, 10], box_code [Q, 10], gt_boxes [K, 9], gt_labels [K] ->
    (pred_idx, gt_idx) LongTensors of the optimal assignment (scipy linear_sum_assignment)."""
    if gt_boxes.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.long, device=cls_logits.device)
        return empty, empty.clone()
    cost = match_cost(cls_logits.float(), box_code.float(), gt_boxes, gt_labels, **weights)
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    dev = cls_logits.device
    return torch.as_tensor(rows, dtype=torch.long, device=dev), torch.as_tensor(cols, dtype=torch.long, device=dev)


@torch.no_grad()
def hungarian_match_batch(cls_logits, box_code, gt_boxes, gt_labels, **weights):
    """Batched variant (as DETR): one cost matrix [B*Q, sum K], split per sample, then solved.
    cls_logits/box_code [B, Q, 10]; gt_boxes/gt_labels lists. Returns a list of (pred_idx, gt_idx)."""
    B, Q, _ = cls_logits.shape
    sizes = [int(g.shape[0]) for g in gt_boxes]
    if sum(sizes) == 0:
        return [hungarian_match(cls_logits[b], box_code[b], gt_boxes[b], gt_labels[b]) for b in range(B)]
    cost = match_cost(cls_logits.flatten(0, 1).float(), box_code.flatten(0, 1).float(),   # [B*Q, 10] each
                      torch.cat(list(gt_boxes)), torch.cat(list(gt_labels)), **weights)
    cost = cost.view(B, Q, -1).cpu()                                          # [B, Q, sum K]
    out = []
    for b, c in enumerate(cost.split(sizes, -1)):
        rows, cols = linear_sum_assignment(c[b].numpy())
        dev = cls_logits.device
        out.append((torch.as_tensor(rows, dtype=torch.long, device=dev),
                    torch.as_tensor(cols, dtype=torch.long, device=dev)))
    return out


def sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0):
    """Element-wise sigmoid focal loss (Lin et al. 2017), not reduced."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction='none')
    pt = (1 - p) * targets + p * (1 - targets)
    return ce * (alpha * targets + (1 - alpha) * (1 - targets)) * pt.pow(gamma)


def _num_pos_average(n, device):
    """Positives per process averaged over processes (official reduce_mean), at least 1."""
    n = torch.tensor(float(n), device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(n)
        n = n / torch.distributed.get_world_size()
    return n.clamp(min=1.0)

# ---------------------------------------------------------------------------------------------
# 9. Configuration (flat fields, so that `train.py --set key=value` can override any of them)
# ---------------------------------------------------------------------------------------------

@dataclass
class DetectorConfig:
    """The fields both detectors share (DETR3DConfig in detr3d.py extends this class too): input, image
    backbone and neck, the transformer's width, loss and matching, decoding."""
    name: str = ''
    detector: str = ''
    # input: content size (W, H) the images are resized to, zero-padded to a multiple of `pad_to`
    image_size: tuple = (200, 113)
    pad_to: int = 32
    normalisation: str = 'rgb'     # 'rgb': ImageNet mean/std on RGB (Tiny); 'caffe': BGR, mean only
    # how the loader decodes and resizes (data.load_image): 'official' = full decode, bilinear without
    # antialiasing (mmcv); 'fast' = JPEG draft decode where exact, antialiased bilinear (CPU presets)
    image_loading: str = 'fast'
    photometric: bool = False      # PhotoMetricDistortion in training (official recipes: on)
    # can_bus[7:16] without CAN-bus data: 'zeros' (official converter) or 'poses' (from the ego poses)
    can_bus_fallback: str = 'poses'
    queue_length: int = 1          # frames per training sample (1 = no history)
    num_cams: int = 6
    num_classes: int = 10
    # image backbone and neck
    backbone_depth: int = 18
    backbone_style: str = 'pytorch'
    backbone_width: int = 64       # 64 = the standard ResNet
    backbone_dcn: bool = False     # DCNv2 in stages 3 and 4 (Small/Base, DETR3D R101)
    backbone_out: tuple = (3,)     # out_indices, 0..3 = C2..C5
    frozen_stages: int = 1         # 1: stem + layer1 frozen (official, pretrained); -1: nothing frozen
    backbone_norm_eval: bool = True   # BatchNorm on running statistics (official, pretrained)
    backbone_bn_frozen: bool = True   # BatchNorm affine not trained (official, pretrained)
    backbone_norm: str = 'bn'         # 'bn' BatchNorm (official) or 'gn' GroupNorm (from scratch; docs/experiments.md)
    with_cp: bool = False          # gradient checkpointing in the backbone (official Small)
    # NHWC memory layout for the image CNN: the same numbers, faster CPU (oneDNN) convolutions
    # (backbone + FPN 11-25 % faster on the 2-core CPU, a whole step ~4 %; docs/benchmarks.md)
    channels_last: bool = True
    fpn_levels: int = 1            # FPN outputs L (extra stride-2 levels when > len(backbone_out))
    grid_mask: bool = True
    grid_mask_prob: float = 0.7
    # transformer width, detection range, object queries
    embed_dims: int = 256
    ffn_dims: int = 512
    num_heads: int = 8
    dropout: float = 0.1
    pc_range: tuple = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)
    dec_layers: int = 6
    num_query: int = 900
    # loss and matching (official `BEVFormerHead.loss`; identical for DETR3D)
    cls_weight: float = 2.0
    bbox_weight: float = 0.25
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    code_weights: tuple = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.2)
    # NMS-free decoding (official `NMSFreeCoder`)
    max_num: int = 300
    post_center_range: tuple = (-61.2, -61.2, -10.0, 61.2, 61.2, 10.0)

    def checks(self):
        """(ok, message) pairs checked after construction; each detector adds its own."""
        return [
            (self.normalisation in ('rgb', 'caffe'),
             f"normalisation must be 'rgb' or 'caffe', got {self.normalisation!r}"),
            (self.image_loading in IMAGE_LOADING,
             f"image_loading must be one of {', '.join(IMAGE_LOADING)}, got {self.image_loading!r}"),
            (self.can_bus_fallback in CAN_BUS_FALLBACK,
             f"can_bus_fallback must be one of {', '.join(CAN_BUS_FALLBACK)}, got {self.can_bus_fallback!r}"),
            (self.backbone_style in ('pytorch', 'caffe'), "backbone_style must be 'pytorch' or 'caffe'"),
            (self.backbone_norm in ('bn', 'gn'), f"backbone_norm must be 'bn' or 'gn', got {self.backbone_norm!r}"),
            (self.embed_dims % self.num_heads == 0, 'embed_dims must be divisible by num_heads'),
            (self.fpn_levels >= len(self.backbone_out), 'fpn_levels must be >= len(backbone_out)'),
            (len(self.image_size) == 2 and len(self.pc_range) == 6, 'image_size is (W, H), pc_range has 6 values'),
            (self.queue_length >= 1 and 1 <= self.num_cams <= 6, 'queue_length >= 1 and 1 to 6 cameras'),
        ]

    def __post_init__(self):
        for f in fields(self):                   # checkpoints may hand tuples back as lists
            v = getattr(self, f.name)
            if isinstance(v, list):
                setattr(self, f.name, tuple(v))
        for ok, msg in self.checks():
            if not ok:
                raise InputError(f'config {self.name}: {msg}')

    @property
    def padded_size(self):
        """(W, H) of the image tensor after zero padding to a multiple of `pad_to`."""
        W, H = self.image_size
        return (-(-W // self.pad_to) * self.pad_to, -(-H // self.pad_to) * self.pad_to)


@dataclass
class BEVFormerConfig(DetectorConfig):
    name: str = 'cpu-tiny'
    detector: str = 'bevformer'
    queue_length: int = 3          # frames per training sample (1 = no history)
    # training history: 'random' = BEVFormer's T-1 of the previous T frames; 'previous' = the T-1 frames
    # just before, as at test time (with T = 2 the random draw makes the gap 0.5 s or 1 s at random;
    # on the synthetic world 'previous' nevertheless scored lower: docs/experiments.md); 'stream' (ours,
    # not the paper's) = no history frame is run: train.py walks `stream_lanes` scenes frame by frame in
    # turn and hands each frame the BEV its scene's previous frame got, without gradient, as the test-time
    # chain does (docs/official-differences.md). With queue_length 1 (single frame) none applies.
    history_draw: str = 'random'
    stream_lanes: int = 32         # history_draw 'stream': scenes in flight per batch slot, in turn (4 trained worse)
    stream_warmup: float = 0.0     # history_draw 'stream': this fraction of the run first, shuffled, no previous BEV
                                   # (at 0.75 the model hardly used its previous BEV: docs/experiments.md)
    # BEV encoder and the decoder's BEV cross-attention
    bev_h: int = 50
    bev_w: int = 50
    num_z: int = 4                 # pillar anchors per BEV cell
    enc_layers: int = 3
    tsa_points: int = 4
    sca_points: int = 8            # split evenly over the Z anchors (2 per anchor officially)
    dec_points: int = 4
    use_can_bus: bool = True
    use_shift: bool = True
    rotate_prev_bev: bool = True
    official_quirks: bool = False  # reproduce the official code's quirks (docs/official-differences.md)

    def checks(self):
        return super().checks() + [
            (self.detector == 'bevformer', f"detector must be 'bevformer', got {self.detector!r}"),
            (self.sca_points % self.num_z == 0, 'sca_points must be a multiple of num_z'),
            (self.history_draw in HISTORY_DRAW, f"history_draw must be one of {', '.join(HISTORY_DRAW)}"),
            (self.stream_lanes >= 1, f'stream_lanes must be >= 1, got {self.stream_lanes}'),
            (0.0 <= self.stream_warmup < 1.0, f'stream_warmup must be in [0, 1), got {self.stream_warmup}'),
        ]

# ---------------------------------------------------------------------------------------------
# 10. The detector: images -> BEV -> boxes; training forward, loss, decoding, one-sample predict
# ---------------------------------------------------------------------------------------------

class BEVFormer(nn.Module):
    # --amp on the CPU (train.py, evaluate.py --speed/--bench) sets this: the image CNN alone runs under
    # bfloat16 autocast (~20 % off a whole temporal cpu-tiny run where the CPU has bfloat16 units; not the
    # default: one of its five runs spiked at the peak lr, docs/experiments.md); with the whole forward in
    # bfloat16 the single-frame run's mAOE rose from 0.62 to 0.93 (docs/benchmarks.md)
    cnn_bf16 = False

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        C = cfg.embed_dims
        # image backbone and neck (backbone.py)
        self.backbone, self.neck, self.grid_mask = build_image_backbone(cfg)
        # BEV queries, learned positional encoding, camera/level embeddings, CAN bus MLP (sections 1, 4)
        self.bev_embedding = nn.Embedding(cfg.bev_h * cfg.bev_w, C)
        self.positional_encoding = make_positional_encoding(cfg)
        self.level_embeds = nn.Parameter(torch.randn(max(4, cfg.fpn_levels), C))   # 4 rows officially
        self.cams_embeds = nn.Parameter(torch.randn(6, C))
        self.can_bus_mlp = make_can_bus_mlp(C)
        self.encoder = BEVEncoder(cfg)
        # object queries (position half, content half), reference points, decoder, heads (section 6)
        self.query_embedding = nn.Embedding(cfg.num_query, 2 * C)
        self.reference_points = nn.Linear(C, 3)
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_layers))
        self.cls_branches = nn.ModuleList(cls_branch(C, cfg.num_classes) for _ in range(cfg.dec_layers))
        self.reg_branches = nn.ModuleList(reg_branch(C) for _ in range(cfg.dec_layers))
        nn.init.uniform_(self.positional_encoding.row_embed.weight)   # mmdet LearnedPositionalEncoding
        nn.init.uniform_(self.positional_encoding.col_embed.weight)
        _xavier(self.reference_points)

    # ---- images -> multi-camera FPN features ------------------------------------------------
    def extract_feats(self, img, img_shape):
        """img [B, N, 3, Hp, Wp] RGB 0..255; img_shape [B, 2] -> list over L of [B, N, C, h, w]."""
        B, N = img.shape[:2]
        dtype = self.query_embedding.weight.dtype          # the model's (float32, or float64 for checks)
        x = normalize_images(img.to(dtype), img_shape, self.cfg.normalisation).flatten(0, 1)   # [B*N, 3, Hp, Wp]
        if self.cfg.grid_mask:
            x = self.grid_mask(x)                              # training mode only
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)   # NHWC strides, same shape
        bf16 = self.cnn_bf16 and x.device.type == 'cpu'
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
            feats = self.neck(self.backbone(x))
        if bf16:
            feats = [f.to(dtype) for f in feats]                          # the transformer runs in float32
        return [f.view(B, N, *f.shape[1:]) for f in feats]                # [B*N, C, h, w] -> [B, N, C, h, w]

    def flatten_feats(self, fpn):
        """list of [B, N, C, h, w] -> ([B, N, S, C] with camera and level embeddings, shapes [L, 2])."""
        flat, shapes = [], []
        for lvl, f in enumerate(fpn):
            B, N, C, h, w = f.shape
            f = f.flatten(3).transpose(2, 3)                                     # [B, N, h*w, C]
            flat.append(f + self.cams_embeds[None, :N, None] + self.level_embeds[None, None, lvl])
            shapes.append((h, w))
        return torch.cat(flat, 2), torch.tensor(shapes, dtype=torch.long, device=fpn[0].device)   # [B, N, S, C]

    # ---- BEV encoder (spatial + temporal) ---------------------------------------------------
    def encode_bev(self, fpn, lidar2img, pad_hw, can_delta, prev_bev, has_prev):
        """fpn list of [B, N, C, h, w]; lidar2img [B, N, 4, 4]; pad_hw (Hp, Wp); can_delta [B, 18];
        prev_bev [B, Q, C] or None; has_prev [B] bool -> BEV features [B, Q, C] (q = row * W + col)."""
        cfg = self.cfg
        B = lidar2img.shape[0]
        H, W = cfg.bev_h, cfg.bev_w
        x, pos = bev_queries(self.bev_embedding, self.positional_encoding, self.can_bus_mlp, can_delta, cfg)
        # temporal: align the previous BEV with the ego motion (Sec. 3.4)
        ref_2d = bev_grid(cfg, x.device, x.dtype)[None].expand(B, -1, -1)       # [B, Q, 2]
        if prev_bev is None or not bool(has_prev.any()):
            prev, shift = torch.zeros_like(x), x.new_zeros(B, 2)
            has_prev = torch.zeros(B, dtype=torch.bool, device=x.device)
        else:
            prev, shift = align_prev_bev(prev_bev, can_delta, cfg)
            shift = shift * has_prev[:, None].to(shift.dtype)
        ref_prev = ref_2d + shift[:, None]
        # quirk 1: the official `shift_ref_2d += shift` aliases ref_2d, shifting both halves
        ref_cur = ref_prev if cfg.official_quirks else ref_2d
        # spatial: project the pillars into the cameras (Sec. 3.3) and compact per camera
        feats, shapes = self.flatten_feats(fpn)
        uv, mask = project_points(pillar_points(cfg, x.device, x.dtype), lidar2img, pad_hw)
        cams = compact_cameras(uv.to(x.dtype), mask)
        return self.encoder(x, pos, prev, has_prev, ref_prev, ref_cur, (H, W), feats, shapes, cams,
                            cfg.official_quirks)

    # ---- decoder and heads -------------------------------------------------------------------
    def decode_queries(self, bev):
        """bev [B, Q_bev, C] -> list over decoder layers of dicts (see `forward`)."""
        cfg = self.cfg
        B = bev.shape[0]
        pos, x, ref = object_queries(self.query_embedding, self.reference_points, B)
        outs = []
        for lid, layer in enumerate(self.decoder.layers):
            x, loc, aw = layer(x, pos, bev, ref[..., :2], (cfg.bev_h, cfg.bev_w))
            box, new_ref = refine_boxes(self.reg_branches[lid](x), ref, cfg.pc_range)
            outs.append({'query': x, 'ref': ref, 'cls': self.cls_branches[lid](x), 'box': box,
                         'loc': loc, 'attn': aw, 'value_proj': layer.cross_attn.value_proj})
            ref = new_ref.detach()                                               # iterative refinement
        return outs

    # ---- one frame, the temporal queue, the forward ------------------------------------------
    def frame_bev(self, img, img_shape, lidar2img, can_delta, prev_bev, has_prev):
        fpn = self.extract_feats(img, img_shape)
        lidar2img = lidar2img.to(self.query_embedding.weight.dtype)
        return self.encode_bev(fpn, lidar2img, img.shape[-2:], can_delta, prev_bev, has_prev), fpn

    @torch.no_grad()
    def history_bev(self, batch):
        """BEV of the history frames (paper Sec. 3.4, official `obtain_history_bev`): no gradients,
        eval mode (no GridMask, no dropout), oldest first; a sample's chain starts at its first valid
        frame. Returns (prev_bev [B, Q, C] or None, prev_can [B, 18] absolute, has_prev [B])."""
        img = batch['img']
        B, dev, dtype = img.shape[0], img.device, self.query_embedding.weight.dtype
        prev_can = torch.zeros(B, 18, device=dev, dtype=dtype)
        has_prev = torch.zeros(B, dtype=torch.bool, device=dev)
        hist = _history_frames(batch)
        if self.cfg.queue_length <= 1 or hist is None:
            return None, prev_can, has_prev
        frames, valid = hist
        frames, valid = frames[-(self.cfg.queue_length - 1):], valid[:, -(self.cfg.queue_length - 1):]
        if not bool(valid.any()):
            return None, prev_can, has_prev
        was_training = self.training
        self.eval()
        try:
            prev = None
            for t, fr in enumerate(frames):
                v = valid[:, t].to(dev)
                if not bool(v.any()):
                    continue
                can = _can_bus(fr, B, dev, dtype)
                delta = can_bus_delta(can, prev_can, has_prev, wrap_angle=not self.cfg.official_quirks)
                bev, _ = self.frame_bev(fr['img'].to(dev), _img_shape(fr, B, dev), fr['lidar2img'].to(dev),
                                        delta, prev, has_prev)
                prev = bev if prev is None else torch.where(v[:, None, None], bev, prev)
                prev_can = torch.where(v[:, None], can, prev_can)
                has_prev = has_prev | v
        finally:
            self.train(was_training)
        return prev, prev_can, has_prev

    def forward(self, batch):
        """A collated batch (data.collate) -> dict:
          bev   [B, C, H_bev, W_bev]   BEV features of the current frame (row = y, column = x)
          fpn   list over L of [B, N, C, h, w]   FPN features of the current frame
          dec   list over decoder layers of dicts:
                query [B, Q, C] the layer's output queries; ref [B, Q, 3] the layer's INPUT reference
                point (normalised to pc_range); cls [B, Q, 10] logits; box [B, Q, 10] regression code
                (cx, cy, log w, log l, cz, log h, sin yaw, cos yaw, vx, vy; metres, our yaw);
                loc [B, Q, M, 1, P, 2] the BEV cross-attention's sampling locations (normalised x, y);
                attn [B, Q, M, 1, P] its attention weights (softmaxed); value_proj its nn.Linear.
        History frames (batch['history'], batch['history_valid']) run first without gradients; a batch
        that carries its previous BEV instead (history_draw 'stream': prev_bev [B, Q, C], prev_can_bus
        [B, 18] absolute, has_prev [B] bool; train.py `BEVStream`) runs none."""
        img = batch['img']
        B, dev = img.shape[0], img.device
        if 'prev_bev' in batch:
            prev_bev, prev_can, has_prev = batch['prev_bev'], batch['prev_can_bus'], batch['has_prev']
        else:
            prev_bev, prev_can, has_prev = self.history_bev(batch)
        can = _can_bus(batch, B, dev, prev_can.dtype)
        delta = can_bus_delta(can, prev_can, has_prev, wrap_angle=not self.cfg.official_quirks)
        bev, fpn = self.frame_bev(img, _img_shape(batch, B, dev), batch['lidar2img'], delta, prev_bev, has_prev)
        out = self._outputs(bev, fpn)
        return out

    def _outputs(self, bev, fpn):
        cfg = self.cfg
        B, Q, C = bev.shape
        return {'bev': bev.transpose(1, 2).reshape(B, C, cfg.bev_h, cfg.bev_w), 'bev_seq': bev,   # [B, C, H, W]
                'fpn': fpn, 'dec': self.decode_queries(bev)}

    # ---- loss --------------------------------------------------------------------------------
    def loss(self, out, batch):
        """Focal classification + weighted L1 regression on every decoder layer, each with its own
        Hungarian matching (official `BEVFormerHead.loss_single`). Returns {loss_cls_i, loss_bbox_i} scalars."""
        cfg = self.cfg
        like = out['dec'][-1]['cls']                     # not out['bev']: DETR3D shares this loss
        gt_boxes = [g.to(like.device, _at_least_fp32(like).dtype) for g in batch['gt_boxes']]
        gt_labels = [g.to(like.device).long() for g in batch['gt_labels']]
        avg = _num_pos_average(sum(int(g.shape[0]) for g in gt_boxes), like.device)
        targets = [encode_boxes(g) for g in gt_boxes]
        code_w = like.new_tensor(cfg.code_weights)
        weights = dict(cls_weight=cfg.cls_weight, reg_weight=cfg.bbox_weight,
                       alpha=cfg.focal_alpha, gamma=cfg.focal_gamma)
        losses = {}
        for lid, d in enumerate(out['dec']):
            cls, box = _at_least_fp32(d['cls']), _at_least_fp32(d['box'])
            B, Q, K = cls.shape
            labels = torch.full((B, Q), cfg.num_classes, dtype=torch.long, device=cls.device)
            box_t = torch.zeros_like(box)
            pos = torch.zeros(B, Q, dtype=torch.bool, device=cls.device)
            for b, (pi, gi) in enumerate(hungarian_match_batch(cls.detach(), box.detach(), gt_boxes,
                                                               gt_labels, **weights)):
                labels[b, pi] = gt_labels[b][gi]
                box_t[b, pi] = targets[b][gi]
                pos[b, pi] = True
            onehot = F.one_hot(labels, cfg.num_classes + 1)[..., :cfg.num_classes].to(cls.dtype)
            l_cls = sigmoid_focal_loss(cls, onehot, cfg.focal_alpha, cfg.focal_gamma).sum() / avg
            keep = pos & torch.isfinite(box_t).all(-1)                          # drop NaN targets
            l_box = ((box - box_t).abs() * code_w)[keep].sum() / avg
            losses[f'loss_cls_{lid}'] = torch.nan_to_num(cfg.cls_weight * l_cls)
            losses[f'loss_bbox_{lid}'] = torch.nan_to_num(cfg.bbox_weight * l_box)
        return losses

    # ---- NMS-free decoding -------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, out, max_num=None):
        """Last decoder layer -> per sample {'boxes' [K, 9], 'scores' [K], 'labels' [K]}: top-k over
        all (query, class) scores, boxes whose centre lies in post_center_range (no threshold)."""
        cfg = self.cfg
        cls, box = out['dec'][-1]['cls'], out['dec'][-1]['box']
        lo = box.new_tensor(cfg.post_center_range[:3])
        hi = box.new_tensor(cfg.post_center_range[3:])
        res = []
        for b in range(cls.shape[0]):
            scores = cls[b].sigmoid().flatten()                               # [Q * classes], index q * 10 + c
            k = min(max_num or cfg.max_num, scores.numel())
            scores, idx = scores.topk(k)
            labels, q = idx % cfg.num_classes, idx // cfg.num_classes
            boxes = decode_boxes(box[b, q])
            keep = ((boxes[:, :3] >= lo) & (boxes[:, :3] <= hi)).all(-1)
            res.append({'boxes': boxes[keep], 'scores': scores[keep], 'labels': labels[keep]})
        return res

    # ---- test time: one sample with a temporal cache -----------------------------------------
    @torch.no_grad()
    def predict(self, img, lidar2img, can_bus=None, state=None, img_shape=None, scene_token=None):
        """One sample from raw images: img [N, 3, H, W] RGB 0..255, lidar2img [N, 4, 4] for that
        image, can_bus [18] absolute (or None). Without img_shape the images are resized to the
        preset's image_size (lidar2img scaled by diag(sx, sy, 1, 1)) and zero-padded; with
        img_shape (H, W) they are taken as prepared (content size, already padded).
        `state` is what the previous call returned for the previous frame; a different
        scene_token resets it (official video_test_mode). Returns {'boxes', 'scores', 'labels',
        'state'}."""
        cfg = self.cfg
        dev, dtype = self.bev_embedding.weight.device, self.bev_embedding.weight.dtype
        img, lidar2img = img.to(dev, dtype), lidar2img.to(dev, dtype)
        if img_shape is None:
            img, lidar2img, img_shape = prepare_images(img, lidar2img, cfg)
        img_shape = torch.as_tensor(img_shape, device=dev).view(1, 2)        # [1, 2] (H, W)
        can = (torch.zeros(18, device=dev, dtype=dtype) if can_bus is None
               else torch.as_tensor(can_bus, device=dev).to(dtype))[None]
        if state is not None and scene_token is not None and state.get('scene_token') != scene_token:
            state = None                                                     # scene change: reset
        if cfg.queue_length == 1:
            # a single-frame model never saw a previous BEV in training (its temporal self-attention
            # attended to the current queries only), so it gets none here either. The official code
            # would still pass one at test time; we do not, to keep train and test the same.
            state = None
        has_prev = torch.tensor([state is not None and state.get('bev') is not None], device=dev)
        prev_bev = state['bev'].to(dev) if bool(has_prev) else None
        prev_can = state['can_bus'].to(dev)[None] if bool(has_prev) else torch.zeros_like(can)
        was_training = self.training
        self.eval()
        try:
            delta = can_bus_delta(can, prev_can, has_prev, wrap_angle=not cfg.official_quirks)
            bev, fpn = self.frame_bev(img[None], img_shape, lidar2img[None], delta, prev_bev, has_prev)
            dets = self.decode(self._outputs(bev, fpn))[0]
        finally:
            self.train(was_training)
        dets['state'] = {'bev': bev if cfg.queue_length > 1 else None, 'can_bus': can[0], 'scene_token': scene_token}
        return dets


def prepare_images(img, lidar2img, cfg):
    """img [N, 3, H, W] -> resized to cfg.image_size as the preset's loader resizes (data.resize_images:
    bilinear, antialiased only for image_loading='fast') and zero-padded to a multiple of cfg.pad_to;
    lidar2img left-multiplied by diag(sx, sy, 1, 1). Returns (img [N, 3, Hp, Wp], lidar2img [N, 4, 4],
    (H, W) content)."""
    W, H = cfg.image_size
    h0, w0 = img.shape[-2:]
    if (w0, h0) != (W, H):
        img = resize_images(img, (W, H), antialias=cfg.image_loading == 'fast')
        scale = torch.diag(lidar2img.new_tensor([W / w0, H / h0, 1.0, 1.0]))
        lidar2img = scale @ lidar2img
    Wp, Hp = cfg.padded_size
    img = F.pad(img, (0, Wp - W, 0, Hp - H))
    return img, lidar2img, (H, W)


def _img_shape(d, B, dev):
    """img_shape of a batch or history frame as a [B, 2] (H, W) tensor (tensor, tuples or lists)."""
    s = d.get('img_shape')
    if s is None:
        Hp, Wp = d['img'].shape[-2:]
        return torch.tensor([[Hp, Wp]] * B, device=dev)
    s = torch.as_tensor(s if torch.is_tensor(s) else np.asarray(s), device=dev)
    return s.reshape(-1, 2)[:, :2].expand(B, 2) if s.numel() == 2 else s.reshape(B, 2)   # [B, 2]


def _can_bus(d, B, dev, dtype=torch.float32):
    c = d.get('can_bus')
    if c is None:
        return torch.zeros(B, 18, device=dev, dtype=dtype)
    return torch.as_tensor(c, device=dev).to(dtype).view(B, 18)                  # [B, 18]


def _at_least_fp32(t):
    """float16/bfloat16 (autocast) -> float32; float32 and float64 as they are (the loss in float64 for checks)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _history_frames(batch):
    """batch['history'] as a list of per-frame dicts with a leading B (oldest first) and
    history_valid [B, T-1]; accepts a dict of [B, T-1, ...] tensors or a list of frame dicts."""
    hist = batch.get('history')
    if not hist:
        return None
    if isinstance(hist, dict):
        T1 = hist['img'].shape[1]
        frames = [{k: (v[:, t] if torch.is_tensor(v) and v.dim() >= 2 else v) for k, v in hist.items()}
                  for t in range(T1)]
    else:
        frames = list(hist)
    if not frames:
        return None
    B = batch['img'].shape[0]
    valid = batch.get('history_valid')
    valid = torch.ones(B, len(frames), dtype=torch.bool) if valid is None else torch.as_tensor(valid).bool()
    return frames, valid.view(B, len(frames))                                     # [B, T-1]

# ---------------------------------------------------------------------------------------------
# 11. Presets: the official checkpoints, the paper's expert and apprentices, the CPU presets
# ---------------------------------------------------------------------------------------------

# the official recipe's input pipeline (docs/official-differences.md): full decode and mmcv's bilinear resize,
# PhotoMetricDistortion in training, zeros for can_bus[7:16] where the CAN-bus expansion has no data
OFFICIAL_INPUT = dict(image_loading='official', photometric=True, can_bus_fallback='zeros')


_OFFICIAL = dict(embed_dims=256, ffn_dims=512, num_heads=8, enc_layers=3, dec_layers=6, num_query=900,
                 grid_mask=True, official_quirks=True, **OFFICIAL_INPUT)


# a ResNet trained from scratch (the CPU presets of both detectors): nothing frozen, BatchNorm on batch
# statistics (freezing a randomly initialised stem, as the official presets do with ImageNet weights, hurts)
FROM_SCRATCH = dict(frozen_stages=-1, backbone_norm_eval=False, backbone_bn_frozen=False)


# the default model's architecture (cpu-tiny, its single-frame twin cpu-tiny-single and cpu-tiny-stream)
_CPU_TINY = dict(backbone_depth=18, backbone_style='pytorch', backbone_width=32, backbone_out=(1, 2), fpn_levels=2,
                 embed_dims=128, ffn_dims=256, num_heads=8, bev_h=50, bev_w=50, enc_layers=1, dec_layers=3,
                 num_query=300, grid_mask=False, dropout=0.0, **FROM_SCRATCH)


PRESETS = {
    # official configs (bevformer_{tiny,small,base}.py)
    'tiny': BEVFormerConfig(name='tiny', image_size=(800, 450), normalisation='rgb', queue_length=3,
                            backbone_depth=50, backbone_style='pytorch', backbone_out=(3,), fpn_levels=1,
                            bev_h=50, bev_w=50, **_OFFICIAL),
    'small': BEVFormerConfig(name='small', image_size=(1280, 720), normalisation='caffe', queue_length=3,
                             backbone_depth=101, backbone_style='caffe', backbone_dcn=True, with_cp=True,
                             backbone_out=(3,), fpn_levels=1, bev_h=150, bev_w=150, **_OFFICIAL),
    'base': BEVFormerConfig(name='base', image_size=(1600, 900), normalisation='caffe', queue_length=4,
                            backbone_depth=101, backbone_style='caffe', backbone_dcn=True,
                            backbone_out=(1, 2, 3), fpn_levels=4, bev_h=200, bev_w=200,
                            **{**_OFFICIAL, 'enc_layers': 6}),
    # the paper's apprentices (FD3D Sec. 4.1): 450x800, 100x100 BEV, 4-level FPN on C2-C5, 3 encoder
    # layers. Inferred: style/normalisation/queue from the official Tiny (R50) and Small (R101-DCN);
    # no official checkpoints exist, so they run the corrected code (official_quirks=False).
    'fd3d-tiny': BEVFormerConfig(name='fd3d-tiny', image_size=(800, 450), normalisation='rgb', queue_length=3,
                                 backbone_depth=50, backbone_style='pytorch', backbone_out=(0, 1, 2, 3),
                                 fpn_levels=4, bev_h=100, bev_w=100, **{**_OFFICIAL, 'official_quirks': False}),
    'fd3d-small': BEVFormerConfig(name='fd3d-small', image_size=(800, 450), normalisation='caffe',
                                  queue_length=3, backbone_depth=101, backbone_style='caffe', backbone_dcn=True,
                                  backbone_out=(0, 1, 2, 3), fpn_levels=4, bev_h=100, bev_w=100,
                                  **{**_OFFICIAL, 'official_quirks': False}),
    # the paper's Base* expert: R101 without DCN, otherwise Base (FPN as Base: inferred)
    'base-r101': BEVFormerConfig(name='base-r101', image_size=(1600, 900), normalisation='caffe', queue_length=4,
                                 backbone_depth=101, backbone_style='caffe', backbone_dcn=False,
                                 backbone_out=(1, 2, 3), fpn_levels=4, bev_h=200, bev_w=200,
                                 **{**_OFFICIAL, 'enc_layers': 6, 'official_quirks': False}),
    # CPU-sized apprentice/expert pair for the synthetic world (400x225 images). The expert keeps
    # the paper's relation where a CPU can afford it: bigger backbone, twice the input resolution,
    # more encoder layers, same width; its FPN levels (strides 16, 32 at full size) match the
    # apprentice's (strides 8, 16 at half size). Both have a 50x50 BEV: at 100x100 the expert's step took
    # 3.9 CPU s instead of 1.2 (its forward, run in every distillation step, 1.6 instead of 0.45), which put
    # the miniature table at ~40 CPU hours, and BEV generation on its grid cost the apprentice's whole step;
    # the upsampler for unequal BEV grids is used by the paper's pairs (200x200 -> 100x100) and tested on
    # its own. GridMask and dropout off: a short CPU run underfits, and dropout alone cost ~10 % of a step
    # in the profile. cpu-tiny has one encoder layer: an encoder layer cost a third of its CPU step, and the
    # iterations it buys learn more in the default run (docs/experiments.md).
    # They train from scratch: nothing frozen and BatchNorm trained on batch statistics (the
    # official frozen stem/layer1 and frozen BN only make sense for a pretrained ResNet). No photometric
    # distortion (the field's default): on the default run it measured NDS 0.326 / mAP 0.156 against
    # 0.338 / 0.183 without (four runs each, docs/experiments.md).
    # cpu-tiny, the default run's model, is temporal with BEVFormer's recipe: one history frame drawn from
    # the previous two, run without gradient in eval mode in every step, and TSA over its ego-motion-aligned
    # BEV; at test time the BEV chain runs through each scene (issue 18; docs/experiments.md "The default
    # run" and "Seeds"). cpu-tiny-single is the same detector on one frame (the miniature table's apprentice and
    # the single-frame comparison). cpu-tiny-stream: the previous BEV is streamed (history_draw 'stream',
    # ours): training walks 32 scenes frame by frame in turn and hands each frame the BEV its scene's
    # previous frame got, so no history frame is run (docs/official-differences.md "Training set and
    # history"); it trained worse than both.
    'cpu-tiny': BEVFormerConfig(name='cpu-tiny', image_size=(200, 113), normalisation='rgb', queue_length=2,
                                **_CPU_TINY),
    'cpu-tiny-single': BEVFormerConfig(name='cpu-tiny-single', image_size=(200, 113), normalisation='rgb',
                                       queue_length=1, **_CPU_TINY),
    'cpu-tiny-stream': BEVFormerConfig(name='cpu-tiny-stream', image_size=(200, 113), normalisation='rgb',
                                       queue_length=2, history_draw='stream', **_CPU_TINY),
    'cpu-base': BEVFormerConfig(name='cpu-base', image_size=(400, 225), normalisation='rgb', queue_length=1,
                                backbone_depth=34, backbone_style='pytorch', backbone_width=24,
                                backbone_out=(2, 3), fpn_levels=2, embed_dims=128, ffn_dims=256,
                                num_heads=8, bev_h=50, bev_w=50, enc_layers=3, dec_layers=3,
                                num_query=300, grid_mask=False, dropout=0.0, **FROM_SCRATCH),
}


def get_config(name, **overrides):
    """A copy of preset `name` with field overrides (unknown names are InputErrors)."""
    if name not in PRESETS:
        raise InputError(f'preset {name!r} is unknown (expected one of {", ".join(PRESETS)})')
    known = {f.name for f in fields(BEVFormerConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise InputError(f'--set {bad[0]}: not a BEVFormerConfig field')
    return replace(PRESETS[name], **overrides)

# ---------------------------------------------------------------------------------------------
# 12. Official checkpoints: strict key remap + yaw conversion; `python bevformer.py convert`
# ---------------------------------------------------------------------------------------------

# our parameter name -> the official one: regex rewrites applied in order
_TO_OFFICIAL = [
    (r'^backbone\.', 'img_backbone.'),
    (r'^neck\.(lateral_convs|fpn_convs)\.(\d+)\.', r'img_neck.\1.\2.conv.'),            # mmcv ConvModule
    (r'^(cls_branches|reg_branches|bev_embedding|query_embedding|positional_encoding)\.', r'pts_bbox_head.\1.'),
    (r'^(encoder|decoder|level_embeds|cams_embeds|reference_points|can_bus_mlp)\b', r'pts_bbox_head.transformer.\1'),
    (r'\.tsa\.', '.attentions.0.'),
    (r'\.sca\.', '.attentions.1.'),
    (r'\.self_attn\.', '.attentions.0.attn.'),                                        # mmcv MHA wrapper
    (r'\.cross_attn\.', '.attentions.1.'),
    (r'\.ffn\.fc1\.', '.ffns.0.layers.0.0.'),
    (r'\.ffn\.fc2\.', '.ffns.0.layers.1.'),
]


# official tensors we read nothing from: the head's loss code weights (our config holds them)
_OFFICIAL_IGNORED = ('pts_bbox_head.code_weights',)


def official_key(key):
    """Our state_dict key -> the official checkpoint's key (e.g. neck.lateral_convs.0.weight ->
    img_neck.lateral_convs.0.conv.weight; encoder.layers.0.tsa.value_proj.weight ->
    pts_bbox_head.transformer.encoder.layers.0.attentions.0.value_proj.weight)."""
    import re
    for pattern, repl in _TO_OFFICIAL:
        key = re.sub(pattern, repl, key)
    return key


def load_official(model, path, src=None):
    """Load an official mmdet3d BEVFormer checkpoint (path, or its state_dict) into `model`, strictly:
    every parameter and buffer is filled, and an unknown or missing key, or a shape mismatch, is an
    InputError naming it (and `src`, the file's name for the message). The final regression layers'
    (sin, cos) rows are converted from the official yaw' = -yaw - pi/2 to ours. Returns the model."""
    src = src or (path if isinstance(path, str) else 'state_dict')
    state = read_state_dict(path) if isinstance(path, str) else path
    own = model.state_dict()
    wanted = {official_key(k): k for k in own}                       # official name -> ours
    for k in state:
        if k not in wanted and k not in _OFFICIAL_IGNORED:
            raise InputError(f'{src}: unknown key {k} (preset {model.cfg.name} has no such parameter; '
                             f'wrong --preset?)')
    new = {}
    for ok, k in wanted.items():
        if ok not in state:
            raise InputError(f'{src}: missing key {ok} (needed for {k} of preset {model.cfg.name}; wrong preset?)')
        if tuple(state[ok].shape) != tuple(own[k].shape):
            raise InputError(f'{src}: {ok} has shape {list(state[ok].shape)}, preset {model.cfg.name} '
                             f'expects {list(own[k].shape)} (wrong --preset?)')
        new[k] = state[ok].to(own[k].dtype)
    for lid in range(model.cfg.dec_layers):                          # yaw convention (section 7)
        for p in ('weight', 'bias'):
            k = f'reg_branches.{lid}.4.{p}'
            new[k] = convert_official_reg_rows(new[k])
    model.load_state_dict(new, strict=True)
    return model


def convert(official_path, preset, out_path):
    """Official checkpoint -> our checkpoint format (usable by train.py --ckpt/--teacher, evaluate.py)."""
    cfg = get_config(preset)
    model = load_official(BEVFormer(cfg), official_path)
    save_checkpoint({'model': model.state_dict(), 'config': asdict(cfg),
                     'args': {'converted_from': os.path.abspath(official_path), 'preset': preset},
                     'iter': 0}, out_path)
    return model


def cli(argv, family, presets, convert_fn, default_preset=None):
    """`python bevformer.py convert OFFICIAL.pth --preset NAME --out X.pt` (detr3d.py has the same)."""
    p = argparse.ArgumentParser(description=f'{family}: official mmdet3d checkpoint -> our checkpoint format')
    sub = p.add_subparsers(dest='cmd', required=True)
    c = sub.add_parser('convert', help='official mmdet3d checkpoint -> our checkpoint format')
    c.add_argument('official', help='official checkpoint (.pth), read with weights_only=True')
    c.add_argument('--preset', required=default_preset is None, default=default_preset,
                   help=f'one of {", ".join(presets)}')
    c.add_argument('--out', required=True, help='output checkpoint path (.pt)')
    args = p.parse_args(argv)
    try:
        convert_fn(args.official, args.preset, args.out)
        print(f'wrote {args.out} (preset {args.preset})')
    except InputError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(1)


def main(argv=None):
    cli(argv, 'BEVFormer', PRESETS, convert)


if __name__ == '__main__':
    main()
