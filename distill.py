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
  6. inputs: one batch at the expert's resolution, an anti-aliased downscale for the apprentice
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

from ops import ms_deform_attn

PC_RANGE = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)  # x_min, y_min, z_min, x_max, y_max, z_max (metres)


# ----------------------------------------------------------------------------------------------------
# 1. Instance (focal) areas (paper Fig. 2: "3D bbox" projected to BEV and to PV)
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


def area_to_grid(area, hw):
    """An expert-grid area [B, H, W] on another grid [B, h, w]: max-pooled (a coarse cell is in the area
    when any expert cell under it is), nearest when the other grid is finer."""
    if tuple(area.shape[-2:]) == tuple(hw):
        return area
    if hw[0] <= area.shape[-2] and hw[1] <= area.shape[-1]:
        return F.adaptive_max_pool2d(area[:, None], hw)[:, 0]
    return F.interpolate(area[:, None], size=hw, mode='nearest')[:, 0]


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


def resize_to(x, hw):
    """Bilinear resize of an apprentice map [B, C, h, w] to the expert's size (a no-op if equal)."""
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    return F.interpolate(x, size=tuple(hw), mode='bilinear', align_corners=False)


# ----------------------------------------------------------------------------------------------------
# 4. Losses
# ----------------------------------------------------------------------------------------------------

def masked_generation(f_a, area_e, adapt, upsample, generate, mask_ratio):
    """Masked feature generation (paper Fig. 2 "Generator"): F^ = G(U(adapt(F_A) * (1 - P))).

    f_a [B, Ca, h, w] apprentice map; area_e [B, H, W] focal area on the expert's grid. The random mask
    P is drawn on the apprentice's own grid (the area max-pooled to it) and applied before the
    upsampler, so the generator must rebuild the masked cells from their context. -> [B, C, H, W].
    """
    x = adapt(f_a)
    p = random_focal_mask(area_to_grid(area_e, x.shape[-2:]), mask_ratio)  # [B, h, w]
    x = x * (1 - p[:, None])
    return generate(upsample(x, area_e.shape[-2:]))


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
