"""FD3D, the Focal Distiller, and the baseline distillers, in plain PyTorch: the method only.

Paper: J. Zeng et al., "Distilling Focal Knowledge from Imperfect Expert for 3D Object Detection",
CVPR 2023, pp. 992-1001. The authors released only their code base, a baseline distiller (heatmap-masked
BEV L2 + channel-wise distillation on the FPN) and an unused "distillation branch"; FD3D itself was never
published. This file is our reconstruction (the choices we made where the paper is silent: docs/fd3d.md,
with the flag that holds each), read top to bottom beside the paper's overview figure:

  1. focal area generation: the selected expert queries' 3D boxes, in BEV and in every camera/FPN level
  2. random focal masks inside those areas (masked feature generation, MGD-style, ratio lambda)
  3. training-only modules: generators, the learned BEV upsampler, 1x1 adapters
  4. losses: masked generation (PV, BEV), focal distillation at the expert's sampling points (BEVFormer:
     its decoder's deformable sampling locations in BEV; DETR3D: its reference points projected into the
     cameras), and the baselines (FitNets, MGD, the released heatmap + channel-wise distiller)
  5. aligned queries: the expert's own decoder is the frozen "distillation head"
  6. inputs: each model's own view of a sample (resolution, history, CAN bus) from one loaded batch
  7. the Distiller module (modes fd3d | heatmap | fitnet | mgd | none) for both detector families
  8. `python distill.py table ...`: an alias of `python table.py ...` (the miniature table)
Pictures of the focal areas (`python evaluate.py --ckpt A.pt --vis-focal K`) and the time breakdown of
one distillation step (`python evaluate.py --bench-distill cpu`) live in evaluate.py.

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
train.py); docs/fd3d.md "Every flag" lists them with their defaults.

Letters: B batch, N cameras, C channels, Q queries, M heads, L levels, P points, K boxes, H/W sizes.
Box layout [x, y, z, w, l, h, yaw, vx, vy] in the LIDAR_TOP frame; BEV column = x, row = y.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import bevformer
import detr3d
from common import InputError
from ops import ms_deform_attn

PC_RANGE = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)  # x_min, y_min, z_min, x_max, y_max, z_max (metres)


# ----------------------------------------------------------------------------------------------------
# 1. Focal area generation (paper: the instance-level areas located by the queries; overview figure:
#    each selected query's "3D bbox" projected to BEV and to the perspective views, PV)
# ----------------------------------------------------------------------------------------------------

def box_corners(boxes, scale=1.0):
    """The 8 corners of boxes [K, 9] enlarged by `scale` (all three sizes) -> [K, 8, 3].

    Same corner order as nuscenes-devkit `Box.corners()`: the length axis is the box's local x, rotated
    by yaw about z (our nuScenes yaw, README "Conventions"), width along local y, height along z.
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
    return torch.stack([u0, v0, u1, v1], -1), ok  # [N, K, 4], [N, K]


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
# 2. Random focal masks (paper: masked feature generation inside the instance areas; MGD-style:
#    P = M * R, M the focal area, R ~ Bernoulli(lambda) per cell)
# ----------------------------------------------------------------------------------------------------

def random_focal_mask(area, ratio):
    """P = area * R with R ~ Bernoulli(ratio) per cell; area [..., H, W] in {0, 1} -> same shape."""
    return area * (torch.rand_like(area) < ratio).to(area.dtype)


# ----------------------------------------------------------------------------------------------------
# 3. Training-only modules of masked feature generation: generator, BEV upsampler, adapters (never
#    part of the saved apprentice)
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
        """x [B, C, h, w] (the apprentice's BEV after its adapter), out_hw (H, W) -> [B, C, H, W]."""
        if not self.deconv and tuple(x.shape[-2:]) != tuple(out_hw):
            x = F.interpolate(x, size=tuple(out_hw), mode='bilinear', align_corners=False)
        return self.layers(x)  # [B, C, H, W]


def adapter(c_in, c_out):
    """A module [B, c_in, h, w] -> [B, c_out, h, w]: a 1x1 conv when the apprentice's channels differ
    from the expert's, else the identity."""
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
    grid = grid[None].expand(x.shape[0], -1, -1, -1)  # [B', H, W, 2]: one grid for every map
    return F.grid_sample(x, grid, mode='bilinear', padding_mode='zeros', align_corners=False)  # [B', C, H, W]


# ----------------------------------------------------------------------------------------------------
# 4a. Masked feature generation (paper: masked feature generation in the instance areas; overview
#     figure: "Generator"), on the PV (FPN) maps and on the BEV
# ----------------------------------------------------------------------------------------------------

def masked_generation(f_a, area_a, adapt, upsample, generate, mask_ratio, out_hw):
    """F^ = G(U(adapt(F_A) * (1 - P))): the apprentice's map, masked in its focal area, regenerated on
    the expert's grid.

    f_a [B, Ca, h, w] apprentice map; area_a [B, h, w] the focal area rasterised on the apprentice's
    own grid. The random mask P is drawn there and applied before the upsampler U (to the expert's
    grid out_hw), so the generator G must rebuild the masked cells from their context -> [B, C, H, W].
    """
    x = adapt(f_a)
    p = random_focal_mask(area_a, mask_ratio)  # [B, h, w]
    x = x * (1 - p[:, None])
    return generate(upsample(x, out_hw))


def standardise(f):
    """Per-channel standardisation over batch and space of an expert map [B', C, h, w] -> the same shape
    (the released code base's `fpn_feats_norm='bn'`: BatchNorm without affine or running statistics, on
    the expert only). FPN features have no normalisation layer, so their scale depends on the backbone's
    training (about 1e4 per element squared for a randomly initialised ResNet with frozen BN statistics,
    O(1) for a pretrained one); standardising makes one loss weight fit every expert. The generator
    learns the scale."""
    return F.batch_norm(f, None, None, training=True, eps=1e-5)


def generation_loss(f_hat, f_e, area, bg_weight=0.0):
    """L_gen = sum over cells of W * ||F^ - F_E||^2 / (C * max(1, sum W)), W = area + bg * (1 - area).

    f_hat, f_e [B, C, H, W]; area [B, H, W] -> a scalar. The released baseline's 1/sum(M)
    normalisation, per channel.
    """
    w = area + bg_weight * (1 - area)  # [B, H, W]
    err = ((f_hat - f_e) ** 2).sum(1)  # [B, H, W]
    return (w * err).sum() / (f_e.shape[1] * w.sum().clamp(min=1))


# ----------------------------------------------------------------------------------------------------
# 4b. Focal distillation (paper: the queries "search out the representative fine-grained positions for
#     refined distillation"): the generated map and the expert's are read at the expert queries' own
#     sampling positions, with the expert's weights; one function per detector family
# ----------------------------------------------------------------------------------------------------

def focal_distillation_loss(bev_hat, bev_e, dec, sel):
    """BEVFormer: focal distillation at the expert decoder's deformable sampling points in BEV.

    For each decoder layer l, with the expert's value_proj_l and its detached sampling locations loc_l
    [B, Q, M, 1, P, 2] and attention weights A_l [B, Q, M, 1, P]:
      s_E = MSDA(value_proj_l(F_E), loc_l, A_l),  s_A = MSDA(value_proj_l(F^_bev), loc_l, A_l)
    (the decoder's cross-attention before output_proj), and
      L_focal = mean over layers and selected queries of ||s_A - s_E||^2 / C.
    bev_hat, bev_e [B, C, H, W] (the same grid); dec the expert's out['dec'] (per layer its loc, attn and
    value_proj); sel [B, Q] bool -> a scalar. Gradients reach only bev_hat: the locations, weights and
    (frozen) value projection are the expert's.
    """
    B, C, H, W = bev_e.shape
    shapes = torch.tensor([[H, W]], device=bev_e.device)  # one BEV level
    start = torch.zeros(1, dtype=torch.long, device=bev_e.device)
    n_sel = sel.sum()
    if n_sel == 0:
        return bev_hat.sum() * 0  # keeps the graph (DDP needs every parameter used)
    tokens_hat = bev_hat.flatten(2).transpose(1, 2)  # [B, H*W, C], index h * W + w (the encoder's order)
    tokens_e = bev_e.flatten(2).transpose(1, 2)  # [B, H*W, C]
    total = 0
    for layer in dec:
        loc, attn = layer['loc'].detach(), layer['attn'].detach()  # [B, Q, M, 1, P, 2], [B, Q, M, 1, P]
        proj = layer['value_proj']
        M = loc.shape[2]
        with torch.no_grad():
            v_e = proj(tokens_e).view(B, H * W, M, -1)  # [B, H*W, M, C/M]: the op's per-head values
            s_e = ms_deform_attn(v_e, shapes, start, loc, attn)  # [B, Q, C]
        # F.linear with detached weights: the expert's projection is used, never trained
        v_hat = F.linear(tokens_hat, proj.weight.detach(),
                         None if proj.bias is None else proj.bias.detach()).view(B, H * W, M, -1)  # [B, H*W, M, C/M]
        s_a = ms_deform_attn(v_hat, shapes, start, loc, attn)  # [B, Q, C]
        err = ((s_a - s_e) ** 2).mean(-1)  # [B, Q]
        total = total + (err * sel).sum() / n_sel
    return total / len(dec)


def detr3d_focal_distillation_loss(fpn_hat, fpn_e, dec, sel):
    """DETR3D (no BEV): focal distillation at the expert queries' reference points projected into every
    camera and FPN level.

    fpn_hat: list over the EXPERT's FPN levels of the generated apprentice maps [B, N, C, h, w] on the
    expert's grid (None for an expert level no apprentice level maps to: that level leaves both sums);
    fpn_e: the targets of the generation loss on the expert's grid, same layout: the expert's FPN maps,
    standardised per channel when `pv_norm='bn'` (the default; `standardise`), raw with `pv_norm='none'`;
    dec: the expert's out['dec'] (per layer its uv [B, Q, N, 2], mask [B, Q, N] and attn [B, Q, N, L]);
    sel [B, Q] bool, the selected queries -> a scalar.
    For every layer, with the expert's detached points uv, visibility mask and sigmoid weights attn:
      s_E = sum_(n, l) attn * mask * bilinear(F_E,l, uv),   s_A the same on F^
    (with raw maps, exactly the sum the expert's Detr3DCrossAtten feeds its output_proj; DETR3D has no
    value projection; with standardised maps, the same weighted sum of the standardised features), and
    L = mean over layers of (sum over selected queries of ||s_A - s_E||^2 / C) / #sel.
    Gradients reach only fpn_hat."""
    levels = [i for i, f in enumerate(fpn_hat) if f is not None]
    if not levels:
        raise ValueError('detr3d_focal_distillation_loss: no generated level')
    hats = [fpn_hat[i] for i in levels]
    n_sel = sel.sum()
    if n_sel == 0:
        return sum(h.sum() for h in hats) * 0            # keeps the graph (DDP wants every parameter used)
    exps = [fpn_e[i].detach() for i in levels]
    total = 0
    for d in dec:
        uv, mask, attn = d['uv'].detach(), d['mask'], d['attn'].detach()[..., levels]  # attn [B, Q, N, L']
        with torch.no_grad():
            s_e = detr3d.sample_reference_features(exps, uv, mask, attn)          # [B, Q, C]
        s_a = detr3d.sample_reference_features(hats, uv, mask, attn)
        err = ((s_a - s_e) ** 2).mean(-1)                                       # [B, Q]
        total = total + (err * sel).sum() / n_sel
    return total / len(dec)


# ----------------------------------------------------------------------------------------------------
# 4c. Baselines: FitNets, the released code's heatmap-masked BEV L2 + channel-wise FPN distillation
#     (MGD is masked generation over the whole map, section 4a)
# ----------------------------------------------------------------------------------------------------

def fitnet_loss(f_a_up, f_e):
    """FitNets: MSE between the upsampled apprentice BEV and the expert's, both [B, C, H, W], over the
    whole map -> a scalar."""
    return F.mse_loss(f_a_up, f_e)


def gaussian_radius(height, width, min_overlap=0.1):
    """CenterNet/CenterPoint's Gaussian radius for boxes of (height, width) cells (tensors [K]) -> [K]."""
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
    for k in torch.nonzero(inside).flatten().tolist():  # [K', 1] -> [K'] indices of the centres on the map
        sigma = (2 * r[k] + 1) / 6
        du, dv = jj - u[k], ii - v[k]  # [1, W], [H, 1]
        g = torch.exp(-(du ** 2 + dv ** 2) / (2 * sigma ** 2))
        g = g * ((du.abs() <= r[k]) & (dv.abs() <= r[k]))
        heat = torch.maximum(heat, g)
    return heat


def heatmap_bev_loss(f_a_up, f_e, heat):
    """The released baseline's BEV term: sum (M*U(F_A) - M*F_E)^2 / sum M, with f_a_up, f_e [B, C, H, W]
    and M the heatmap [B, H, W] -> a scalar."""
    m = heat[:, None]  # [B, 1, H, W]
    return ((m * f_a_up - m * f_e) ** 2).sum() / heat.sum().clamp(min=1)


def cwd_loss(f_a, f_e, tau=2.0):
    """Channel-wise distillation (Shu et al. 2021) on one FPN level, f_a, f_e [B', C, h, w] -> a scalar.

    Each channel's map becomes a distribution over space (softmax with temperature tau);
    tau^2 * KL(p_E || p_A), summed over space, averaged over maps and channels. The released code uses
    the cross-entropy (same gradients, not 0 at equality).
    """
    log_p_a = F.log_softmax(f_a.flatten(2) / tau, -1)  # [B', C, h*w]
    log_p_e = F.log_softmax(f_e.flatten(2) / tau, -1)  # [B', C, h*w]
    kl = (log_p_e.exp() * (log_p_e - log_p_a)).sum(-1)  # [B', C]
    return tau ** 2 * kl.mean()


# ----------------------------------------------------------------------------------------------------
# 5. Aligned queries (paper: "a set of queries" of a distillation head run on the expert's features
#    locates the instance areas and the sampling positions): the expert's own frozen decoder is that
#    head; which of its queries teach is our choice, docs/fd3d.md
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
    """box_code [K, 10] of selected queries -> decoded boxes [K, 9]; sizes clamped so that a wild early
    prediction cannot cover the whole map (exp of a large log-size)."""
    boxes = bevformer.decode_boxes(box_code.float())
    boxes[:, 3:6] = torch.nan_to_num(boxes[:, 3:6], nan=0.0, posinf=max_size).clamp(0, max_size)
    return boxes


def init_head_from_expert(apprentice, expert):
    """Copy the expert's decoder, heads, object queries and reference points into the apprentice where
    names and shapes agree (the released code tried this and then overwrote it; here it is a choice,
    `--init-head-from-expert`, applied in every mode so comparisons stay fair). Returns the number of
    tensors copied."""
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
    shape = torch.as_tensor(frame['img_shape']).reshape(-1, 2)  # [B (*T), 2] content (H, W) per image
    if not bool((shape == shape[0]).all()):
        raise ValueError('distill: every image of a batch must have the same content size')
    H, W = int(shape[0, 0]), int(shape[0, 1])
    if (W, H) == tuple(cfg.image_size) and tuple(img.shape[-2:][::-1]) == tuple(cfg.padded_size):
        return dict(frame)
    content = img[..., :H, :W].reshape(-1, 3, H, W).float()  # [B*N (*T), 3, H, W]
    l2i = l2i.reshape(-1, 4, 4).float()  # [B*N (*T), 4, 4]
    new_img, new_l2i, (h, w) = bevformer.prepare_images(content, l2i, cfg)  # [B*N (*T), 3, hp, wp], [B*N (*T), 4, 4]
    out = dict(frame)
    out['img'] = new_img.view(*lead, N, 3, *new_img.shape[-2:])  # [..., N, 3, hp, wp]
    out['lidar2img'] = new_l2i.view(*lead, N, 4, 4)  # [..., N, 4, 4]
    out['img_shape'] = torch.tensor([h, w], device=img.device).expand(*lead, 2).clone()  # [..., 2]
    return out


def inputs_for(batch, cfg, frames=None):
    """The batch as one model consumes it: its resolution (`rescale_frame`), its own history length (a
    longer served queue keeps its last queue_length - 1 history frames; `frames` overrides that count).
    batch: data.collate's layout (img [B, N, 3, Hp, Wp], history img [B, T-1, N, 3, Hp, Wp], ...) or
    history as a list of frame dicts -> the same layout at cfg's size, history [B, keep, ...]."""
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
    """(batch for the expert, batch for the apprentice) from one loaded batch (data.collate's layout),
    each at its model's own image size and history length (`inputs_for`).

    A batch that carries the apprentice's own view (`loader_views`, 'native') gives each model its own;
    'upsampled' gives the expert the loaded (apprentice-size) images upsampled, as the released code did.
    A batch without a view (direct use, benchmarks) is rescaled for the apprentice the way its loader
    would resize it, which gives the same pixels whenever the batch holds the files at their own size."""
    # a streamed apprentice's previous BEV (train.py BEVStream) is the apprentice's alone
    def expert_only(b):
        return {k: v for k, v in b.items() if k not in ('prev_bev', 'prev_can_bus', 'has_prev')}
    if expert_input == 'upsampled':
        longest = max(cfg_e.queue_length, cfg_a.queue_length) - 1
        small = inputs_for(batch, cfg_a, longest)  # the apprentice's images (as loaded, or downscaled)
        return inputs_for(expert_only(small), cfg_e), inputs_for(small, cfg_a)
    if 'apprentice' in batch:
        batch_a = {k: v for k, v in batch.items() if k != 'apprentice'}
        batch_a.update(batch['apprentice'])       # its own img, lidar2img, can_bus, history (or previous BEV)
        return inputs_for(expert_only(batch), cfg_e), inputs_for(batch_a, cfg_a)
    return inputs_for(expert_only(batch), cfg_e), inputs_for(batch, cfg_a)


def pair_levels(a_strides, e_strides):
    """For each apprentice FPN level, the expert level with the closest stride in expert pixels
    (equal by construction for the paper's pairs: A strides 4..32 at half size = E 8..64 at full)."""
    return [min(range(len(e_strides)), key=lambda j: abs(math.log(e_strides[j] / s))) for s in a_strides]


# ----------------------------------------------------------------------------------------------------
# 7. The Distiller: the whole method for both detector families (BEVFormer: BEV + PV; DETR3D: PV)
# ----------------------------------------------------------------------------------------------------

MODES = ('fd3d', 'heatmap', 'fitnet', 'mgd', 'none')
PARTS = ('pv', 'bev', 'focal')
SELECTIONS = ('matched', 'confident', 'matched+confident')

# Loss weights (docs/fd3d.md "Loss weights": how they were chosen): each term starts within an
# order of magnitude of the apprentice's detection loss.
W_PV, W_BEV, W_FOCAL, W_FITNET = 2.0, 4.0, 4.0, 4.0
W_HEATMAP, W_CWD, CWD_TAU = 0.1, 0.25, 2.0  # the released baseline's values


class Distiller(nn.Module):
    """The frozen expert E, the apprentice A and the training-only modules; forward(batch) -> loss dict.

    batch: a collated batch at the EXPERT's resolution with the longer history of the two models.
    Returns A's detection losses plus the weighted distillation terms (their sum is the total):
      fd3d:    kd_pv_<l> (masked generation per apprentice FPN level), kd_bev (masked generation in
               BEV; BEVFormer only), kd_focal (focal distillation at the expert queries' sampling
               points: BEVFormer's decoder locations in BEV, DETR3D's projected reference points)
      mgd:     kd_pv_<l>, kd_bev with the random mask over the whole map
      fitnet:  kd_fitnet (BEVFormer only);   heatmap: kd_heatmap (BEV), kd_cwd_<l> (FPN levels);
      none:    nothing
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
        # FD3D's terms for this detector: DETR3D has no BEV, so its subsets are of pv and focal
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
        # DETR3D has no BEV: its focal term samples the generated PV maps
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
        """out_e: the expert's output; batch: its inputs (gt_boxes, gt_labels lists) -> (sel [B, Q] bool,
        boxes: list per sample of [K, 9]: the selected queries' decoded boxes, or the GT with areas='gt'),
        from the expert's last decoder layer."""
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
        """boxes: list per sample of [K, 9] (None: the whole map, for MGD); hw (H, W); like: a tensor
        [B, ...] on the device -> focal areas [B, H, W]."""
        if boxes is None:
            return torch.ones(like.shape[0], *hw, device=like.device)
        return torch.stack([bev_focal_area(b.to(like.device), hw, self.expert.cfg.pc_range, self.box_scale)
                            for b in boxes])  # [B, H, W]

    def pv_areas(self, boxes, batch, level_hw):
        """boxes: list per sample of [K, 9] (None: the whole map); batch: the model's inputs (lidar2img
        [B, N, 4, 4], img [B, N, 3, Hp, Wp]); level_hw: [(h, w)] per FPN level -> per level [B, N, h, w]."""
        l2i, pad = batch['lidar2img'], tuple(batch['img'].shape[-2:])
        B, N = l2i.shape[:2]
        if boxes is None:
            return [torch.ones(B, N, h, w, device=l2i.device) for h, w in level_hw]
        per_sample = [pv_focal_areas(b, l2i[i], pad, level_hw, self.box_scale) for i, b in enumerate(boxes)]
        return [torch.stack([s[lvl] for s in per_sample]) for lvl in range(len(level_hw))]  # [B, N, h, w] each

    # ---- the distillation terms -------------------------------------------------------------------
    def level_pairs(self, out_e, out_a, batch_e, batch_a):
        """-> (for each apprentice FPN level the expert level of the same stride in expert pixels,
        (sx, sy) apprentice pixels per expert pixel)."""
        pad_e, pad_a = tuple(batch_e['img'].shape[-2:]), tuple(batch_a['img'].shape[-2:])
        se = torch.as_tensor(batch_e['img_shape']).reshape(-1, 2)[0].tolist()  # [B, 2] -> the first (H, W)
        sa = torch.as_tensor(batch_a['img_shape']).reshape(-1, 2)[0].tolist()  # [B, 2] -> the first (H, W)
        scale = (sa[1] / se[1], sa[0] / se[0])
        pairs = pair_levels([pad_a[1] / f.shape[-1] / scale[0] for f in out_a['fpn']],
                            [pad_e[1] / f.shape[-1] for f in out_e['fpn']])
        return pairs, scale

    def pv_terms(self, out_e, out_a, batch_e, batch_a, boxes, generate, keep=None):
        """Per apprentice FPN level: masked generation (fd3d, mgd) or channel-wise distillation
        (heatmap), against the expert level of the same stride. out_*['fpn']: lists of [B, N, C, h, w];
        boxes: list per sample of [K, 9] (None: whole maps) -> {kd_pv_<l> or kd_cwd_<l>: scalar}.
        `keep` (a dict) receives, per expert level j, (generated map, expert target) as [B*N, C, h, w]
        (DETR3D's focal term samples them)."""
        pad_e, pad_a = tuple(batch_e['img'].shape[-2:]), tuple(batch_a['img'].shape[-2:])
        hw_a = [tuple(f.shape[-2:]) for f in out_a['fpn']]
        hw_e = [tuple(f.shape[-2:]) for f in out_e['fpn']]
        pairs, scale = self.level_pairs(out_e, out_a, batch_e, batch_a)
        if generate:
            area_a, area_e = self.pv_areas(boxes, batch_a, hw_a), self.pv_areas(boxes, batch_e, hw_e)

        def align(x, hw):  # an apprentice map [B*N, C, h_a, w_a] on the paired expert level's grid hw
            return align_pv(x, hw, pad_a, pad_e, scale)

        terms = {}
        for i, (f_a, j) in enumerate(zip(out_a['fpn'], pairs)):
            f_e = out_e['fpn'][j].flatten(0, 1)  # [B*N, C, h, w]
            if generate:
                if self.pv_norm == 'bn':  # the expert's map standardised per channel (see `standardise`)
                    f_e = standardise(f_e)
                # [B, N, C_a, h_a, w_a] and the area [B, N, h_a, w_a] as B*N maps -> F^ [B*N, C, h, w]
                f_hat = masked_generation(f_a.flatten(0, 1), area_a[i].flatten(0, 1), self.kd['pv_adapters'][i],
                                          align, self.kd['pv_gens'][i], self.mask_ratio, f_e.shape[-2:])
                area = area_e[j].flatten(0, 1)  # [B*N, h, w]
                terms[f'kd_pv_{i}'] = self.w['pv'] * generation_loss(f_hat, f_e, area, self.bg_weight)
                if keep is not None:
                    keep[j] = (f_hat, f_e)
            else:
                f_a = align(self.kd['pv_adapters'][i](f_a.flatten(0, 1)), f_e.shape[-2:])  # [B*N, C, h, w]
                terms[f'kd_cwd_{i}'] = self.w['cwd'] * cwd_loss(f_a, f_e, self.cwd_tau)
        return terms

    def distill_losses(self, out_e, out_a, batch_e, batch_a):
        """The weighted distillation terms of the mode (a dict of scalars, named as in the class
        docstring) from the two models' outputs (out_e: the expert's, computed without gradients) and
        their inputs (`model_inputs`). BEVFormer's outputs have 'bev' [B, C, H, W]; DETR3D's do not."""
        if 'bev' in out_e:
            return self.bevformer_losses(out_e, out_a, batch_e, batch_a)
        return self.detr3d_losses(out_e, out_a, batch_e, batch_a)

    def bevformer_losses(self, out_e, out_a, batch_e, batch_a):
        """`distill_losses` of a BEVFormer pair: masked generation in BEV and per FPN level, focal
        distillation at the expert decoder's BEV sampling points, or a baseline's terms."""
        kd, terms = self.kd, {}
        bev_e, bev_a = out_e['bev'], out_a['bev']  # [B, C_e, He, We], [B, C_a, Ha, Wa]
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
                    terms['kd_bev'] = self.w['bev'] * generation_loss(f_hat, bev_e, area_e, self.bg_weight)
                if 'focal' in parts:
                    terms['kd_focal'] = self.w['focal'] * focal_distillation_loss(f_hat, bev_e, out_e['dec'], sel)
            if 'pv' in parts:
                terms.update(self.pv_terms(out_e, out_a, batch_e, batch_a, boxes, generate=True))
        elif self.mode == 'fitnet':
            up = kd['bev_up'](kd['bev_adapter'](bev_a), hw_e)  # [B, C, He, We]
            terms['kd_fitnet'] = self.w['fitnet'] * fitnet_loss(up, bev_e)
        elif self.mode == 'heatmap':
            heat = torch.stack([gaussian_heatmap(g.to(bev_e.device).float(), hw_e, self.expert.cfg.pc_range)
                                for g in batch_e['gt_boxes']])  # [B, He, We]
            up = kd['bev_up'](kd['bev_adapter'](bev_a), hw_e)  # [B, C, He, We]
            terms['kd_heatmap'] = self.w['heatmap'] * heatmap_bev_loss(up, bev_e, heat)
            terms.update(self.pv_terms(out_e, out_a, batch_e, batch_a, None, generate=False))
        return terms

    def detr3d_losses(self, out_e, out_a, batch_e, batch_a):
        """`distill_losses` of a DETR3D pair (no BEV; docs/fd3d.md "FD3D for DETR3D"):
          fd3d:    kd_pv_<l>, masked generation per apprentice FPN level inside the selected expert
                   queries' projected boxes (`pv_terms`, as for BEVFormer), and kd_focal,
                   `detr3d_focal_distillation_loss` on those same generated maps against the same
                   (standardised) expert targets, at the expert's projected reference points;
          mgd:     kd_pv_<l> with the random mask over the whole maps;
          heatmap: kd_cwd_<l>, the baseline's channel-wise FPN half (its BEV half does not apply).
        fitnet is BEV-only and refused by __init__; `parts` is a non-empty subset of pv, focal."""
        if self.mode == 'heatmap':
            return self.pv_terms(out_e, out_a, batch_e, batch_a, None, generate=False)
        sel, boxes = self.focal_queries(out_e, batch_e) if self.mode == 'fd3d' else (None, None)
        parts = self.parts if self.mode == 'fd3d' else ('pv',)
        generated = {}                                  # expert level -> (F^, F_E target), [B*N, C, h, w]
        pv = self.pv_terms(out_e, out_a, batch_e, batch_a, boxes, generate=True, keep=generated)
        terms = pv if 'pv' in parts else {}
        if 'focal' in parts:
            B, N = out_e['fpn'][0].shape[:2]

            def unflat(f):  # the loss samples per camera: [B*N, C, h, w] -> [B, N, C, h, w]
                return f.view(B, N, *f.shape[1:])

            levels = range(len(out_e['fpn']))
            hats = [unflat(generated[j][0]) if j in generated else None for j in levels]     # [B, N, C, h, w]
            targets = [unflat(generated[j][1]) if j in generated else None for j in levels]  # [B, N, C, h, w]
            terms['kd_focal'] = self.w['focal'] * detr3d_focal_distillation_loss(hats, targets, out_e['dec'], sel)
        return terms

    def forward(self, batch):
        """batch: data.collate's layout at the expert's resolution (img [B, N, 3, Hp, Wp], lidar2img
        [B, N, 4, 4], gt_boxes/gt_labels lists, history with the longer queue of the two models) -> dict
        of scalar losses: the apprentice's detection losses and the weighted terms (sum = total)."""
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
# 8. Command line: `python distill.py table ...` is `python table.py ...`
# ----------------------------------------------------------------------------------------------------

def main(argv=None):
    """`python distill.py table [flags]`: forwards the flags to table.main (the miniature table)."""
    import sys
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] != 'table':
        print('usage: python distill.py table [--only ROWS] [--jobs J --threads T] [--summary] ...  '
              '(the same as python table.py; FD3D pictures: python evaluate.py --vis-focal, '
              'the step time: python evaluate.py --bench-distill)', file=sys.stderr)
        sys.exit(2)
    import table  # lazily: table.py imports no model code, and nothing imports distill for its CLI
    table.main(argv[1:], prog='distill.py table')


if __name__ == '__main__':
    main()
