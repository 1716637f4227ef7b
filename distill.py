"""FD3D, the Focal Distiller, and the baseline distillers, in plain PyTorch.

Paper: J. Zeng et al., "Distilling Focal Knowledge from Imperfect Expert for 3D Object Detection",
CVPR 2023, pp. 992-1001. The authors released only their code base, a baseline distiller (heatmap-masked
BEV L2 + channel-wise distillation on the FPN) and an unused "distillation branch"; FD3D itself was never
published. This file is our reconstruction (design: specs/fd3d.md; evidence: specs/fd3d-evidence.md),
read top to bottom beside the paper's overview figure:

  1. instance (focal) areas: the selected expert queries' 3D boxes, in BEV and in every camera/FPN level
  2. random focal masks inside those areas (MGD-style, ratio lambda)
  3. training-only modules: generators, the learned BEV upsampler, 1x1 adapters
  4. losses: masked generation (PV, BEV), focal distillation at the expert's sampling points, baselines
  5. aligned queries: the expert's own decoder is the frozen "distillation head"
  6. inputs: each model's own view of a sample (resolution, history, CAN bus) from one loaded batch
  7. the Distiller module (modes fd3d | heatmap | fitnet | mgd | none)
  8. pictures of the focal areas and sampling points
  9. CLI: `python distill.py bench` (time breakdown) and `python distill.py table` (the miniature table)

Where we differ from the released code (each is a flag where a reader may want the other behaviour):
- the expert sees the loader's full-resolution images; the released code upsampled the apprentice's
  half-resolution images for it (`expert_input='upsampled'` reproduces that);
- the expert stays in eval mode for every frame (the released code put it back in train mode after its
  history frames, enabling GridMask and dropout in the teacher);
- the channel-wise baseline is written as a KL divergence (0 at equality), not the cross-entropy of the
  released code (same gradients);
- the baseline's Gaussian heatmap is drawn directly on the expert's BEV grid (the released code drew it
  on a 0.8 m grid and nearest-upsampled it).
Everything the paper leaves open is a keyword argument of `Distiller` (and a `--fd3d-*` flag of
train.py) with the default of specs/fd3d.md; the README's "Paper notes" list them.

Letters: B batch, N cameras, C channels, Q queries, M heads, L levels, P points, K boxes, H/W sizes.
Box layout [x, y, z, w, l, h, yaw, vx, vy] in the LIDAR_TOP frame; BEV column = x, row = y.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import bevformer
from common import CAMERAS, InputError
from ops import ms_deform_attn

PC_RANGE = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)  # x_min, y_min, z_min, x_max, y_max, z_max (metres)


# ----------------------------------------------------------------------------------------------------
# 1. Instance (focal) areas (overview figure: "3D bbox" projected to BEV and to PV)
# ----------------------------------------------------------------------------------------------------

def box_corners(boxes, scale=1.0):
    """The 8 corners of boxes [K, 9] enlarged by `scale` (all three sizes) -> [K, 8, 3].

    Same corner order as nuscenes-devkit `Box.corners()`: the length axis is the box's local x, rotated
    by yaw about z (the contract's yaw), width along local y, height along z.
    """
    w, l, h = (boxes[:, 3:6] * scale).unbind(-1)
    sx = torch.tensor([1, 1, 1, 1, -1, -1, -1, -1], dtype=boxes.dtype, device=boxes.device)
    sy = torch.tensor([1, -1, -1, 1, 1, -1, -1, 1], dtype=boxes.dtype, device=boxes.device)
    sz = torch.tensor([1, 1, -1, -1, 1, 1, -1, -1], dtype=boxes.dtype, device=boxes.device)
    lx, ly, lz = l[:, None] / 2 * sx, w[:, None] / 2 * sy, h[:, None] / 2 * sz  # [K, 8] each
    c, s = torch.cos(boxes[:, 6:7]), torch.sin(boxes[:, 6:7])
    x = boxes[:, 0:1] + c * lx - s * ly
    y = boxes[:, 1:2] + s * lx + c * ly
    z = boxes[:, 2:3] + lz
    return torch.stack([x, y, z], -1)  # [K, 8, 3]


def bev_focal_area(boxes, bev_hw, pc_range=PC_RANGE, box_scale=1.2):
    """Rasterise the rotated footprints of boxes [K, 9], enlarged by box_scale, on a BEV grid -> [H, W].

    A cell belongs to the area when its square intersects the footprint (exact test by separating axes:
    the two grid axes and the box's two axes), so even a traffic cone smaller than a cell marks the cell
    that holds it, and nothing farther than one cell from the enlarged footprint is marked.
    """
    H, W = bev_hw
    area = torch.zeros(H, W, device=boxes.device)
    if boxes.shape[0] == 0:
        return area
    dx, dy = (pc_range[3] - pc_range[0]) / W, (pc_range[4] - pc_range[1]) / H  # cell size (metres)
    xs = pc_range[0] + (torch.arange(W, device=boxes.device) + 0.5) * dx  # cell centres
    ys = pc_range[1] + (torch.arange(H, device=boxes.device) + 0.5) * dy
    for chunk in boxes.split(64):  # [k, 9]; bounded memory k*H*W
        hl = chunk[:, 4, None, None] * box_scale / 2  # half length  [k, 1, 1]
        hw = chunk[:, 3, None, None] * box_scale / 2  # half width
        c, s = torch.cos(chunk[:, 6, None, None]), torch.sin(chunk[:, 6, None, None])
        ox = xs[None, None, :] - chunk[:, 0, None, None]  # [k, 1, W] cell centre minus box centre
        oy = ys[None, :, None] - chunk[:, 1, None, None]  # [k, H, 1]
        # axis x and y of the grid: the box's half extent plus half a cell
        sep_x = ox.abs() < hl * c.abs() + hw * s.abs() + dx / 2
        sep_y = oy.abs() < hl * s.abs() + hw * c.abs() + dy / 2
        # the box's length and width axes: half the box plus the cell's half extent projected on them
        sep_u = (ox * c + oy * s).abs() < hl + (dx * c.abs() + dy * s.abs()) / 2
        sep_v = (-ox * s + oy * c).abs() < hw + (dx * s.abs() + dy * c.abs()) / 2
        area = torch.maximum(area, (sep_x & sep_y & sep_u & sep_v).any(0).float())
    return area  # [H, W] in {0, 1}


def project_boxes(boxes, lidar2img, pad_hw, box_scale=1.2):
    """2D rectangles of boxes [K, 9] in each camera: lidar2img [N, 4, 4] -> (rect [N, K, 4], ok [N, K]).

    The 8 enlarged corners are projected; corners behind the camera are dropped (a box with all
    corners behind has no area); the rectangle (u0, v0, u1, v1) around the rest is clipped to the
    padded image (pixels of the tensor the model receives).
    """
    Hp, Wp = pad_hw
    corners = box_corners(boxes, box_scale)  # [K, 8, 3]
    homo = torch.cat([corners, torch.ones_like(corners[..., :1])], -1)  # [K, 8, 4]
    uvd = torch.einsum('nij,kpj->nkpi', lidar2img.to(homo), homo)  # [N, K, 8, 4]
    d = uvd[..., 2]
    front = d > 1e-5
    d = d.clamp(min=1e-5)
    u, v = uvd[..., 0] / d, uvd[..., 1] / d  # [N, K, 8] pixels
    inf = torch.full_like(u, float('inf'))
    u0 = torch.where(front, u, inf).amin(-1).clamp(0, Wp)
    v0 = torch.where(front, v, inf).amin(-1).clamp(0, Hp)
    u1 = torch.where(front, u, -inf).amax(-1).clamp(0, Wp)
    v1 = torch.where(front, v, -inf).amax(-1).clamp(0, Hp)
    ok = front.any(-1) & (u1 > u0) & (v1 > v0)  # [N, K]: some corner in front and inside the image
    return torch.stack([u0, v0, u1, v1], -1), ok


def pv_focal_areas(boxes, lidar2img, pad_hw, level_hw, box_scale=1.2):
    """Focal areas of boxes [K, 9] in every camera and FPN level -> list over levels of [N, h, w].

    lidar2img [N, 4, 4] maps to pixels of the padded image (pad_hw = (Hp, Wp)); a level of size (h, w)
    has stride (Hp / h, Wp / w). A cell belongs to the area when it intersects a box's rectangle.
    """
    N = lidar2img.shape[0]
    if boxes.shape[0] == 0:
        return [torch.zeros(N, h, w, device=lidar2img.device) for h, w in level_hw]
    rect, ok = project_boxes(boxes, lidar2img, pad_hw, box_scale)  # [N, K, 4], [N, K]
    areas = []
    for h, w in level_hw:
        sy, sx = pad_hw[0] / h, pad_hw[1] / w  # stride of this level in pixels
        j = torch.arange(w, device=rect.device, dtype=rect.dtype)
        i = torch.arange(h, device=rect.device, dtype=rect.dtype)
        cols = ((j + 1) * sx > rect[..., 0:1]) & (j * sx < rect[..., 2:3])  # [N, K, w]
        rows = ((i + 1) * sy > rect[..., 1:2]) & (i * sy < rect[..., 3:4])  # [N, K, h]
        hit = rows[..., :, None] & cols[..., None, :] & ok[..., None, None]  # [N, K, h, w]
        areas.append(hit.any(1).float())  # [N, h, w]
    return areas


# ----------------------------------------------------------------------------------------------------
# 2. Random focal masks (masked feature generation, MGD-style: P = M * R, R ~ Bernoulli(lambda))
# ----------------------------------------------------------------------------------------------------

def random_focal_mask(area, ratio):
    """P = area * R with R ~ Bernoulli(ratio) per cell; area [..., H, W] in {0, 1} -> same shape."""
    return area * (torch.rand_like(area) < ratio).to(area.dtype)


# ----------------------------------------------------------------------------------------------------
# 3. Training-only modules: generator, BEV upsampler, adapters (never part of the saved apprentice)
# ----------------------------------------------------------------------------------------------------

class Generator(nn.Sequential):
    """MGD's generator G = Conv3x3 -> ReLU -> Conv3x3 (C -> C), one per FPN level and one for the BEV."""

    def __init__(self, channels):
        super().__init__(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(channels, channels, 3, padding=1))


class BEVUpsampler(nn.Module):
    """Learned upsampler U: the apprentice's BEV [B, C, h, w] -> the expert's grid [B, C, H, W].

    The released code's block (ConvTranspose 4x4 stride 2 -> BN -> ReLU -> Conv3x3), repeated log2(H/h)
    times; a ratio that is not a power of two uses a bilinear resize followed by the same BN-ReLU-conv.
    With equal sizes it is the identity (the adapter handles channels).
    """

    def __init__(self, channels, in_hw, out_hw):
        super().__init__()
        ratio = out_hw[0] / in_hw[0]
        steps = round(math.log2(ratio)) if ratio >= 1 else 0
        self.deconv = steps >= 1 and 2 ** steps == ratio and out_hw[1] == in_hw[1] * ratio
        layers = []
        if self.deconv:
            for _ in range(steps):
                layers += [nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1, bias=False),
                           nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
                           nn.Conv2d(channels, channels, 3, padding=1)]
        elif tuple(in_hw) != tuple(out_hw):  # resized bilinearly in forward, then refined
            layers += [nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                       nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 3, padding=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x, out_hw):
        if not self.deconv and tuple(x.shape[-2:]) != tuple(out_hw):
            x = F.interpolate(x, size=tuple(out_hw), mode='bilinear', align_corners=False)
        return self.layers(x)  # [B, C, H, W]


def adapter(c_in, c_out):
    """1x1 conv when the apprentice's channels differ from the expert's, else the identity."""
    return nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()


def align_pv(x, out_hw, in_pad_hw, out_pad_hw, scale_xy):
    """An apprentice FPN map x [B', C, h, w] on the grid of the paired expert level -> [B', C, H, W].

    The apprentice's image is the expert's content scaled by scale_xy = (sx, sy) and padded to
    in_pad_hw; the expert's is padded to out_pad_hw. Each expert cell's centre is mapped into the
    apprentice's map and sampled bilinearly (zeros outside). Padding differs between the two images
    (e.g. 450 -> 480 rows at half size, 900 -> 928 at full), so equal strides give an exact crop,
    not a resize; identical geometry returns x itself.
    """
    H, W = out_hw
    h, w = x.shape[-2:]
    sx, sy = scale_xy
    xs = (torch.arange(W, device=x.device, dtype=x.dtype) + 0.5) * (out_pad_hw[1] / W) * sx  # apprentice px
    ys = (torch.arange(H, device=x.device, dtype=x.dtype) + 0.5) * (out_pad_hw[0] / H) * sy
    gx, gy = 2 * xs / in_pad_hw[1] - 1, 2 * ys / in_pad_hw[0] - 1  # grid_sample coordinates
    if (h, w) == (H, W):
        own_x = 2 * (torch.arange(w, device=x.device, dtype=x.dtype) + 0.5) / w - 1
        own_y = 2 * (torch.arange(h, device=x.device, dtype=x.dtype) + 0.5) / h - 1
        if torch.allclose(gx, own_x, atol=1e-6) and torch.allclose(gy, own_y, atol=1e-6):
            return x
    grid = torch.stack(torch.meshgrid(gy, gx, indexing='ij')[::-1], -1)  # [H, W, 2] as (x, y)
    return F.grid_sample(x, grid[None].expand(x.shape[0], -1, -1, -1), mode='bilinear',
                         padding_mode='zeros', align_corners=False)


# ----------------------------------------------------------------------------------------------------
# 4. Losses
# ----------------------------------------------------------------------------------------------------

def masked_generation(f_a, area_a, adapt, upsample, generate, mask_ratio, out_hw):
    """Masked feature generation (overview figure: "Generator"): F^ = G(U(adapt(F_A) * (1 - P))).

    f_a [B, Ca, h, w] apprentice map; area_a [B, h, w] the focal area rasterised on the apprentice's
    own grid. The random mask P is drawn there and applied before the upsampler U (to the expert's
    grid out_hw), so the generator G must rebuild the masked cells from their context -> [B, C, H, W].
    """
    x = adapt(f_a)
    p = random_focal_mask(area_a, mask_ratio)  # [B, h, w]
    x = x * (1 - p[:, None])
    return generate(upsample(x, out_hw))


def standardise(f):
    """Per-channel standardisation over batch and space of an expert map [B', C, h, w] (the released code
    base's `fpn_feats_norm='bn'`: BatchNorm without affine or running statistics, on the expert only).
    FPN features have no normalisation layer, so their scale depends on the backbone's training (about
    1e4 per element squared for a randomly initialised ResNet with frozen BN statistics, O(1) for a
    pretrained one); standardising makes one loss weight fit every expert. The generator learns the scale."""
    return F.batch_norm(f, None, None, training=True, eps=1e-5)


def gen_loss(f_hat, f_e, area, bg_weight=0.0):
    """L_gen = sum over cells of W * ||F^ - F_E||^2 / (C * max(1, sum W)), W = area + bg * (1 - area).

    f_hat, f_e [B, C, H, W]; area [B, H, W]. The released baseline's 1/sum(M) normalisation, per channel.
    """
    w = area + bg_weight * (1 - area)  # [B, H, W]
    err = ((f_hat - f_e) ** 2).sum(1)  # [B, H, W]
    return (w * err).sum() / (f_e.shape[1] * w.sum().clamp(min=1))


def focal_loss(bev_hat, bev_e, dec, sel):
    """Focal distillation at the expert queries' sampling points (paper: "Focal Distillation").

    For each decoder layer l, with the expert's value_proj_l and its detached sampling locations loc_l
    [B, Q, M, 1, P, 2] and attention weights A_l [B, Q, M, 1, P]:
      s_E = MSDA(value_proj_l(F_E), loc_l, A_l),  s_A = MSDA(value_proj_l(F^_bev), loc_l, A_l)
    (the decoder's cross-attention before output_proj), and
      L_focal = mean over layers and selected queries of ||s_A - s_E||^2 / C.
    bev_hat, bev_e [B, C, H, W] (the same grid); sel [B, Q] bool. Gradients reach only bev_hat: the
    locations, weights and (frozen) value projection are the expert's.
    """
    B, C, H, W = bev_e.shape
    shapes = torch.tensor([[H, W]], device=bev_e.device)  # one BEV level
    start = torch.zeros(1, dtype=torch.long, device=bev_e.device)
    n_sel = sel.sum()
    if n_sel == 0:
        return bev_hat.sum() * 0  # keeps the graph (DDP needs every parameter used)
    tokens_hat = bev_hat.flatten(2).transpose(1, 2)  # [B, H*W, C], index h * W + w
    tokens_e = bev_e.flatten(2).transpose(1, 2)
    total = 0
    for layer in dec:
        loc, attn = layer['loc'].detach(), layer['attn'].detach()  # [B, Q, M, 1, P, 2], [B, Q, M, 1, P]
        proj = layer['value_proj']
        M = loc.shape[2]
        with torch.no_grad():
            s_e = ms_deform_attn(proj(tokens_e).view(B, H * W, M, -1), shapes, start, loc, attn)  # [B, Q, C]
        # F.linear with detached weights: the expert's projection is used, never trained
        v_hat = F.linear(tokens_hat, proj.weight.detach(),
                         None if proj.bias is None else proj.bias.detach())
        s_a = ms_deform_attn(v_hat.view(B, H * W, M, -1), shapes, start, loc, attn)  # [B, Q, C]
        err = ((s_a - s_e) ** 2).mean(-1)  # [B, Q]
        total = total + (err * sel).sum() / n_sel
    return total / len(dec)


def fitnet_loss(f_a_up, f_e):
    """FitNets: MSE between the upsampled apprentice BEV and the expert's over the whole map."""
    return F.mse_loss(f_a_up, f_e)


def gaussian_radius(height, width, min_overlap=0.1):
    """CenterNet/CenterPoint's Gaussian radius for a box of (height, width) cells (tensors)."""
    b1 = height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + torch.sqrt(b1 ** 2 - 4 * c1)) / 2
    b2 = 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + torch.sqrt(b2 ** 2 - 16 * c2)) / 2
    a3, b3 = 4 * min_overlap, -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + torch.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    return torch.minimum(torch.minimum(r1, r2), r3)


def gaussian_heatmap(boxes, bev_hw, pc_range=PC_RANGE, min_overlap=0.1, min_radius=2):
    """CenterPoint-style heatmap of boxes [K, 9] on a BEV grid -> [H, W] in [0, 1].

    Peak 1 at the cell holding each centre, sigma = (2r + 1) / 6 with r = max(floor(radius), min_radius)
    cells, cut at r, max over boxes (the released baseline's BEV mask).
    """
    H, W = bev_hw
    heat = torch.zeros(H, W, device=boxes.device)
    dx, dy = (pc_range[3] - pc_range[0]) / W, (pc_range[4] - pc_range[1]) / H
    u = torch.floor((boxes[:, 0] - pc_range[0]) / dx)  # centre cell column
    v = torch.floor((boxes[:, 1] - pc_range[1]) / dy)  # centre cell row
    inside = (u >= 0) & (u < W) & (v >= 0) & (v < H)
    r = gaussian_radius(boxes[:, 4] / dy, boxes[:, 3] / dx, min_overlap).floor().clamp(min=min_radius)
    jj = torch.arange(W, device=boxes.device)[None, :]
    ii = torch.arange(H, device=boxes.device)[:, None]
    for k in torch.nonzero(inside).flatten().tolist():
        sigma = (2 * r[k] + 1) / 6
        du, dv = jj - u[k], ii - v[k]  # [1, W], [H, 1]
        g = torch.exp(-(du ** 2 + dv ** 2) / (2 * sigma ** 2))
        g = g * ((du.abs() <= r[k]) & (dv.abs() <= r[k]))
        heat = torch.maximum(heat, g)
    return heat


def heatmap_bev_loss(f_a_up, f_e, heat):
    """The released baseline's BEV term: sum (M*U(F_A) - M*F_E)^2 / sum M, M the heatmap [B, H, W]."""
    m = heat[:, None]  # [B, 1, H, W]
    return ((m * f_a_up - m * f_e) ** 2).sum() / heat.sum().clamp(min=1)


def cwd_loss(f_a, f_e, tau=2.0):
    """Channel-wise distillation (Shu et al. 2021) on one FPN level, f_a, f_e [B', C, h, w].

    Each channel's map becomes a distribution over space (softmax with temperature tau);
    tau^2 * KL(p_E || p_A), summed over space, averaged over maps and channels. The released code uses
    the cross-entropy (same gradients, not 0 at equality).
    """
    log_p_a = F.log_softmax(f_a.flatten(2) / tau, -1)  # [B', C, h*w]
    log_p_e = F.log_softmax(f_e.flatten(2) / tau, -1)
    kl = (log_p_e.exp() * (log_p_e - log_p_a)).sum(-1)  # [B', C]
    return tau ** 2 * kl.mean()


# ----------------------------------------------------------------------------------------------------
# 5. Aligned queries: the expert's own decoder is the frozen "distillation head" (specs/fd3d.md 1)
# ----------------------------------------------------------------------------------------------------

# A matched expert query counts as aligned only where its prediction agrees with its GT box: the same
# class and a centre within GATE_METRES (nuScenes' 2 m true-positive threshold). The paper says the
# imperfect expert is trusted where it is right; which test decides that is our choice (--fd3d-gate, 0: off).
GATE_METRES = 2.0


def select_queries(cls, box, gt_boxes, gt_labels, how='matched+confident', score=0.3, gate=GATE_METRES,
                   **match_weights):
    """Which expert queries teach: cls [B, Q, 10] logits and box [B, Q, 10] code of the expert's last
    decoder layer, GT lists -> sel [B, Q] bool.

    `matched`: assigned to a GT box by the Hungarian matcher (the detection loss's cost) AND, with
    gate > 0, agreeing with it: its top class is the GT's and its centre lies within `gate` metres (the
    matcher gives every GT box a query however wrong its prediction, so an expert miss would otherwise
    still set a focal area and sampling points); `confident`: max class probability >= score. The
    default union trusts an imperfect expert only where it agrees with the ground truth or is sure of
    itself.
    """
    B, Q, _ = cls.shape
    sel = torch.zeros(B, Q, dtype=torch.bool, device=cls.device)
    if 'matched' in how.split('+'):
        for b in range(B):
            pred_idx, gt_idx = bevformer.hungarian_match(cls[b], box[b], gt_boxes[b], gt_labels[b], **match_weights)
            if gate > 0 and len(pred_idx):
                dist = (box[b, pred_idx, :2] - gt_boxes[b][gt_idx, :2].to(box)).norm(dim=-1)   # code: metric cx, cy
                same = cls[b, pred_idx].argmax(-1) == gt_labels[b][gt_idx].to(cls.device)
                pred_idx = pred_idx[(dist <= gate) & same]
            sel[b, pred_idx] = True
    if 'confident' in how.split('+'):
        sel |= cls.sigmoid().amax(-1) >= score
    return sel


def predicted_boxes(box_code, max_size=60.0):
    """Decoded boxes [K, 9] of selected queries; sizes clamped so that a wild early prediction cannot
    cover the whole map (exp of a large log-size)."""
    boxes = bevformer.decode_boxes(box_code.float())
    boxes[:, 3:6] = torch.nan_to_num(boxes[:, 3:6], nan=0.0, posinf=max_size).clamp(0, max_size)
    return boxes


def init_head_from_expert(apprentice, expert):
    """Copy the expert's decoder, heads, object queries and reference points into the apprentice where
    names and shapes agree (the released code tried this and then overwrote it; here it is a choice,
    `--init-head-from-expert`, applied in every mode so comparisons stay fair). Returns the count."""
    prefixes = ('decoder.', 'cls_branches.', 'reg_branches.', 'query_embedding.', 'reference_points.')
    src, dst = expert.state_dict(), apprentice.state_dict()
    copied = {k: src[k] for k in dst if k.startswith(prefixes) and k in src and src[k].shape == dst[k].shape}
    apprentice.load_state_dict(copied, strict=False)
    return len(copied)


# ----------------------------------------------------------------------------------------------------
# 6. Inputs: each model sees the data as its own preset loads it (data.View), from one loaded batch
# ----------------------------------------------------------------------------------------------------

def loader_views(cfg_e, cfg_a, expert_input='native'):
    """(the loader's view, the apprentice's view or None) for training a distilled apprentice.

    'native' (ours): the loader reads every sample at the expert's resolution with the expert's history
    and also serves the apprentice's own view (its size, image loading, history length and draw, CAN bus;
    data.NuScenesDataset(apprentice=...)), so the apprentice trains on exactly the pixels its evaluation
    loads. 'upsampled' reproduces the authors' released code, in which the expert saw the apprentice's
    images upsampled: the loader reads at the apprentice's resolution with the longer queue of the two,
    and the expert gets those images upsampled (`model_inputs`)."""
    import data
    if expert_input == 'upsampled':
        return data.view_of(cfg_a, queue_length=max(cfg_e.queue_length, cfg_a.queue_length)), None
    return data.view_of(cfg_e), data.view_of(cfg_a)


def rescale_frame(frame, cfg):
    """A frame (img [..., N, 3, Hp, Wp], img_shape, lidar2img [..., N, 4, 4]) at one resolution -> the
    same frame at cfg.image_size: content resized as the preset's loader resizes (bevformer.prepare_images:
    bilinear, antialiased for image_loading='fast'), padded as the preset pads, lidar2img left-multiplied
    by diag(sx, sy, 1, 1). Other keys are shared; a frame already at that size is returned as it is."""
    img, l2i = frame['img'], frame['lidar2img']
    lead, N = img.shape[:-4], img.shape[-4]
    shape = torch.as_tensor(frame['img_shape']).reshape(-1, 2)
    if not bool((shape == shape[0]).all()):
        raise ValueError('distill: every image of a batch must have the same content size')
    H, W = int(shape[0, 0]), int(shape[0, 1])
    if (W, H) == tuple(cfg.image_size) and tuple(img.shape[-2:][::-1]) == tuple(cfg.padded_size):
        return dict(frame)
    content = img[..., :H, :W].reshape(-1, 3, H, W).float()  # [B*N (*T), 3, H, W]
    new_img, new_l2i, (h, w) = bevformer.prepare_images(content, l2i.reshape(-1, 4, 4).float(), cfg)
    out = dict(frame)
    out['img'] = new_img.view(*lead, N, 3, *new_img.shape[-2:])
    out['lidar2img'] = new_l2i.view(*lead, N, 4, 4)
    out['img_shape'] = torch.tensor([h, w], device=img.device).expand(*lead, 2).clone()
    return out


def inputs_for(batch, cfg, frames=None):
    """The batch as one model consumes it: its resolution, its own history length (a longer served queue
    keeps its last queue_length - 1 history frames)."""
    out = rescale_frame(batch, cfg)
    keep = cfg.queue_length - 1 if frames is None else frames
    hist = batch.get('history')
    out.pop('history', None)
    out.pop('history_valid', None)
    out.pop('apprentice', None)
    if keep > 0 and hist:
        if isinstance(hist, dict):  # data.collate's layout: [B, T-1, ...] tensors
            T = hist['img'].shape[1]
            hist = {k: (v[:, max(0, T - keep):] if torch.is_tensor(v) and v.dim() >= 2 else v)
                    for k, v in hist.items()}
            out['history'] = rescale_frame(hist, cfg)
        else:  # a list of frame dicts, oldest first
            out['history'] = [rescale_frame(f, cfg) for f in hist[-keep:]]
        if batch.get('history_valid') is not None:
            valid = torch.as_tensor(batch['history_valid'])
            out['history_valid'] = valid[:, max(0, valid.shape[1] - keep):]
    return out


def model_inputs(batch, cfg_e, cfg_a, expert_input='native'):
    """(batch for the expert, batch for the apprentice) from one loaded batch.

    A batch that carries the apprentice's own view (`loader_views`, 'native') gives each model its own;
    'upsampled' gives the expert the loaded (apprentice-size) images upsampled, as the released code did.
    A batch without a view (direct use, benchmarks) is rescaled for the apprentice the way its loader
    would resize it, which gives the same pixels whenever the batch holds the files at their own size."""
    if expert_input == 'upsampled':
        longest = max(cfg_e.queue_length, cfg_a.queue_length) - 1
        small = inputs_for(batch, cfg_a, longest)  # the apprentice's images (as loaded, or downscaled)
        return inputs_for(small, cfg_e), inputs_for(small, cfg_a)
    if 'apprentice' in batch:
        batch_a = {k: v for k, v in batch.items() if k != 'apprentice'}
        batch_a.update(batch['apprentice'])       # its own img, lidar2img, can_bus, history
        return inputs_for(batch, cfg_e), inputs_for(batch_a, cfg_a)
    return inputs_for(batch, cfg_e), inputs_for(batch, cfg_a)


def pair_levels(a_strides, e_strides):
    """For each apprentice FPN level, the expert level with the closest stride in expert pixels
    (equal by construction for the paper's pairs: A strides 4..32 at half size = E 8..64 at full)."""
    return [min(range(len(e_strides)), key=lambda j: abs(math.log(e_strides[j] / s))) for s in a_strides]


# ----------------------------------------------------------------------------------------------------
# 7. The Distiller
# ----------------------------------------------------------------------------------------------------

MODES = ('fd3d', 'heatmap', 'fitnet', 'mgd', 'none')
PARTS = ('pv', 'bev', 'focal')
SELECTIONS = ('matched', 'confident', 'matched+confident')

# Loss weights (see the README's "Paper notes" for how they were chosen): each term starts within an
# order of magnitude of the apprentice's detection loss.
W_PV, W_BEV, W_FOCAL, W_FITNET = 2.0, 4.0, 4.0, 4.0
W_HEATMAP, W_CWD, CWD_TAU = 0.1, 0.25, 2.0  # the released baseline's values


class Distiller(nn.Module):
    """The frozen expert E, the apprentice A and the training-only modules; forward(batch) -> loss dict.

    batch: a collated batch at the EXPERT's resolution with the longer history of the two models.
    Returns A's detection losses plus the weighted distillation terms (their sum is the total):
      fd3d:    kd_pv_<l> (masked generation per apprentice FPN level), kd_bev (masked generation in
               BEV), kd_focal (focal distillation at the expert queries' sampling points)
      mgd:     kd_pv_<l>, kd_bev with the random mask over the whole map
      fitnet:  kd_fitnet;   heatmap: kd_heatmap (BEV), kd_cwd_<l> (FPN levels);   none: nothing
    `distiller.apprentice` is the plain detector (saved as the checkpoint's `model`); `distiller.kd`
    holds the generators, upsampler and adapters (saved under `distiller`); the expert has its own file.
    """

    def __init__(self, expert, apprentice, mode='fd3d', parts=None, select='matched+confident', score=0.3,
                 gate=GATE_METRES,
                 box_scale=1.2, mask_ratio=0.65, areas='pred', bg_weight=0.0, w_pv=W_PV, w_bev=W_BEV,
                 w_focal=W_FOCAL, w_fitnet=W_FITNET, w_heatmap=W_HEATMAP, w_cwd=W_CWD, cwd_tau=CWD_TAU,
                 pv_norm='bn', expert_input='native', init_head=False):
        super().__init__()
        ce, ca = expert.cfg, apprentice.cfg
        has_bev = ce.detector == 'bevformer'
        # FD3D's terms for this detector: DETR3D has no BEV (fd3d.md 6), so its subsets are of pv and focal
        available = PARTS if has_bev else ('pv', 'focal')
        if parts is None:
            parts = available
        parts = tuple(p for p in parts.split(',') if p) if isinstance(parts, str) else tuple(parts)
        checks = [
            (mode in MODES, f'--distill {mode}: expected one of {", ".join(MODES)}'),
            (bool(parts) and set(parts) <= set(available),
             f'--fd3d-parts {",".join(parts)}: expected a non-empty subset of {",".join(available)}'
             + ('' if has_bev else f' ({ce.detector} has no BEV)')),
            (gate >= 0, f'--fd3d-gate {gate}: expected a distance in metres >= 0 (0: off)'),
            (select in SELECTIONS, f'--fd3d-select {select}: expected one of {", ".join(SELECTIONS)}'),
            (areas in ('pred', 'gt'), f"--fd3d-areas {areas}: expected 'pred' or 'gt'"),
            (0 <= mask_ratio <= 1, f'--fd3d-mask-ratio {mask_ratio}: expected a value in [0, 1]'),
            (box_scale > 0, f'--fd3d-box-scale {box_scale}: expected a positive number'),
            (pv_norm in ('bn', 'none'), f"--fd3d-pv-norm {pv_norm}: expected 'bn' or 'none'"),
            (expert_input in ('native', 'upsampled'),
             f"--kd-expert-input {expert_input}: expected 'native' or 'upsampled'"),
            (ce.detector == ca.detector,
             f'--teacher: a {ce.detector} expert ({ce.name}) cannot teach a {ca.detector} apprentice ({ca.name}); '
             'FD3D distils within one detector family'),
            (tuple(ce.pc_range) == tuple(ca.pc_range),
             f'--teacher: expert {ce.name} and apprentice {ca.name} must share pc_range '
             f'({tuple(ce.pc_range)} vs {tuple(ca.pc_range)})'),
            (ce.num_classes == ca.num_classes, f'--teacher: expert {ce.name} has {ce.num_classes} classes, '
                                               f'apprentice {ca.name} {ca.num_classes}'),
            (ce.detector == 'bevformer' or mode != 'fitnet',
             f'--distill {mode}: {ce.detector} has no BEV features (use fd3d, mgd, heatmap or none)'),
        ]
        for ok, msg in checks:
            if not ok:
                raise InputError(msg)
        self.expert, self.apprentice = expert, apprentice
        self.mode, self.parts, self.select, self.score, self.gate = mode, parts, select, score, gate
        self.box_scale, self.mask_ratio, self.areas, self.bg_weight = box_scale, mask_ratio, areas, bg_weight
        self.w = dict(pv=w_pv, bev=w_bev, focal=w_focal, fitnet=w_fitnet, heatmap=w_heatmap, cwd=w_cwd)
        self.cwd_tau, self.pv_norm, self.expert_input = cwd_tau, pv_norm, expert_input
        for p in expert.parameters():  # frozen: no gradient, never in the optimiser
            p.requires_grad_(False)
        expert.eval()
        if init_head:
            init_head_from_expert(apprentice, expert)

        # training-only modules, only those the mode uses (DDP wants every parameter used)
        # DETR3D has no BEV (fd3d.md 6): its focal term samples the generated PV maps
        fd3d_bev = has_bev and mode == 'fd3d' and ('bev' in parts or 'focal' in parts)
        fd3d_pv = mode == 'fd3d' and ('pv' in parts or (not has_bev and 'focal' in parts))
        C_e, C_a = ce.embed_dims, ca.embed_dims
        self.kd = nn.ModuleDict()
        if has_bev and (fd3d_bev or mode in ('mgd', 'fitnet', 'heatmap')):
            hw_e, hw_a = (ce.bev_h, ce.bev_w), (ca.bev_h, ca.bev_w)
            self.kd['bev_adapter'] = adapter(C_a, C_e)
            self.kd['bev_up'] = BEVUpsampler(C_e, hw_a, hw_e)
        if fd3d_bev or (has_bev and mode == 'mgd'):
            self.kd['bev_gen'] = Generator(C_e)
        if fd3d_pv or mode in ('mgd', 'heatmap'):
            self.kd['pv_adapters'] = nn.ModuleList(adapter(C_a, C_e) for _ in range(ca.fpn_levels))
        if fd3d_pv or mode == 'mgd':
            self.kd['pv_gens'] = nn.ModuleList(Generator(C_e) for _ in range(ca.fpn_levels))

    def train(self, mode=True):
        """The expert stays in eval mode for every frame (no GridMask, no dropout in the teacher)."""
        super().train(mode)
        self.expert.eval()
        return self

    # ---- the expert's view: aligned queries and their boxes ----------------------------------------
    @torch.no_grad()
    def focal_queries(self, out_e, batch):
        """-> (sel [B, Q] bool, boxes: list per sample of [K, 9]) from the expert's last decoder layer."""
        last, ce = out_e['dec'][-1], self.expert.cfg
        gt_boxes = [g.to(last['cls'].device).float() for g in batch['gt_boxes']]
        gt_labels = [g.to(last['cls'].device).long() for g in batch['gt_labels']]
        sel = select_queries(last['cls'], last['box'], gt_boxes, gt_labels, self.select, self.score, self.gate,
                             cls_weight=ce.cls_weight, reg_weight=ce.bbox_weight, alpha=ce.focal_alpha,
                             gamma=ce.focal_gamma)
        if self.areas == 'gt':
            return sel, gt_boxes
        return sel, [predicted_boxes(last['box'][b][sel[b]]) for b in range(sel.shape[0])]

    def bev_areas(self, boxes, hw, like):
        """Focal areas [B, H, W] on a BEV grid of size hw (boxes None: the whole map, for MGD)."""
        if boxes is None:
            return torch.ones(like.shape[0], *hw, device=like.device)
        return torch.stack([bev_focal_area(b.to(like.device), hw, self.expert.cfg.pc_range, self.box_scale)
                            for b in boxes])

    def pv_areas(self, boxes, batch, level_hw):
        """Focal areas per FPN level, each [B, N, h, w] (None boxes: the whole map)."""
        l2i, pad = batch['lidar2img'], tuple(batch['img'].shape[-2:])
        B, N = l2i.shape[:2]
        if boxes is None:
            return [torch.ones(B, N, h, w, device=l2i.device) for h, w in level_hw]
        per_sample = [pv_focal_areas(b, l2i[i], pad, level_hw, self.box_scale) for i, b in enumerate(boxes)]
        return [torch.stack([s[lvl] for s in per_sample]) for lvl in range(len(level_hw))]

    # ---- the distillation terms -------------------------------------------------------------------
    def level_pairs(self, out_e, out_a, batch_e, batch_a):
        """-> (for each apprentice FPN level the expert level of the same stride in expert pixels,
        (sx, sy) apprentice pixels per expert pixel)."""
        pad_e, pad_a = tuple(batch_e['img'].shape[-2:]), tuple(batch_a['img'].shape[-2:])
        se = torch.as_tensor(batch_e['img_shape']).reshape(-1, 2)[0].tolist()
        sa = torch.as_tensor(batch_a['img_shape']).reshape(-1, 2)[0].tolist()
        scale = (sa[1] / se[1], sa[0] / se[0])
        pairs = pair_levels([pad_a[1] / f.shape[-1] / scale[0] for f in out_a['fpn']],
                            [pad_e[1] / f.shape[-1] for f in out_e['fpn']])
        return pairs, scale

    def pv_terms(self, out_e, out_a, batch_e, batch_a, boxes, generate, keep=None):
        """Per apprentice FPN level: masked generation (fd3d, mgd) or channel-wise distillation
        (heatmap), against the expert level of the same stride. `keep` (a dict) receives, per expert
        level j, (generated map, expert target) as [B*N, C, h, w] (DETR3D's focal term samples them)."""
        pad_e, pad_a = tuple(batch_e['img'].shape[-2:]), tuple(batch_a['img'].shape[-2:])
        hw_a = [tuple(f.shape[-2:]) for f in out_a['fpn']]
        hw_e = [tuple(f.shape[-2:]) for f in out_e['fpn']]
        pairs, scale = self.level_pairs(out_e, out_a, batch_e, batch_a)
        if generate:
            area_a, area_e = self.pv_areas(boxes, batch_a, hw_a), self.pv_areas(boxes, batch_e, hw_e)
        terms = {}
        for i, (f_a, j) in enumerate(zip(out_a['fpn'], pairs)):
            f_e = out_e['fpn'][j].flatten(0, 1)  # [B*N, C, h, w]
            align = lambda x, hw: align_pv(x, hw, pad_a, pad_e, scale)  # noqa: E731
            if generate:
                if self.pv_norm == 'bn':  # the expert's map standardised per channel (see `standardise`)
                    f_e = standardise(f_e)
                f_hat = masked_generation(f_a.flatten(0, 1), area_a[i].flatten(0, 1), self.kd['pv_adapters'][i],
                                          align, self.kd['pv_gens'][i], self.mask_ratio, f_e.shape[-2:])
                terms[f'kd_pv_{i}'] = self.w['pv'] * gen_loss(f_hat, f_e, area_e[j].flatten(0, 1), self.bg_weight)
                if keep is not None:
                    keep[j] = (f_hat, f_e)
            else:
                f_a = align(self.kd['pv_adapters'][i](f_a.flatten(0, 1)), f_e.shape[-2:])
                terms[f'kd_cwd_{i}'] = self.w['cwd'] * cwd_loss(f_a, f_e, self.cwd_tau)
        return terms

    def distill_losses(self, out_e, out_a, batch_e, batch_a):
        """The weighted distillation terms of the mode (a dict of scalars)."""
        if 'bev' not in out_e:  # DETR3D: PV generation + focal distillation at the reference points
            import detr3d
            return detr3d.distill_terms(self, out_e, out_a, batch_e, batch_a)
        kd, terms = self.kd, {}
        bev_e, bev_a = out_e['bev'], out_a['bev']
        hw_e, hw_a = tuple(bev_e.shape[-2:]), tuple(bev_a.shape[-2:])
        if self.mode in ('fd3d', 'mgd'):
            # fd3d: areas from the selected expert queries (or GT); mgd: the whole map
            sel, boxes = self.focal_queries(out_e, batch_e) if self.mode == 'fd3d' else (None, None)
            parts = self.parts if self.mode == 'fd3d' else ('pv', 'bev')
            if 'bev' in parts or 'focal' in parts:
                area_e = self.bev_areas(boxes, hw_e, bev_e)
                f_hat = masked_generation(bev_a, self.bev_areas(boxes, hw_a, bev_e), kd['bev_adapter'],
                                          kd['bev_up'], kd['bev_gen'], self.mask_ratio, hw_e)  # [B, C, He, We]
                if 'bev' in parts:
                    terms['kd_bev'] = self.w['bev'] * gen_loss(f_hat, bev_e, area_e, self.bg_weight)
                if 'focal' in parts:
                    terms['kd_focal'] = self.w['focal'] * focal_loss(f_hat, bev_e, out_e['dec'], sel)
            if 'pv' in parts:
                terms.update(self.pv_terms(out_e, out_a, batch_e, batch_a, boxes, generate=True))
        elif self.mode == 'fitnet':
            up = kd['bev_up'](kd['bev_adapter'](bev_a), hw_e)
            terms['kd_fitnet'] = self.w['fitnet'] * fitnet_loss(up, bev_e)
        elif self.mode == 'heatmap':
            heat = torch.stack([gaussian_heatmap(g.to(bev_e.device).float(), hw_e,
                                                  self.expert.cfg.pc_range) for g in batch_e['gt_boxes']])
            up = kd['bev_up'](kd['bev_adapter'](bev_a), hw_e)
            terms['kd_heatmap'] = self.w['heatmap'] * heatmap_bev_loss(up, bev_e, heat)
            terms.update(self.pv_terms(out_e, out_a, batch_e, batch_a, None, generate=False))
        return terms

    def forward(self, batch):
        """A collated batch at the expert's resolution -> dict of scalar losses (sum = total)."""
        batch_e, batch_a = model_inputs(batch, self.expert.cfg, self.apprentice.cfg, self.expert_input)
        out_a = self.apprentice(batch_a)
        losses = dict(self.apprentice.loss(out_a, batch_a))
        if self.mode == 'none':
            return losses
        self.expert.eval()
        with torch.no_grad():
            out_e = self.expert(batch_e)
        losses.update(self.distill_losses(out_e, out_a, batch_e, batch_a))
        return losses


# ----------------------------------------------------------------------------------------------------
# 8. Pictures: selected queries, focal areas and sampling points over both BEV maps (DETR3D: per camera)
# ----------------------------------------------------------------------------------------------------

def _footprint(box):
    """The 4 ground corners (x, y) of one box [9], in drawing order -> [4, 2]."""
    return box_corners(box[None], 1.0)[0, [2, 3, 7, 6], :2]


@torch.no_grad()
def vis_focal(distiller, batch, path):
    """One PNG for the first sample of `batch` (collated, at the expert's resolution): the expert's and the
    apprentice's BEV maps (per-cell feature norm, in metres), the BEV focal area (yellow outline), the
    selected expert queries' boxes (red), their last decoder layer's sampling points (cyan, size ~
    attention weight) and the GT boxes (green, dashed). Returns the number of selected queries."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    d = distiller
    batch_e, batch_a = model_inputs(batch, d.expert.cfg, d.apprentice.cfg, d.expert_input)
    was_training = d.apprentice.training
    d.apprentice.eval()
    out_a = d.apprentice(batch_a)
    d.apprentice.train(was_training)
    out_e = d.expert.eval()(batch_e)
    sel, boxes = d.focal_queries(out_e, batch_e)
    if 'bev' not in out_e:  # DETR3D: no BEV, the picture is per camera
        _draw_pv_focal(d, batch_e, batch_a, out_e, out_a, sel, boxes, path)
        return int(sel[0].sum())
    pc = d.expert.cfg.pc_range
    hw = tuple(out_e['bev'].shape[-2:])
    area = bev_focal_area(boxes[0], hw, pc, d.box_scale).cpu()
    xs = torch.linspace(pc[0], pc[3], hw[1] + 1)[:-1] + (pc[3] - pc[0]) / hw[1] / 2  # cell centres
    ys = torch.linspace(pc[1], pc[4], hw[0] + 1)[:-1] + (pc[4] - pc[1]) / hw[0] / 2
    last = out_e['dec'][-1]
    loc = last['loc'][0, sel[0]].cpu()  # [K, M, 1, P, 2] normalised (x, y)
    attn = last['attn'][0, sel[0]].cpu()  # [K, M, 1, P]
    px, py = pc[0] + loc[..., 0] * (pc[3] - pc[0]), pc[1] + loc[..., 1] * (pc[4] - pc[1])
    fig, axes = plt.subplots(1, 2, figsize=(13, 6.5))
    for ax, name, bev in [(axes[0], f'expert {d.expert.cfg.name}', out_e['bev'][0]),
                          (axes[1], f'apprentice {d.apprentice.cfg.name}', out_a['bev'][0])]:
        ax.imshow(bev.float().norm(dim=0).cpu(), origin='lower', cmap='gray', extent=(pc[0], pc[3], pc[1], pc[4]))
        if area.any():
            ax.contour(xs, ys, area, levels=[0.5], colors='yellow', linewidths=0.8)
        for g in batch_e['gt_boxes'][0].float().cpu():
            ax.add_patch(plt.Polygon(_footprint(g), fill=False, ec='lime', ls='--', lw=0.8))
        for b in boxes[0].cpu():
            ax.add_patch(plt.Polygon(_footprint(b), fill=False, ec='red', lw=1.0))
        ax.scatter(px.flatten(), py.flatten(), s=2 + 30 * attn.flatten(), c='cyan', alpha=0.6, linewidths=0)
        ax.set_title(f'{name} BEV {tuple(bev.shape[-2:])}: {int(sel[0].sum())} queries ({d.select})')
        ax.set_xlim(pc[0], pc[3])
        ax.set_ylim(pc[1], pc[4])
        ax.set_xlabel('x (m, LIDAR_TOP)')
        ax.set_ylabel('y (m)')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return int(sel[0].sum())


def _draw_pv_focal(d, batch_e, batch_a, out_e, out_a, sel, boxes, path):
    """DETR3D's picture (fd3d.md 6): one column per camera. Row 1: the expert's input image with the
    selected queries' focal rectangles (red), the GT boxes' rectangles (green, dashed) and the last
    decoder layer's projected reference points of the selected queries where visible (cyan, size ~
    summed sigmoid weight). Rows 2-3: the apprentice's finest FPN level and the expert level the loss
    pairs with it (`Distiller.level_pairs`; feature norm over the padded image) with the PV focal area
    of that expert level (yellow)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    img = batch_e['img'][0].float().cpu()                            # [N, 3, Hp, Wp] RGB 0..255
    N, (Hp, Wp) = img.shape[0], img.shape[-2:]
    l2i = batch_e['lidar2img'][0].float()
    rect, ok = project_boxes(boxes[0].float(), l2i, (Hp, Wp), d.box_scale)            # [N, K, 4], [N, K]
    g_rect, g_ok = project_boxes(batch_e['gt_boxes'][0].float().to(l2i.device), l2i, (Hp, Wp), 1.0)
    last = out_e['dec'][-1]
    uv = last['uv'][0, sel[0]].cpu() * torch.tensor([Wp, Hp])                            # [K, N, 2] pixels
    vis = last['mask'][0, sel[0]].cpu()                                                  # [K, N]
    weight = last['attn'][0, sel[0]].sum(-1).cpu()                                       # [K, N]
    e_level = d.level_pairs(out_e, out_a, batch_e, batch_a)[0][0]   # the expert level paired with A's level 0
    f_e = out_e['fpn'][e_level][0].float().norm(dim=1).cpu()                             # [N, h, w]
    area = d.pv_areas(boxes, batch_e, [tuple(f_e.shape[-2:])])[0][0].cpu()               # [N, h, w]
    f_a = out_a['fpn'][0][0].float().norm(dim=1).cpu()
    extent = (0, Wp, Hp, 0)
    fig, axes = plt.subplots(3, N, figsize=(3.2 * N, 6.2), squeeze=False)
    for n in range(N):
        ax = axes[0, n]
        ax.imshow(img[n].permute(1, 2, 0).clamp(0, 255).byte().numpy(), extent=extent)
        for (u0, v0, u1, v1), good in zip(g_rect[n].cpu().tolist(), g_ok[n].cpu().tolist()):
            if good:
                ax.add_patch(plt.Rectangle((u0, v0), u1 - u0, v1 - v0, fill=False, ec='lime', ls='--', lw=0.7))
        for (u0, v0, u1, v1), good in zip(rect[n].cpu().tolist(), ok[n].cpu().tolist()):
            if good:
                ax.add_patch(plt.Rectangle((u0, v0), u1 - u0, v1 - v0, fill=False, ec='red', lw=0.9))
        m = vis[:, n]
        ax.scatter(uv[m, n, 0], uv[m, n, 1], s=4 + 20 * weight[m, n], c='cyan', linewidths=0)
        name = CAMERAS[n] if N == len(CAMERAS) else f'camera {n}'
        ax.set_title(f'{name}: {int(m.sum())} reference points', fontsize=8)
        for row, fmap, who in ((1, f_e[n], f'expert {d.expert.cfg.name}'),
                               (2, f_a[n], f'apprentice {d.apprentice.cfg.name}')):
            ax = axes[row, n]
            ax.imshow(fmap, cmap='gray', extent=extent)
            if area[n].any():
                ax.contour(area[n], levels=[0.5], colors='yellow', linewidths=0.8,
                           extent=(0, Wp, 0, Hp), origin='upper')
            ax.set_title(f'{who} FPN {tuple(fmap.shape)}', fontsize=8)
    for ax in axes.flat:
        ax.set_xlim(0, Wp)
        ax.set_ylim(Hp, 0)
        ax.axis('off')
    fig.suptitle(f'{int(sel[0].sum())} selected expert queries ({d.select}): focal rectangles red, GT green, '
                 f'reference points cyan, PV focal area yellow', fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def focal_pictures(apprentice, ckpt_path, teacher, dataroot, version, split, k, out_dir, device, teacher_preset=None):
    """`evaluate.py --ckpt A.pt --vis-focal K [--teacher E.pt]`: K pictures (vis_focal) spread over the
    split under out_dir. The expert is --teacher or the one recorded in the checkpoint's arguments."""
    import os

    import data
    import models
    args = models.load_checkpoint(ckpt_path)['args'] if ckpt_path else {}
    teacher_preset = teacher_preset if teacher else args.get('teacher_preset')
    teacher = teacher or args.get('teacher')
    if not teacher:
        raise InputError('--vis-focal: give --teacher CKPT (the checkpoint does not name its expert)')
    expert, _, _ = models.model_from_checkpoint(teacher, '--teacher', teacher_preset)
    d = Distiller(expert=expert.to(device), apprentice=apprentice.to(device), mode='fd3d',
                  select=args.get('fd3d_select', 'matched+confident'), score=args.get('fd3d_score', 0.3),
                  gate=args.get('fd3d_gate', 0.0),
                  box_scale=args.get('fd3d_box_scale', 1.2), areas=args.get('fd3d_areas', 'pred'),
                  expert_input=args.get('kd_expert_input', 'native'))
    view, apprentice_view = loader_views(expert.cfg, apprentice.cfg, d.expert_input)
    ds = data.NuScenesDataset(dataroot, version=version, split=split, train=False, view=view,
                              apprentice=apprentice_view)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i in sorted({int(j) for j in torch.linspace(0, len(ds) - 1, max(1, k))}):
        batch = data.to_device(data.collate([ds[i]]), device)
        path = os.path.join(out_dir, f'{i:04d}_{ds.sample_tokens[i]}.png')
        n = vis_focal(d, batch, path)
        print(f'wrote {path} ({n} selected queries)')
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------------
# 9. CLI: the time breakdown of a distillation step, and the paper's table in miniature
# ----------------------------------------------------------------------------------------------------

PAIRS = {'cpu': ('cpu-base', 'cpu-tiny'), 'paper-tiny': ('base-r101', 'fd3d-tiny'),
         'paper-small': ('base', 'fd3d-small')}  # expert -> apprentice presets


def bench(pair='cpu', device='cpu', iters=3, warmup=1):
    """Print the time breakdown of one FD3D training step (batch 1, random weights, full history):
    expert forward, apprentice forward(+loss)/backward, distillation losses with generators, and the
    distillation overhead (everything except the expert's forward) relative to the apprentice-only step.
    Also prints each term's starting magnitude beside the detection loss (how the weights were chosen)."""
    import dataclasses
    import os
    import time
    dev = torch.device(device)
    e_name, a_name = PAIRS[pair]
    torch.manual_seed(0)
    expert = bevformer.BEVFormer(bevformer.get_config(e_name)).to(dev)
    apprentice = bevformer.BEVFormer(bevformer.get_config(a_name)).to(dev)
    d = Distiller(expert=expert, apprentice=apprentice, mode='fd3d').to(dev).train()
    queue = max(expert.cfg.queue_length, apprentice.cfg.queue_length)
    import data
    import evaluate
    batch = data.to_device(evaluate.example_batch(dataclasses.replace(expert.cfg, queue_length=queue)), dev)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == 'cuda' else (lambda: None)

    def clock():  # (wall, CPU seconds of this process): the second is steadier on a shared machine
        sync()
        return torch.tensor([time.perf_counter(), time.process_time()])

    rows = []
    for it in range(warmup + iters):
        t0 = clock()
        be, ba = model_inputs(batch, expert.cfg, apprentice.cfg)
        t1 = clock()
        with torch.no_grad():
            out_e = expert(be)
        t2 = clock()
        out_a = apprentice(ba)
        det = apprentice.loss(out_a, ba)
        t3 = clock()
        kd = d.distill_losses(out_e, out_a, be, ba)
        t4 = clock()
        (sum(det.values()) + sum(kd.values())).backward()
        t5 = clock()
        d.zero_grad(set_to_none=True)
        # the apprentice alone on the same inputs (mode 'none')
        ba = model_inputs(batch, expert.cfg, apprentice.cfg)[1]
        t6 = clock()
        loss = sum(apprentice.loss(apprentice(ba), ba).values())
        t7 = clock()
        loss.backward()
        t8 = clock()
        d.zero_grad(set_to_none=True)
        if it >= warmup:
            rows.append(dict(inputs=t1 - t0, expert_fwd=t2 - t1, app_fwd_loss=t3 - t2, kd_losses=t4 - t3,
                             backward=t5 - t4, step=t5 - t0, app_fwd_only=t7 - t6, app_bwd_only=t8 - t7,
                             app_only=t8 - t6))
        if it == 0:
            ldet = float(sum(det.values()).detach())
            raw = {k: float(v.detach()) / {'kd_b': d.w['bev'], 'kd_f': d.w['focal'], 'kd_p': d.w['pv']}[k[:4]]
                   for k, v in kd.items()}
    med = {k: torch.stack([r[k] for r in rows]).median(0).values.tolist() for k in rows[0]}  # [wall, cpu]
    # what distillation adds to the apprentice's own step, the expert's forward aside: the input
    # downscale, the losses with their modules, and the extra backward through generators/upsampler
    overhead = [med['inputs'][i] + med['kd_losses'][i] + max(0.0, med['backward'][i] - med['app_bwd_only'][i])
                for i in range(2)]
    print(f'FD3D step {e_name} -> {a_name} on {dev} (batch 1, history {queue - 1} frames, random weights, '
          f'median of {iters} after {warmup} warm-up; {torch.get_num_threads()} threads, '
          f'load average {os.getloadavg()[0]:.1f})')
    print(f'  {"":40s} {"wall s":>8s} {"CPU s":>8s}')
    for k, label in [('inputs', 'inputs (apprentice downscale)'), ('expert_fwd', 'expert forward (no grad)'),
                     ('app_fwd_loss', 'apprentice forward + loss'), ('kd_losses', 'distillation losses + generators'),
                     ('backward', 'backward (apprentice + generators)'), ('step', 'FD3D step total'),
                     ('app_fwd_only', 'apprentice alone: forward + loss'),
                     ('app_bwd_only', 'apprentice alone: backward'),
                     ('app_only', 'apprentice-only step (fwd+loss+bwd)')]:
        print(f'  {label:40s} {med[k][0]:8.3f} {med[k][1]:8.3f}')
    print(f'  {"distillation overhead (inputs+losses+extra bwd)":40s} {overhead[0]:8.3f} {overhead[1]:8.3f}'
          f'   = {overhead[0] / med["app_only"][0]:.2f}x wall, {overhead[1] / med["app_only"][1]:.2f}x CPU '
          'of the apprentice-only step (target <= 0.5x)')
    print(f'  starting magnitudes: detection loss {ldet:.2f}; unweighted ' +
          ', '.join(f'{k} {v:.3f}' for k, v in raw.items()) + '; weighted ' +
          ', '.join(f'{k} {float(v.detach()):.3f}' for k, v in kd.items()))
    return med


# The FD3D rows below were run before the query gate existed: they pin `--fd3d-gate 0` so that they stay
# what their results are; 'fd3d gated' is the default FD3D (docs/fd3d.md).
UNGATED = ['--fd3d-gate', '0']
TABLE_RUNS = [  # (row name, --distill mode, extra train.py flags, seeds); the paper's comparison first
    ('none', 'none', [], 3),
    ('fd3d', 'fd3d', UNGATED, 3),
    ('heatmap', 'heatmap', [], 3),  # 3 seeds too: the goal compares FD3D with it, and the gap is small
    ('fitnet', 'fitnet', [], 1),
    ('mgd', 'mgd', [], 1),
    ('fd3d w/o focal', 'fd3d', UNGATED + ['--fd3d-parts', 'pv,bev'], 1),
    ('fd3d w/o generation', 'fd3d', UNGATED + ['--fd3d-parts', 'focal', '--fd3d-mask-ratio', '0'], 1),
    ('fd3d areas from GT', 'fd3d', UNGATED + ['--fd3d-areas', 'gt'], 1),
    ('fd3d gated', 'fd3d', [], 1),
]
# The DETR3D rows (fd3d.md 6): expert detr3d-cpu-base -> apprentice detr3d-cpu-tiny, same world and schedule
DETR3D_RUNS = [('detr3d none', 'none', [], 2), ('detr3d fd3d', 'fd3d', UNGATED, 2)]
# Many short scenes, as data.DEFAULT_WORLD (cpu-tiny overfits a few long ones), at 400x225 for the expert
# cpu-base; 480 validation samples so that the spread between seeds can be measured.
TABLE_WORLD = dict(version='v1.0-trainval', train_scenes=80, val_scenes=40, samples_per_scene=12, image_scale=0.25)
# minutes: wall time of the table invocation that finished the run, evaluation included (a run resumed
# after an interruption counts only its last part; its log.jsonl's 'dt' has every iteration's time)
TABLE_FIELDS = ['run', 'seed', 'mode', 'flags', 'iters', 'NDS', 'mAP', 'minutes']


def run_folder(name, seed):
    """The folder (under the table's OUT) of one row's run: 'expert', 'detr3d-expert', 'fd3d_wo_focal-s1'."""
    experts = {'expert cpu-base': 'expert', 'expert detr3d-cpu-base': 'detr3d-expert'}
    return experts.get(name) or f"{name.replace(' ', '_').replace('/', '')}-s{seed}"


def read_table(csv_path):
    """Finished rows of the table CSV (an absent file: none)."""
    import csv
    import os
    if not os.path.exists(csv_path):
        return []
    with open(csv_path, newline='') as f:
        return list(csv.DictReader(f))


def train_command(dataroot, version, out, iters, extra, threads=0):
    """The train.py command of one table run (one fixed schedule for every apprentice run)."""
    import sys
    return [sys.executable, 'train.py', '--dataroot', dataroot, '--version', version,
            '--iters', str(iters), '--out', out, '--workers', '2', '--log-every', '50'] + (
            ['--threads', str(threads)] if threads else []) + extra


def run_subprocess(cmd, log_path):
    """Run one train.py command, its output into log_path; -> (return code, last stdout line)."""
    import subprocess
    with open(log_path, 'a') as log:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        log.write(proc.stdout)
    lines = [line for line in proc.stdout.strip().splitlines() if line.strip()]
    return proc.returncode, lines[-1] if lines else ''


def run_table(out='runs/table', dataroot='data/table_world', iters=2000, expert_iters=4000, runs=TABLE_RUNS,
              runner=run_subprocess, only=None, version=TABLE_WORLD['version'], detr3d_runs=(), threads=0,
              parallel=1):
    """The paper's table in miniature (expert cpu-base, apprentice cpu-tiny), resumable: a run whose row is
    in OUT/table.csv is skipped; an interrupted run continues from its last.pt (`train.py --resume`);
    every finished run appends its row at once, so the command can run in parts. `parallel` train.py runs
    go at a time (an apprentice only once its expert's row is written). -> the CSV rows."""
    import concurrent.futures
    import os
    families = [('cpu-base', 'cpu-tiny', runs)]
    if detr3d_runs:  # a second family (detr3d.py) with its own expert, trained first
        families.append(('detr3d-cpu-base', 'detr3d-cpu-tiny', detr3d_runs))
    unknown = sorted(set(only or ()) - {r[0] for family in families for r in family[2]})
    if unknown:
        raise InputError(f'--only {",".join(unknown)}: expected row names among '
                         f'{", ".join(r[0] for family in families for r in family[2])}')
    os.makedirs(out, exist_ok=True)
    if not os.path.isdir(dataroot):
        import data
        print(f'writing the table world to {dataroot}: {TABLE_WORLD}')
        data.write_synthetic_world(dataroot, **TABLE_WORLD)
    csv_path = os.path.join(out, 'table.csv')
    done = {(r['run'], r['seed']) for r in read_table(csv_path)}
    jobs = []  # (row name, mode, flags, seed, iterations, folder, the row it needs first), in start order
    for e_name, a_name, family in families:
        if only and not any(r[0] in only for r in family):
            continue
        expert_row = (f'expert {e_name}', '0')
        e_folder = run_folder(*expert_row)
        expert = os.path.join(out, e_folder, 'last.pt')
        jobs.append((expert_row[0], None, ['--model', e_name, '--seed', '0'], 0, expert_iters, e_folder, None))
        # seed-major (a stable sort keeps the rows' order within a seed): every row's seed 0 comes
        # before any seed 1, so a table run in parts has every row early
        rows = sorted(((seed, row) for row in family for seed in range(row[3])), key=lambda j: j[0])
        for seed, (name, mode, flags, _) in rows:
            if not only or name in only:
                jobs.append((name, mode, ['--teacher', expert, '--student', a_name, '--distill', mode,
                                          '--seed', str(seed)] + flags, seed, iters, run_folder(name, seed),
                             expert_row))
    todo = [j for j in jobs if (j[0], str(j[3])) not in done]

    def start(job, pool):
        name, mode, flags, seed, n_iters, folder, _ = job
        run_dir = os.path.join(out, folder)
        ckpt = os.path.join(run_dir, 'last.pt')
        cmd = train_command(dataroot, version, run_dir, n_iters, flags, threads)
        if os.path.exists(ckpt):  # interrupted earlier: continue exactly where it stopped
            cmd = cmd + ['--resume', ckpt]
        print(f'[table] {name} seed {seed}: {" ".join(cmd[1:])}', flush=True)
        os.makedirs(run_dir, exist_ok=True)
        return pool.submit(timed, runner, cmd, os.path.join(run_dir, 'table_log.txt'))

    running, failure = {}, None
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        while True:
            while failure is None and len(running) < max(1, parallel):  # start what may start, in order
                job = next((j for j in todo if j[6] is None or j[6] in done), None)
                if job is None:
                    break
                todo.remove(job)
                running[start(job, pool)] = job
            if not running:  # finished, or nothing may start after a failure
                break
            finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                name, mode, flags, seed, n_iters, folder, _ = running.pop(future)
                code, last, minutes = future.result()
                parts = last.split()
                if code != 0 or len(parts) != 4 or parts[0] != 'NDS':
                    failure = failure or (f'table run {name} seed {seed} failed (exit {code}); '
                                          f'see {os.path.join(out, folder)}/table_log.txt')
                    continue  # the runs still going finish and keep their rows
                row = dict(run=name, seed=seed, mode=mode or 'expert', flags=' '.join(flags), iters=n_iters,
                           NDS=float(parts[1]), mAP=float(parts[3]), minutes=minutes)
                append_row(csv_path, row)
                done.add((name, str(seed)))
                print(f'[table] {name} seed {seed}: NDS {row["NDS"]:.4f} mAP {row["mAP"]:.4f}', flush=True)
    if failure:
        raise RuntimeError(failure)
    rows = read_table(csv_path)
    print(summarise_table(rows, out))
    return rows


def timed(runner, cmd, log_path):
    """runner(cmd, log_path) -> (return code, last stdout line, wall minutes)."""
    import time
    t0 = time.time()
    code, last = runner(cmd, log_path)
    return code, last, round((time.time() - t0) / 60, 1)


def append_row(csv_path, row):
    """Append one finished run to the table CSV (the header first when the file is new)."""
    import csv
    import os
    new = not os.path.exists(csv_path)
    with open(csv_path, 'a', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=TABLE_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def summarise_table(rows, out=None):
    """Markdown table: NDS and mAP mean +- standard deviation over seeds per run; with `out` (the table's
    folder) also the mean true-positive errors of the paper's table (mATE ... mAAE) from every run's
    metrics_summary.json (a run without one leaves its cells '-')."""
    import json
    import os
    import statistics
    groups = {}
    for r in rows:
        groups.setdefault(r['run'], []).append(r)
    canonical = (['expert cpu-base'] + [r[0] for r in TABLE_RUNS] + ['expert detr3d-cpu-base'] +
                 [r[0] for r in DETR3D_RUNS])
    order = sorted(groups, key=lambda n: canonical.index(n) if n in canonical else len(canonical))  # paper's order
    tp = [('mATE', 'trans_err'), ('mASE', 'scale_err'), ('mAOE', 'orient_err'), ('mAVE', 'vel_err'),
          ('mAAE', 'attr_err')] if out else []
    lines = ['| run | seeds | NDS | mAP |' + ''.join(f' {name} |' for name, _ in tp),
             '|---|---|---|---|' + '---|' * len(tp)]
    for name in order:
        g = groups[name]
        cell = []
        for key in ('NDS', 'mAP'):
            v = [100 * float(r[key]) for r in g]
            cell.append(f'{statistics.mean(v):.2f}' + (f' +- {statistics.stdev(v):.2f}' if len(v) > 1 else ''))
        errors = []
        for r in g if out else []:  # evaluate.py's summary of each seed's run
            path = os.path.join(out, run_folder(r['run'], r['seed']), 'metrics_summary.json')
            if os.path.exists(path):
                with open(path) as f:
                    errors.append(json.load(f)['tp_errors'])
        for _, key in tp:
            cell.append(f'{statistics.mean(e[key] for e in errors):.3f}' if len(errors) == len(g) else '-')
        lines.append(f'| {name} | {len(g)} | ' + ' | '.join(cell) + ' |')
    return '\n'.join(lines)


def main(argv=None):
    import argparse
    import os
    import sys
    p = argparse.ArgumentParser(description='FD3D: `bench` (time breakdown of a distillation step) and `table` '
                                            '(the paper\'s table in miniature on the synthetic world).')
    sub = p.add_subparsers(dest='cmd', required=True)
    b = sub.add_parser('bench', help='time breakdown of one FD3D training step')
    b.add_argument('--pair', default='cpu', choices=sorted(PAIRS), help='expert -> apprentice presets')
    b.add_argument('--device', default='cpu', help="'cpu' or 'cuda'")
    b.add_argument('--iters', type=int, default=3, help='timed iterations (after one warm-up)')
    t = sub.add_parser('table', help='the miniature table (resumable; results accumulate in OUT/table.csv)')
    t.add_argument('--out', default='runs/table', help='runs and table.csv')
    t.add_argument('--dataroot', default='data/table_world', help='the table world (written if missing)')
    t.add_argument('--iters', type=int, default=2000, help='iterations of every apprentice run (one schedule)')
    t.add_argument('--expert-iters', type=int, default=4000, help='iterations of the cpu-base expert')
    t.add_argument('--only', help='comma-separated row names to run now (the expert always comes first)')
    t.add_argument('--summary', action='store_true', help='print the table of the finished rows (mean +- std '
                   'over seeds, with the TP errors) and run nothing')
    t.add_argument('--jobs', type=int, default=1, help='train.py runs at a time (an apprentice starts once its '
                   'expert is trained); on a 2-core CPU --jobs 2 --threads 1')
    t.add_argument('--threads', type=int, default=0, help="torch CPU threads of each train.py run (0: train.py's "
                   'default)')
    args = p.parse_args(argv)
    try:
        if args.cmd == 'bench':
            bench(args.pair, args.device, args.iters)
        else:
            if args.summary:
                print(summarise_table(read_table(os.path.join(args.out, 'table.csv')), args.out))
                return
            if args.jobs < 1 or args.threads < 0:
                raise InputError(f'--jobs {args.jobs} --threads {args.threads}: '
                                 'expected --jobs >= 1 and --threads >= 0')
            run_table(args.out, args.dataroot, args.iters, args.expert_iters,
                      only=set(args.only.split(',')) if args.only else None, detr3d_runs=DETR3D_RUNS,
                      threads=args.threads, parallel=args.jobs)
    except (InputError, RuntimeError) as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    main()
