"""Tests of distill.py: focal areas against nuscenes-devkit geometry, the mask ratio, every loss 0 at
equality and > 0 otherwise, the focal distillation term against a direct call of the op, the Distiller on
real (shrunk) BEVFormer pairs, and the FD3D pictures (evaluate.vis_focal). DETR3D's FD3D terms are tested
in test_detr3d.py, the miniature table in test_table.py."""
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


def test_align_pv_is_identity_crop_or_resample():
    x = torch.randn(3, 4, 16, 28)
    # the same geometry: unchanged
    assert distill.align_pv(x, (16, 28), (128, 224), (128, 224), (1.0, 1.0)) is x
    # apprentice stride 8 at half size vs expert stride 16 at full size, different padding: a crop
    y = distill.align_pv(x, (16, 26), (128, 224), (256, 416), (0.5, 0.5))
    torch.testing.assert_close(y, x[..., :26])
    # an expert grid wider than the apprentice's image: zeros beyond it
    z = distill.align_pv(x, (16, 30), (128, 224), (256, 480), (0.5, 0.5))
    torch.testing.assert_close(z[..., :28], x)
    assert z[..., 28:].abs().sum() == 0


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
    return distill.masked_generation(f_a, area, nn.Identity(), lambda x, hw: x, nn.Identity(), ratio,
                                     area.shape[-2:])


def test_generation_loss_zero_at_equality_positive_otherwise():
    torch.manual_seed(0)
    f_e = torch.randn(2, 16, 20, 20)
    area = torch.zeros(2, 20, 20)
    area[:, 5:10, 5:12] = 1
    assert distill.generation_loss(identity_generation(f_e.clone(), area), f_e, area) == 0
    assert distill.generation_loss(identity_generation(f_e + 0.1, area), f_e, area) > 0
    # a difference outside the focal area counts only with a background weight
    f_a = f_e.clone()
    f_a[:, :, 15:] += 1.0
    assert distill.generation_loss(identity_generation(f_a, area), f_e, area) == 0
    assert distill.generation_loss(identity_generation(f_a, area), f_e, area, bg_weight=0.1) > 0
    # the mask zeroes the fraction `ratio` of the focal cells (here on the apprentice's own grid)
    masked = identity_generation(f_e.abs() + 1, area, ratio=0.65)
    frac = (masked[:, 0] == 0)[area == 1].float().mean()
    assert 0.5 < frac < 0.8 and (masked[:, 0] == 0)[area == 0].sum() == 0
    # mgd baseline: the whole map is the area
    ones = torch.ones(2, 20, 20)
    assert distill.generation_loss(identity_generation(f_e.clone(), ones), f_e, ones) == 0
    assert distill.generation_loss(identity_generation(f_a, ones), f_e, ones) > 0


def synthetic_decoder(B=2, Q=30, M=4, P=4, C=32, layers=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    dec = []
    for _ in range(layers):
        proj = nn.Linear(C, C)
        dec.append({'loc': torch.rand(B, Q, M, 1, P, 2, generator=g).requires_grad_(),
                    'attn': torch.rand(B, Q, M, 1, P, generator=g).softmax(-1).requires_grad_(),
                    'value_proj': proj})
    return dec


def test_focal_distillation_loss_uses_expert_locations_weights_and_projection():
    torch.manual_seed(0)
    B, C, H, W = 2, 32, 16, 20
    dec = synthetic_decoder(B=B, C=C)
    bev_e = torch.randn(B, C, H, W)
    sel = torch.rand(B, 30) < 0.5
    assert distill.focal_distillation_loss(bev_e.clone(), bev_e, dec, sel) == 0
    bev_hat = (bev_e + 0.3 * torch.randn_like(bev_e)).requires_grad_()
    loss = distill.focal_distillation_loss(bev_hat, bev_e, dec, sel)
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
    assert distill.focal_distillation_loss(far, bev_e, dec, sel) == 0
    assert distill.focal_distillation_loss(bev_hat, bev_e, dec, torch.zeros_like(sel)) == 0


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


# ----------------------------------------------------------------------------------------------------
# The Distiller on real models: cpu-base (expert) -> cpu-tiny (apprentice), random weights, shrunk
# (smaller images, BEV, queries and layers) so that every mode runs in about a second per iteration.
# ----------------------------------------------------------------------------------------------------

import dataclasses  # noqa: E402
import types  # noqa: E402

import bevformer  # noqa: E402
import evaluate  # noqa: E402
from data import InputError  # noqa: E402

SMALL = dict(num_query=20, dec_layers=2, enc_layers=1, queue_length=2)


def small_pair(seed=0):
    torch.manual_seed(seed)
    ec = bevformer.get_config('cpu-base', image_size=(160, 90), bev_h=16, bev_w=16, **SMALL)
    ac = bevformer.get_config('cpu-tiny', image_size=(80, 45), bev_h=8, bev_w=8, **SMALL)
    return bevformer.BEVFormer(ec), bevformer.BEVFormer(ac)


def test_apprentice_inputs_are_a_consistent_downscale():
    expert, apprentice = small_pair()
    ec, ac = expert.cfg, apprentice.cfg
    batch = evaluate.example_batch(dataclasses.replace(ec, queue_length=3), batch_size=1, num_gt=4)
    be, ba = distill.model_inputs(batch, ec, ac)
    assert tuple(ba['img'].shape[-2:]) == tuple(ac.padded_size)[::-1]
    assert ba['img_shape'].tolist() == [[45, 80]] and be['img_shape'].tolist() == [[90, 160]]
    # lidar2img of the apprentice maps a 3D point to the expert's pixel scaled by the resize
    pt = torch.tensor([3.0, 20.0, 0.5, 1.0])
    pe, pa = be['lidar2img'][0, 0] @ pt, ba['lidar2img'][0, 0] @ pt
    torch.testing.assert_close(pa[:2] / pa[2], pe[:2] / pe[2] * torch.tensor([0.5, 0.5]))
    # anti-aliased: a checkerboard at the expert's resolution averages out, no aliasing
    board = ((torch.arange(90)[:, None] + torch.arange(160)[None]) % 2 * 255.0)
    batch['img'][..., :90, :160] = board
    _, ba = distill.model_inputs(batch, ec, ac)
    assert (ba['img'][0, 0, 0, 2:43, 2:78] - 127.5).abs().max() < 20
    assert ba['img'][..., 45:, :].abs().sum() == 0 and ba['img'][..., 80:].abs().sum() == 0  # zero padding
    # each model keeps its own history length (the loader served 2 frames; both models use 1)
    assert batch['history']['img'].shape[1] == 2
    assert be['history']['img'].shape[1] == 1 and ba['history']['img'].shape[1] == 1
    torch.testing.assert_close(be['history']['can_bus'], batch['history']['can_bus'][:, 1:])
    assert ba['history_valid'].shape == (1, 1)
    # 'upsampled' (the released code): the expert sees the apprentice's images brought back to its size
    up_e, up_a = distill.model_inputs(batch, ec, ac, expert_input='upsampled')
    assert up_e['img'].shape == be['img'].shape and torch.equal(up_a['img'], ba['img'])
    torch.testing.assert_close(up_e['lidar2img'], be['lidar2img'], rtol=1e-5, atol=1e-3)
    assert (up_e['img'][0, 0, 0, 2:88, 2:158] - 127.5).abs().max() < 20  # the checkerboard is gone
    assert (be['img'][0, 0, 0, 2:88, 2:158] - 127.5).abs().max() > 100  # the native input keeps it


def test_a_streamed_apprentices_previous_bev_is_its_own():
    """train.py's BEVStream puts a streamed apprentice's previous BEV into the batch (the apprentice's view
    when the loader serves one, else the top level): the apprentice gets it, the expert never does."""
    expert, apprentice = small_pair()
    ec, ac = expert.cfg, dataclasses.replace(apprentice.cfg, history_draw='stream')
    carried = {'prev_bev': torch.randn(1, 64, ac.embed_dims), 'prev_can_bus': torch.zeros(1, 18),
               'has_prev': torch.ones(1, dtype=torch.bool)}
    top = {**evaluate.example_batch(ec, batch_size=1, num_gt=4), **carried}
    served = evaluate.example_batch(ec, batch_size=1, num_gt=4)
    served['apprentice'] = {**evaluate.example_batch(ac, batch_size=1, num_gt=4, history=False), **carried}
    for batch, mode in [(top, 'native'), (top, 'upsampled'), (served, 'native')]:
        be, ba = distill.model_inputs(batch, ec, ac, expert_input=mode)
        assert not {'prev_bev', 'prev_can_bus', 'has_prev'} & set(be), mode
        assert ba['prev_bev'] is carried['prev_bev'] and bool(ba['has_prev'][0]), mode
    d = distill.Distiller(expert=expert, apprentice=bevformer.BEVFormer(ac), mode='fd3d').train()
    losses = d(served)
    assert all(torch.isfinite(v) for v in losses.values())


def test_no_gradient_reaches_expert_and_saved_apprentice_is_plain():
    expert, apprentice = small_pair()
    before = {k: v.clone() for k, v in expert.state_dict().items()}
    d = distill.Distiller(expert=expert, apprentice=apprentice, mode='fd3d').train()
    assert not expert.training and apprentice.training
    batch = evaluate.example_batch(expert.cfg, batch_size=1, num_gt=5)
    losses = d(batch)
    assert {'kd_pv_0', 'kd_pv_1', 'kd_bev', 'kd_focal'} <= set(losses)
    sum(losses.values()).backward()
    assert all(p.grad is None and not p.requires_grad for p in expert.parameters())
    assert all(torch.equal(v, before[k]) for k, v in expert.state_dict().items())  # BN statistics too
    assert all(p.grad is not None for p in d.kd.parameters())  # generators, upsampler trained
    # the apprentice's state dict is exactly a plain cpu-tiny's: no distillation module inside
    plain = bevformer.BEVFormer(apprentice.cfg).state_dict()
    saved = apprentice.state_dict()
    assert set(saved) == set(plain) and all(saved[k].shape == plain[k].shape for k in plain)
    bevformer.BEVFormer(apprentice.cfg).load_state_dict(saved)  # strict
    kd_ids = {id(p) for p in d.kd.parameters()}
    assert kd_ids and not kd_ids & {id(p) for p in apprentice.parameters()}
    assert set(d.kd.state_dict()) and all(k.split('.')[0] in ('bev_adapter', 'bev_up', 'bev_gen', 'pv_adapters',
                                                              'pv_gens') for k in d.kd.state_dict())


def test_focal_term_reads_the_expert_decoders_own_sampling():
    """s_E computed from out['bev'], loc, attn and value_proj equals what the expert's decoder itself
    aggregated before output_proj (so the BEV token order and the op call match the model's)."""
    expert, _ = small_pair()
    expert.eval()
    seen = []
    hooks = [layer.cross_attn.output_proj.register_forward_hook(lambda m, i, o: seen.append(i[0]))
             for layer in expert.decoder.layers]
    with torch.no_grad():
        out = expert(evaluate.example_batch(expert.cfg, batch_size=1, history=False))
    for h in hooks:
        h.remove()
    B, C, H, W = out['bev'].shape
    for layer, inner in zip(out['dec'], seen):
        v = layer['value_proj'](out['bev'].flatten(2).transpose(1, 2)).view(B, H * W, expert.cfg.num_heads, -1)
        s_e = ms_deform_attn(v, torch.tensor([[H, W]]), torch.tensor([0]), layer['loc'], layer['attn'])
        torch.testing.assert_close(s_e, inner, atol=1e-5, rtol=1e-4)


def test_query_selection():
    torch.manual_seed(0)
    Q = 20
    gt = torch.tensor([[5.0, 5.0, 0.0, 2.0, 4.0, 1.5, 0.0, 0.0, 0.0], [-20.0, 10.0, 0.0, 1.0, 1.0, 1.0, 0.5, 0, 0]])
    labels = torch.tensor([0, 8])
    cls = torch.full((1, Q, 10), -6.0)
    box = bevformer.encode_boxes(gt[[0]]).repeat(1, Q, 1) + 30.0  # far from both
    box[0, 3], box[0, 11] = bevformer.encode_boxes(gt)  # queries 3 and 11 sit on the GT boxes
    cls[0, 3, 0], cls[0, 11, 8] = 2.0, 2.0
    cls[0, 7, 4] = 0.5  # confident (p = 0.62) but unmatched
    m = distill.select_queries(cls, box, [gt], [labels], 'matched')
    c = distill.select_queries(cls, box, [gt], [labels], 'confident', score=0.3)
    u = distill.select_queries(cls, box, [gt], [labels], 'matched+confident', score=0.3)
    assert torch.nonzero(m[0]).flatten().tolist() == [3, 11]
    assert torch.nonzero(c[0]).flatten().tolist() == [3, 7, 11]
    assert torch.equal(u, m | c)
    assert distill.select_queries(cls, box, [gt[:0]], [labels[:0]], 'matched').sum() == 0


def test_match_gate_drops_matched_queries_that_disagree_with_their_gt():
    """The Hungarian matcher gives every GT box a query: a planted expert miss (no query near a third GT
    box) and a query on a GT box with the wrong class are matched but not aligned; with the gate off
    (0) every matched query counts, as before the gate."""
    Q = 20
    gt = torch.tensor([[5.0, 5.0, 0.0, 2.0, 4.0, 1.5, 0.0, 0.0, 0.0], [-20.0, 10.0, 0.0, 1.0, 1.0, 1.0, 0.5, 0, 0],
                       [30.0, -30.0, 0.0, 2.0, 4.0, 1.5, 0.0, 0.0, 0.0], [-5.0, -25.0, 0.0, 1.0, 1.0, 1.0, 0, 0, 0]])
    labels = torch.tensor([0, 8, 2, 9])
    cls = torch.full((1, Q, 10), -6.0)
    box = bevformer.encode_boxes(gt[[0]]).repeat(1, Q, 1) + 30.0   # far from every GT box
    box[0, 3], box[0, 11] = bevformer.encode_boxes(gt[:2])          # good: on GT 0 and 1, right class
    cls[0, 3, 0], cls[0, 11, 8] = 2.0, 2.0
    box[0, 15] = bevformer.encode_boxes(gt[3])                     # on GT 3 but sure it is a car (GT: cone)
    box[0, 15, 0] += 1.5                                            # (1.5 m off: inside the 2 m gate)
    cls[0, 15, 0] = -1.0
    gated = distill.select_queries(cls, box, [gt], [labels], 'matched')
    off = distill.select_queries(cls, box, [gt], [labels], 'matched', gate=0.0)
    assert torch.nonzero(gated[0]).flatten().tolist() == [3, 11]
    assert off[0].sum() == 4 and off[0, 3] and off[0, 11] and off[0, 15]          # the miss got a query too
    wide = distill.select_queries(cls, box, [gt], [labels], 'matched', gate=1.0)  # 1 m: query 15 fails twice
    assert torch.nonzero(wide[0]).flatten().tolist() == [3, 11]
    cls[0, 15, 9] = 0.0                                             # now its top class is the GT's: aligned
    aligned = distill.select_queries(cls, box, [gt], [labels], 'matched')
    assert torch.nonzero(aligned[0]).flatten().tolist() == [3, 11, 15]
    with pytest.raises(InputError, match='--fd3d-gate'):
        expert, apprentice = small_pair()
        distill.Distiller(expert=expert, apprentice=apprentice, gate=-1.0)


@pytest.mark.parametrize('mode', distill.MODES)
def test_smoke_every_mode_trains_a_few_iterations(mode):
    expert, apprentice = small_pair()
    frozen = {k: v.clone() for k, v in expert.state_dict().items()}
    d = distill.Distiller(expert=expert, apprentice=apprentice, mode=mode).train()
    params = [p for p in d.parameters() if p.requires_grad]
    trainable = {id(p) for p in apprentice.parameters() if p.requires_grad}  # (its frozen stem excluded)
    assert {id(p) for p in params} == trainable | {id(p) for p in d.kd.parameters()}
    opt = torch.optim.AdamW(params, lr=1e-3)
    kd0 = {k: v.clone() for k, v in d.kd.state_dict().items()}
    expected = {'fd3d': {'kd_bev', 'kd_focal', 'kd_pv_0', 'kd_pv_1'}, 'mgd': {'kd_bev', 'kd_pv_0', 'kd_pv_1'},
                'fitnet': {'kd_fitnet'}, 'heatmap': {'kd_heatmap', 'kd_cwd_0', 'kd_cwd_1'}, 'none': set()}[mode]
    for it in range(2):
        losses = d(evaluate.example_batch(expert.cfg, batch_size=1, num_gt=5, seed=it))
        assert {k for k in losses if k.startswith('kd_')} == expected
        loss = sum(losses.values())
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(v, frozen[k]) for k, v in expert.state_dict().items())
    if mode != 'none':  # the distillation modules learn
        assert any(not torch.equal(v, kd0[k]) for k, v in d.kd.state_dict().items() if v.is_floating_point())


def test_ablation_flags_select_terms():
    expert, apprentice = small_pair()
    batch = evaluate.example_batch(expert.cfg, batch_size=1, num_gt=5)
    for parts, keys in [('pv', {'kd_pv_0', 'kd_pv_1'}), ('bev,pv', {'kd_bev', 'kd_pv_0', 'kd_pv_1'}),
                        ('focal', {'kd_focal'})]:
        d = distill.Distiller(expert=expert, apprentice=apprentice, mode='fd3d', parts=parts, areas='gt')
        assert {k for k in d(batch) if k.startswith('kd_')} == keys
    assert 'pv_gens' not in distill.Distiller(expert=expert, apprentice=apprentice, parts='bev,focal').kd


def test_incompatible_pairs_and_bad_flags_are_refused():
    expert, apprentice = small_pair()
    other = nn.Linear(1, 1)
    other.cfg = types.SimpleNamespace(**{**dataclasses.asdict(expert.cfg), 'detector': 'detr3d', 'name': 'detr3d-x'})
    with pytest.raises(InputError, match='detr3d expert .* cannot teach a bevformer apprentice'):
        distill.Distiller(expert=other, apprentice=apprentice)
    far = bevformer.BEVFormer(dataclasses.replace(apprentice.cfg, pc_range=(-40.0, -40.0, -5.0, 40.0, 40.0, 3.0)))
    with pytest.raises(InputError, match='pc_range'):
        distill.Distiller(expert=expert, apprentice=far)
    for kwargs, flag in [({'mode': 'kd'}, '--distill'), ({'parts': 'pv,heads'}, '--fd3d-parts'),
                         ({'select': 'topk'}, '--fd3d-select'), ({'mask_ratio': 1.5}, '--fd3d-mask-ratio'),
                         ({'areas': 'lidar'}, '--fd3d-areas')]:
        with pytest.raises(InputError, match=flag):
            distill.Distiller(expert=expert, apprentice=apprentice, **kwargs)


class IdentityUp(nn.Module):
    def forward(self, x, hw):
        return x


@pytest.mark.parametrize('mode', ['fd3d', 'mgd', 'fitnet', 'heatmap'])
def test_distiller_terms_zero_when_apprentice_features_equal_experts(mode):
    """At the Distiller level: generators, upsampler and adapters replaced by identities, no mask, no
    standardisation, A's features equal to E's (BEV on the same grid; FPN maps laid out on the
    apprentice's own padded image) -> every term 0; a perturbation -> > 0."""
    torch.manual_seed(0)
    expert, _ = small_pair()
    same_bev = bevformer.BEVFormer(bevformer.get_config('cpu-tiny', image_size=(80, 45), bev_h=16, bev_w=16,
                                                        **SMALL))
    # gate 0: a random expert's matched queries are all wrong, and the focal term needs some selected
    d = distill.Distiller(expert=expert, apprentice=same_bev, mode=mode, mask_ratio=0.0, pv_norm='none',
                          areas='gt', gate=0.0)
    for k in list(d.kd):
        d.kd[k] = (nn.ModuleList(nn.Identity() for _ in d.kd[k]) if isinstance(d.kd[k], nn.ModuleList)
                   else IdentityUp() if k == 'bev_up' else nn.Identity())
    batch = evaluate.example_batch(expert.cfg, batch_size=1, num_gt=6)
    be, ba = distill.model_inputs(batch, expert.cfg, same_bev.cfg)
    with torch.no_grad():
        out_e = expert.eval()(be)
    fpn_a = []
    for f, (h, w) in zip(out_e['fpn'], [(8, 12), (4, 6)]):  # A: strides 8, 16 on its 96x64 padded image
        a = torch.zeros(*f.shape[:3], h, w)
        a[..., :f.shape[-2], :f.shape[-1]] = f  # the same cells, in expert pixels, as E's stride 16, 32
        fpn_a.append(a)
    out_a = {'bev': out_e['bev'].clone(), 'fpn': fpn_a}
    terms = d.distill_losses(out_e, out_a, be, ba)
    assert terms and all(float(v) < 1e-6 for v in terms.values()), terms
    noisy = {'bev': out_a['bev'] + 0.5 * torch.randn_like(out_a['bev']),
             'fpn': [f + 0.5 * torch.randn_like(f) for f in fpn_a]}
    terms = d.distill_losses(out_e, noisy, be, ba)
    assert all(float(v) > 1e-4 for v in terms.values()), terms


def test_areas_on_a_real_item_of_the_synthetic_world(tmp_path_factory):
    """The dataset's own (devkit-consistent) lidar2img and GT boxes: per camera and level the areas
    cover every box seen entirely in front of the camera and nothing beyond its projected rectangle."""
    import data
    from fixtures import small_world
    root = small_world(tmp_path_factory.mktemp('world'))
    ds = data.NuScenesDataset(root, 'v1.0-mini', 'val', image_size=(200, 113), queue_length=1)
    item = ds[len(ds) // 2]
    boxes, l2i = item['gt_boxes'].float(), item['lidar2img'].float()
    assert boxes.shape[0] > 3
    pad = tuple(item['img'].shape[-2:])  # (128, 224)
    areas = check_pv_areas(boxes, l2i, pad, [(pad[0] // 8, pad[1] // 8), (pad[0] // 16, pad[1] // 16)], 1.2)
    assert sum(float(a.sum()) for a in areas) > 0
    bev = distill.bev_focal_area(boxes, (50, 50), PC, 1.2)
    d = (PC[3] - PC[0]) / 50
    for b in boxes:  # every GT centre's cell is in the BEV area
        assert bev[int((b[1] - PC[1]) // d), int((b[0] - PC[0]) // d)] == 1


def test_vis_focal_writes_a_picture(tmp_path):
    expert, apprentice = small_pair()
    d = distill.Distiller(expert=expert, apprentice=apprentice, areas='gt', select='confident', score=0.0)
    path = str(tmp_path / 'focal.png')
    n = evaluate.vis_focal(d, evaluate.example_batch(expert.cfg, batch_size=1, num_gt=4), path)
    assert n == expert.cfg.num_query  # score 0: every query is confident
    from PIL import Image
    assert Image.open(path).size[0] > 500


@pytest.mark.slow
def test_one_distillation_step_at_the_papers_real_sizes():
    """base-r101 (900x1600, BEV 200x200) -> fd3d-tiny (450x800, BEV 100x100), random weights, batch 1, no
    history, on the CPU: every FD3D term is computed at the real shapes and the step backpropagates."""
    torch.manual_seed(0)
    expert = bevformer.BEVFormer(bevformer.get_config('base-r101'))
    apprentice = bevformer.BEVFormer(bevformer.get_config('fd3d-tiny'))
    # gate 0: a random expert's matched queries all fail the gate, and the areas need selected queries
    d = distill.Distiller(expert=expert, apprentice=apprentice, mode='fd3d', gate=0.0).train()
    batch = evaluate.example_batch(expert.cfg, batch_size=1, history=False, num_gt=10)
    be, ba = distill.model_inputs(batch, expert.cfg, apprentice.cfg)
    assert tuple(be['img'].shape[-2:]) == (928, 1600) and tuple(ba['img'].shape[-2:]) == (480, 800)
    with torch.no_grad():
        out_e = expert.eval()(be)
    out_a = apprentice(ba)
    assert out_e['bev'].shape == (1, 256, 200, 200) and out_a['bev'].shape == (1, 256, 100, 100)
    # the paper's FPN alignment: A strides 4..32 at half size pair with E strides 8..64 at full size
    assert [tuple(f.shape[-2:]) for f in out_a['fpn']] == [(120, 200), (60, 100), (30, 50), (15, 25)]
    assert [tuple(f.shape[-2:]) for f in out_e['fpn']] == [(116, 200), (58, 100), (29, 50), (15, 25)]
    losses = dict(apprentice.loss(out_a, ba))
    losses.update(d.distill_losses(out_e, out_a, be, ba))
    assert {'kd_bev', 'kd_focal', 'kd_pv_0', 'kd_pv_1', 'kd_pv_2', 'kd_pv_3'} <= set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert d.kd['bev_gen'][0].weight.grad.abs().sum() > 0 and d.kd['pv_gens'][3][0].weight.grad.abs().sum() > 0
    assert apprentice.backbone.layer4[0].conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in expert.parameters())


@pytest.mark.slow
def test_distilled_training_interrupted_and_resumed_is_bit_identical(tmp_path_factory):
    """train.py --teacher: a run stopped by Ctrl-C after iteration 3 and resumed ends with the same
    apprentice, the same distillation modules (generators, upsampler, BN statistics) and the same
    optimiser state as an uninterrupted run (the random focal masks draw from the restored RNG)."""
    import os
    import signal
    import train
    from fixtures import small_world
    world = small_world(tmp_path_factory.mktemp('world'))
    tmp = tmp_path_factory.mktemp('runs')

    def run(argv):
        try:
            train.main(argv)
        except SystemExit as e:
            return e.code
        return 0

    shrink = ['--set', 'num_query=30', '--set', 'enc_layers=1', '--set', 'dec_layers=2']
    expert = str(tmp / 'expert')
    assert run(['--model', 'cpu-base', '--dataroot', world, '--iters', '1', '--no-eval', '--workers', '0',
                '--out', expert, '--set', 'bev_h=20', '--set', 'bev_w=20'] + shrink) == 0
    common = ['--teacher', os.path.join(expert, 'last.pt'), '--student', 'cpu-tiny', '--dataroot', world,
              '--iters', '5', '--warmup', '2', '--lr', '1e-3', '--log-every', '1', '--ckpt-every', '100',
              '--no-eval', '--workers', '0', '--seed', '1', '--set', 'bev_h=10', '--set', 'bev_w=10'] + shrink
    a, b = str(tmp / 'a'), str(tmp / 'b')
    assert run(common + ['--out', a]) == 0
    calls = {'n': 0}
    forward = distill.Distiller.forward

    def interrupting(self, batch):
        calls['n'] += 1
        if calls['n'] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return forward(self, batch)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(distill.Distiller, 'forward', interrupting)
        assert run(common + ['--out', b]) == 130
    assert torch.load(os.path.join(b, 'last.pt'), weights_only=True)['iter'] == 3
    assert run(['--resume', os.path.join(b, 'last.pt')]) == 0
    wa = torch.load(os.path.join(a, 'last.pt'), weights_only=True)
    wb = torch.load(os.path.join(b, 'last.pt'), weights_only=True)
    assert wa['iter'] == wb['iter'] == 5 and set(wa['distiller']) == set(wb['distiller'])
    for part in ('model', 'distiller'):
        for k in wa[part]:
            assert torch.equal(wa[part][k], wb[part][k]), (part, k)
    for k, state in wa['optimizer']['state'].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(wb['optimizer']['state'][k][name]))


def test_train_cli_refuses_an_incompatible_teacher_in_one_line(tmp_path_factory, tmp_path, capsys):
    """train.py --teacher with an expert of another pc_range: exit 2, one line naming --teacher."""
    import train
    from fixtures import small_world
    world = small_world(tmp_path_factory.mktemp('world'))
    cfg = bevformer.get_config('cpu-base', pc_range=(-40.0, -40.0, -5.0, 40.0, 40.0, 3.0), **SMALL)
    path = str(tmp_path / 'expert.pt')
    torch.save({'model': bevformer.BEVFormer(cfg).state_dict(), 'config': dataclasses.asdict(cfg), 'args': {},
                'iter': 0}, path)
    with pytest.raises(SystemExit) as e:
        train.main(['--teacher', path, '--student', 'cpu-tiny', '--dataroot', world, '--iters', '1',
                    '--no-eval', '--workers', '0', '--out', str(tmp_path / 'run')])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: --teacher:') and 'pc_range' in err[0]


@pytest.mark.parametrize('loading', ['fast', 'official'])
def test_the_apprentice_trains_on_the_pixels_it_is_evaluated_on(tmp_path_factory, loading):
    """A distillation loader (the expert's view, plus the apprentice's own) hands the apprentice exactly
    the images and lidar2img that its evaluation loader reads, for both ways of loading; and a batch
    without the apprentice's view, downscaled by the Distiller from the files' own size, matches too."""
    import data
    from fixtures import small_world
    root = small_world(tmp_path_factory.mktemp('world400'), image_scale=0.25)      # 400x225 files
    ec = bevformer.get_config('cpu-base', image_size=(400, 225), **SMALL)
    ac = bevformer.get_config('cpu-tiny', image_size=(200, 113), image_loading=loading, **SMALL)
    view, apprentice_view = distill.loader_views(ec, ac)
    train_set = data.NuScenesDataset(root, 'v1.0-mini', 'train', train=True, view=view, apprentice=apprentice_view)
    eval_set = data.NuScenesDataset(root, 'v1.0-mini', 'train', train=False, view=data.view_of(ac, queue_length=1))
    for i in (1, 5):
        torch.manual_seed(i)
        item = train_set[i]
        batch = data.collate([item])
        _, batch_a = distill.model_inputs(batch, ec, ac)
        ref = eval_set[item['index']]
        assert torch.equal(batch_a['img'][0], ref['img'])
        assert torch.equal(batch_a['lidar2img'][0], ref['lidar2img'])
        no_view = {k: v for k, v in batch.items() if k != 'apprentice'}
        _, rescaled = distill.model_inputs(no_view, ec, ac)
        assert torch.allclose(rescaled['img'][0], ref['img'], atol=1e-3)
        assert torch.allclose(rescaled['lidar2img'][0], ref['lidar2img'], rtol=1e-5, atol=1e-3)
