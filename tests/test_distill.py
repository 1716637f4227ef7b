"""Tests of distill.py (specs/fd3d.md section 8): focal areas against nuscenes-devkit geometry, the mask
ratio, every loss 0 at equality and > 0 otherwise, the focal term against a direct call of the op."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from nuscenes.utils.data_classes import Box
from nuscenes.utils.geometry_utils import view_points
from pyquaternion import Quaternion
from shapely.geometry import Point, Polygon

import distill
from ops import ms_deform_attn

PC = distill.PC_RANGE

# Planted boxes [x, y, z, w, l, h, yaw, vx, vy]: a car, a rotated truck, a traffic cone smaller than a
# cell, a pedestrian near the map's edge.
BOXES = torch.tensor([
    [10.0, 20.0, -0.5, 1.9, 4.5, 1.6, 0.3, 0, 0],
    [-15.0, 8.0, 0.0, 2.5, 9.0, 3.2, -1.1, 0, 0],
    [3.3, 12.7, -1.2, 0.4, 0.4, 0.8, 0.0, 0, 0],
    [-50.0, -30.0, -0.8, 0.7, 0.7, 1.8, 2.5, 0, 0],
])


def devkit_box(b, scale=1.0):
    return Box(b[:3].tolist(), (b[3:6] * scale).tolist(), Quaternion(axis=[0, 0, 1], angle=float(b[6])))


def test_box_corners_match_devkit():
    corners = distill.box_corners(BOXES, 1.3)  # [K, 8, 3]
    for b, c in zip(BOXES, corners):
        ref = devkit_box(b, 1.3).corners().T  # [8, 3]
        np.testing.assert_allclose(c.numpy(), ref, atol=1e-5)


@pytest.mark.parametrize('hw', [(200, 200), (50, 50), (64, 48)])
def test_bev_area_covers_boxes_and_nothing_beyond(hw):
    H, W = hw
    scale = 1.2
    area = distill.bev_focal_area(BOXES, hw, PC, box_scale=scale)  # [H, W]
    dx, dy = (PC[3] - PC[0]) / W, (PC[4] - PC[1]) / H
    cell = lambda x, y: (int((y - PC[1]) // dy), int((x - PC[0]) // dx))  # noqa: E731  (row, col)
    polys = [Polygon(devkit_box(b, scale).bottom_corners()[:2].T) for b in BOXES]
    rng = np.random.default_rng(0)
    # cover: every point of every enlarged footprint lies in a marked cell
    for b in BOXES:
        local = (rng.random((400, 3)) - 0.5) * (b[3:6] * scale).numpy()[[1, 0, 2]]  # (l, w, h) local axes
        pts = devkit_box(b).rotation_matrix @ local.T + b[:3, None].numpy()  # [3, 400]
        for x, y in pts[:2].T:
            i, j = cell(x, y)
            if 0 <= i < H and 0 <= j < W:
                assert area[i, j] == 1, (hw, b, x, y)
    # nothing beyond: a marked cell's centre is within half a cell diagonal of an enlarged footprint
    half_diag = math.hypot(dx, dy) / 2
    for i, j in torch.nonzero(area).tolist():
        c = Point(PC[0] + (j + 0.5) * dx, PC[1] + (i + 0.5) * dy)
        assert min(p.distance(c) for p in polys) <= half_diag + 1e-6, (hw, i, j)
    # the enlargement matters, and an empty box list gives an empty area
    assert distill.bev_focal_area(BOXES, hw, PC, box_scale=1.0).sum() < area.sum()
    assert distill.bev_focal_area(BOXES[:0], hw, PC).sum() == 0


def pinhole_cameras(W=400, H=225, f=250.0):
    """Two hand-built cameras 1.5 m above the lidar: one looking forward (+y), one backward."""
    K = torch.tensor([[f, 0, W / 2, 0], [0, f, H / 2, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    fwd = torch.tensor([[1.0, 0, 0, 0], [0, 0, -1, 1.5], [0, 1, 0, 0], [0, 0, 0, 1]])  # cam_T_lidar
    back = torch.tensor([[-1.0, 0, 0, 0], [0, 0, -1, 1.5], [0, -1, 0, 0], [0, 0, 0, 1]])
    return torch.stack([K @ fwd, K @ back])  # lidar2img [2, 4, 4]


def check_pv_areas(boxes, lidar2img, pad_hw, level_hw, scale):
    """Cover and nothing-beyond for each camera and level, against the devkit's view_points."""
    areas = distill.pv_focal_areas(boxes, lidar2img, pad_hw, level_hw, box_scale=scale)
    Hp, Wp = pad_hw
    rng = np.random.default_rng(1)
    for n in range(lidar2img.shape[0]):
        P = lidar2img[n].double().numpy()
        rects = []
        for b in boxes:
            corners = devkit_box(b, scale).corners()  # [3, 8]
            depth = (P @ np.vstack([corners, np.ones(8)]))[2]
            front = depth > 1e-5
            if not front.any():
                continue
            uv = view_points(corners[:, front], P, normalize=True)[:2]
            u0, v0 = np.clip(uv.min(1), 0, [Wp, Hp])
            u1, v1 = np.clip(uv.max(1), 0, [Wp, Hp])
            if u1 > u0 and v1 > v0:
                rects.append((u0, v0, u1, v1))
            if front.all():  # cover: points inside the enlarged box seen by this camera
                local = (rng.random((300, 3)) - 0.5) * (b[3:6] * scale).numpy()[[1, 0, 2]]
                pts = devkit_box(b).rotation_matrix @ local.T + b[:3, None].numpy()
                uv = view_points(pts, P, normalize=True)[:2]
                for (h, w), a in zip(level_hw, areas):
                    for u, v in uv.T:
                        if 0 <= u < Wp and 0 <= v < Hp:
                            assert a[n, int(v // (Hp / h)), int(u // (Wp / w))] == 1
        for (h, w), a in zip(level_hw, areas):
            sy, sx = Hp / h, Wp / w
            for i, j in torch.nonzero(a[n]).tolist():  # a marked cell intersects some rectangle
                assert any((j + 1) * sx > r[0] - 1e-4 and j * sx < r[2] + 1e-4 and
                           (i + 1) * sy > r[1] - 1e-4 and i * sy < r[3] + 1e-4 for r in rects), (n, h, i, j)
            if not rects:
                assert a[n].sum() == 0
    return areas


def test_pv_areas_pinhole_front_and_behind():
    l2i = pinhole_cameras()
    boxes = torch.tensor([[2.0, 15.0, -0.5, 1.9, 4.5, 1.6, 0.4, 0, 0],   # ahead: front camera only
                          [-4.0, 30.0, 0.0, 0.5, 0.5, 1.0, 0.0, 0, 0],
                          [0.0, -12.0, -0.5, 2.0, 4.0, 1.5, 1.0, 0, 0]])  # behind: back camera only
    level_hw = [(29, 50), (15, 25), (8, 13)]  # strides 224/29.. of a 400x224 padded image (not integer)
    areas = check_pv_areas(boxes, l2i, (224, 400), level_hw, 1.2)
    front_only = distill.pv_focal_areas(boxes[:2], l2i, (224, 400), level_hw)
    assert front_only[0][0].sum() > 0 and all(a[1].sum() == 0 for a in front_only)  # all corners behind
    assert areas[0][1].sum() > 0


def test_mask_ratio_and_pooling():
    torch.manual_seed(0)
    area = torch.zeros(4, 100, 100)
    area[:, 20:80, 10:90] = 1
    p = distill.random_focal_mask(area, 0.65)
    assert p[area == 0].sum() == 0  # only inside the focal area
    assert abs(p[area == 1].mean().item() - 0.65) < 0.01
    assert distill.random_focal_mask(area, 0.0).sum() == 0
    pooled = distill.area_to_grid(area, (50, 50))  # expert 100x100 -> apprentice 50x50
    assert pooled.shape == (4, 50, 50) and pooled[0, 10:40, 5:45].min() == 1 and pooled[0, :9].sum() == 0


@pytest.mark.parametrize('in_hw,out_hw', [((25, 25), (50, 50)), ((25, 25), (100, 100)),
                                          ((20, 20), (30, 30)), ((25, 25), (25, 25))])
def test_upsampler_and_generator_shapes(in_hw, out_hw):
    up = distill.BEVUpsampler(8, in_hw, out_hw)
    y = distill.Generator(8)(up(torch.randn(2, 8, *in_hw), out_hw))
    assert y.shape == (2, 8, *out_hw)
    n_deconv = sum(isinstance(m, nn.ConvTranspose2d) for m in up.modules())
    assert n_deconv == {2: 1, 4: 2}.get(out_hw[0] // in_hw[0] if out_hw[0] % in_hw[0] == 0 else 0, 0)
    if in_hw == out_hw:
        assert len(list(up.parameters())) == 0


def identity_generation(f_a, area, ratio=0.0):
    return distill.masked_generation(f_a, area, nn.Identity(), lambda x, hw: x, nn.Identity(), ratio)


def test_generation_loss_zero_at_equality_positive_otherwise():
    torch.manual_seed(0)
    f_e = torch.randn(2, 16, 20, 20)
    area = torch.zeros(2, 20, 20)
    area[:, 5:10, 5:12] = 1
    assert distill.gen_loss(identity_generation(f_e.clone(), area), f_e, area) == 0
    assert distill.gen_loss(identity_generation(f_e + 0.1, area), f_e, area) > 0
    # a difference outside the focal area counts only with a background weight
    f_a = f_e.clone()
    f_a[:, :, 15:] += 1.0
    assert distill.gen_loss(identity_generation(f_a, area), f_e, area) == 0
    assert distill.gen_loss(identity_generation(f_a, area), f_e, area, bg_weight=0.1) > 0
    # the mask zeroes the fraction `ratio` of the focal cells (here on the apprentice's own grid)
    masked = identity_generation(f_e.abs() + 1, area, ratio=0.65)
    frac = (masked[:, 0] == 0)[area == 1].float().mean()
    assert 0.5 < frac < 0.8 and (masked[:, 0] == 0)[area == 0].sum() == 0
    # mgd baseline: the whole map is the area
    ones = torch.ones(2, 20, 20)
    assert distill.gen_loss(identity_generation(f_e.clone(), ones), f_e, ones) == 0
    assert distill.gen_loss(identity_generation(f_a, ones), f_e, ones) > 0


def synthetic_decoder(B=2, Q=30, M=4, P=4, C=32, layers=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    dec = []
    for _ in range(layers):
        proj = nn.Linear(C, C)
        dec.append({'loc': torch.rand(B, Q, M, 1, P, 2, generator=g).requires_grad_(),
                    'attn': torch.rand(B, Q, M, 1, P, generator=g).softmax(-1).requires_grad_(),
                    'value_proj': proj})
    return dec


def test_focal_loss_uses_expert_locations_weights_and_projection():
    torch.manual_seed(0)
    B, C, H, W = 2, 32, 16, 20
    dec = synthetic_decoder(B=B, C=C)
    bev_e = torch.randn(B, C, H, W)
    sel = torch.rand(B, 30) < 0.5
    assert distill.focal_loss(bev_e.clone(), bev_e, dec, sel) == 0
    bev_hat = (bev_e + 0.3 * torch.randn_like(bev_e)).requires_grad_()
    loss = distill.focal_loss(bev_hat, bev_e, dec, sel)
    assert loss > 0
    # the same number from direct calls of the op with the expert's locations and weights
    shapes, start = torch.tensor([[H, W]]), torch.tensor([0])
    ref = 0
    for layer in dec:
        p = layer['value_proj']
        tok = lambda f: p(f.flatten(2).transpose(1, 2)).view(B, H * W, 4, C // 4)  # noqa: E731
        s_e = ms_deform_attn(tok(bev_e), shapes, start, layer['loc'], layer['attn'])
        s_a = ms_deform_attn(tok(bev_hat), shapes, start, layer['loc'], layer['attn'])
        ref = ref + ((s_a - s_e) ** 2).mean(-1)[sel].mean()
    torch.testing.assert_close(loss, ref / len(dec))
    # gradients reach only the apprentice side, never the expert's locations, weights or projection
    loss.backward()
    assert bev_hat.grad.abs().sum() > 0
    for layer in dec:
        assert layer['loc'].grad is None and layer['attn'].grad is None
        assert layer['value_proj'].weight.grad is None
    # a difference where no selected query samples does not count
    far = bev_e.clone()
    for layer in dec:
        layer['loc'] = torch.full_like(layer['loc'], 0.05)  # every point near the corner (0, 0)
    far[:, :, H // 2:, W // 2:] += 5.0
    assert distill.focal_loss(far, bev_e, dec, sel) == 0
    assert distill.focal_loss(bev_hat, bev_e, dec, torch.zeros_like(sel)) == 0


def test_baseline_losses_zero_at_equality_positive_otherwise():
    torch.manual_seed(0)
    f_e = torch.randn(2, 16, 50, 50)
    assert distill.fitnet_loss(f_e.clone(), f_e) == 0 and distill.fitnet_loss(f_e + 0.1, f_e) > 0
    heat = torch.stack([distill.gaussian_heatmap(BOXES, (50, 50), PC)] * 2)
    assert distill.heatmap_bev_loss(f_e.clone(), f_e, heat) == 0
    assert distill.heatmap_bev_loss(f_e + 0.1, f_e, heat) > 0
    f_a = f_e.clone()
    f_a[:, :, heat[0] == 0] += 1.0  # a difference off every Gaussian does not count
    assert distill.heatmap_bev_loss(f_a, f_e, heat) == 0
    pv = torch.randn(12, 16, 8, 14)
    assert distill.cwd_loss(pv.clone(), pv).abs() < 1e-6
    assert distill.cwd_loss(pv + 0.5 * torch.randn_like(pv), pv) > 1e-3


def test_gaussian_heatmap_peaks_at_centres():
    hw = (100, 100)
    heat = distill.gaussian_heatmap(BOXES, hw, PC)
    d = (PC[3] - PC[0]) / 100
    for b in BOXES:
        assert heat[int((b[1] - PC[1]) // d), int((b[0] - PC[0]) // d)] == 1
    assert heat.max() == 1 and (heat > 0).float().mean() < 0.05
    outside = torch.tensor([[60.0, 0, 0, 2, 4, 1.5, 0, 0, 0]])
    assert distill.gaussian_heatmap(outside, hw, PC).sum() == 0
