"""DETR3D invariants: feature sampling against a direct computation with nuscenes-devkit's projection,
strict official-checkpoint loading against the key manifest, batch == one by one, gradients through the
sampling, FD3D-for-DETR3D invariants (distill.detr3d_focal_distillation_loss, Distiller.detr3d_losses: 0 at
equality, > 0 otherwise, gradients only to the apprentice side), and train.py / evaluate.py on a DETR3D preset.
Slow: overfitting one synthetic sample, one forward of detr3d-r50 at the real input size."""
import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch

import bevformer as bf
import detr3d
import evaluate
import fixtures
import models
from data import InputError



def small_cfg(**kw):
    """detr3d-cpu-tiny shrunk so that a forward takes a fraction of a second."""
    base = dict(num_query=40, dec_layers=2, embed_dims=32, ffn_dims=64, backbone_width=16, dropout=0.0)
    base.update(kw)
    return detr3d.get_config('detr3d-cpu-tiny', **base)


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    from fixtures import small_world
    return small_world(tmp_path_factory.mktemp('detr3d_world'))


def _randomize(model, seed=0):
    """Non-zero attention weights (their zero init would make every (camera, level) weigh 0.5)."""
    g = torch.Generator().manual_seed(seed)
    for layer in model.decoder.layers:
        w = layer.cross_attn.attention_weights
        with torch.no_grad():
            w.weight.copy_(torch.randn(w.weight.shape, generator=g) * 0.3)
            w.bias.copy_(torch.randn(w.bias.shape, generator=g))


# ---------------------------------------------------------------------------------------------
# Feature sampling against nuscenes-devkit
# ---------------------------------------------------------------------------------------------


def bilinear(fmap, x, y):
    """fmap [C, h, w] numpy; (x, y) in map pixels with pixel i's centre at i (align_corners=False after
    the -0.5 shift); zeros outside. Written out corner by corner."""
    C, h, w = fmap.shape
    x0, y0 = math.floor(x), math.floor(y)
    out = np.zeros(C)
    for xi, yi in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
        wgt = (1 - abs(x - xi)) * (1 - abs(y - yi))
        if 0 <= xi < w and 0 <= yi < h:
            out += wgt * fmap[:, yi, xi]
    return out


def test_cross_attention_samples_where_the_devkit_projects(world):
    """Detr3DCrossAtten on a synthetic-world sample against a direct computation: the devkit projects
    each query's metric reference point into every camera; visible points (depth > 0, strictly inside the
    padded image) are bilinearly sampled in every FPN level by hand, weighted by sigmoid(a) and summed;
    then output_proj, the residual and the positional encoding of inverse_sigmoid(ref)."""
    from fixtures import devkit_pixels
    import data
    torch.manual_seed(0)
    ds = data.NuScenesDataset(world, 'v1.0-mini', 'val', image_size=(200, 113), queue_length=1)
    item = ds[1]
    Hp, Wp = item['img'].shape[-2:]
    B, Q, C, N, L = 1, 300, 8, 6, 2
    pc = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)
    # reference points spread over the range, half of them near the ground where the cameras look
    ref = torch.rand(B, Q, 3)
    ref[:, : Q // 2, 2] = 0.55 + 0.1 * torch.rand(Q // 2)
    ref[:, : Q // 2, :2] = 0.35 + 0.3 * torch.rand(Q // 2, 2)
    fpn = [torch.randn(B, N, C, Hp // s, Wp // s) for s in (8, 16)]
    attn_mod = detr3d.Detr3DCrossAtten(C, N, L, dropout=0.0).eval()
    with torch.no_grad():
        attn_mod.attention_weights.weight.normal_(0, 0.5)
        attn_mod.attention_weights.bias.normal_(0, 1)
    x, pos = torch.randn(B, Q, C), torch.randn(B, Q, C)
    with torch.no_grad():
        out, uv, mask, attn = attn_mod(x, pos, fpn, ref, item['lidar2img'][None].float(), (Hp, Wp), pc)
        weights = torch.sigmoid(attn_mod.attention_weights(x + pos)).view(B, Q, N, L)
    assert torch.allclose(attn, weights)                                     # cameras major, levels fastest
    metric = ref[0] * torch.tensor([102.4, 102.4, 8.0]) + torch.tensor([-51.2, -51.2, -5.0])
    sampled = np.zeros((Q, C))
    visible = 0
    for n, cam in enumerate(data.CAMERAS):
        px, depth, (W0, H0) = devkit_pixels(ds.nusc, item['sample_token'], cam, metric)
        px = px * np.array([[200 / W0], [113 / H0]])                          # the dataset's resize
        front = depth > 0.1
        ours = uv[0, :, n].double().numpy().T * np.array([[Wp], [Hp]])      # pixels of the padded image
        assert np.abs(ours[:, front] - px[:, front]).max() < 1e-2 * max(1.0, np.abs(px[:, front]).max() / 1e3)
        inside = (depth > 1e-3) & (px[0] > 0) & (px[0] < Wp) & (px[1] > 0) & (px[1] < Hp)
        assert (mask[0, :, n].numpy() == inside).all()
        visible += int(inside.sum())
        for q in np.nonzero(inside)[0]:
            for lvl, f in enumerate(fpn):
                h, w = f.shape[-2:]
                xs, ys = px[0, q] / Wp * w - 0.5, px[1, q] / Hp * h - 0.5
                sampled[q] += float(weights[0, q, n, lvl]) * bilinear(f[0, n].double().numpy(), xs, ys)
    assert visible > 100                                                       # the cameras see many points
    sampled = torch.tensor(sampled, dtype=torch.float32)
    expect = attn_mod.output_proj(sampled) + x[0] + attn_mod.position_encoder(bf.inverse_sigmoid(ref[0]))
    assert torch.allclose(out[0], expect.detach(), atol=1e-4)
    # and the sampled sum alone (what FD3D compares)
    direct = detr3d.sample_reference_features(fpn, uv, mask, attn)[0]
    assert torch.allclose(direct, sampled, atol=1e-4)
    # a point the devkit puts behind every camera or outside every image contributes nothing
    dead = ~mask[0].any(-1)
    assert dead.any() and direct[dead].abs().max() == 0


def test_sampling_is_differentiable_in_the_reference_point_and_the_features():
    torch.manual_seed(0)
    cfg = small_cfg()
    l2i = evaluate.toy_lidar2img(cfg.image_size)[None]
    Wp, Hp = cfg.padded_size
    ref = torch.tensor([[[0.5, 0.6, 0.55]]], requires_grad=True)            # 5 m ahead of the ego
    fpn = [torch.randn(1, 6, 4, Hp // 8, Wp // 8, requires_grad=True)]
    uv, mask = detr3d.project_reference_points(ref, l2i, (Hp, Wp), cfg.pc_range)
    assert mask[0, 0, 0] and not mask[0, 0, 3]                              # front camera sees it, back does not
    s = detr3d.sample_reference_features(fpn, uv, mask, torch.ones(1, 1, 6, 1))
    s.sum().backward()
    assert ref.grad.abs().sum() > 0 and fpn[0].grad[0, 3].abs().sum() == 0 and fpn[0].grad[0, 0].abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# The detector
# ---------------------------------------------------------------------------------------------

def _sample(batch, b):
    return {k: (v[b:b + 1] if torch.is_tensor(v) else v[b:b + 1]) for k, v in batch.items()}


def test_batch_of_two_equals_one_by_one():
    cfg = small_cfg()
    torch.manual_seed(0)
    model = detr3d.DETR3D(cfg).eval()
    _randomize(model)
    batch = evaluate.example_batch(cfg, batch_size=2, history=False, seed=1)
    turn = torch.eye(4)                                                      # sample 1: the rig turned by 0.5 rad
    turn[:2, :2] = torch.tensor([[math.cos(0.5), -math.sin(0.5)], [math.sin(0.5), math.cos(0.5)]])
    batch['lidar2img'][1] = batch['lidar2img'][1] @ turn
    with torch.no_grad():
        both = model(batch)
        ones = [model(_sample(batch, b)) for b in range(2)]
    for b in range(2):
        for d2, d1 in zip(both['dec'], ones[b]['dec']):
            for key in ('cls', 'box', 'ref', 'uv', 'attn'):
                assert torch.allclose(d2[key][b], d1[key][0], atol=1e-4), key
            assert torch.equal(d2['mask'][b], d1['mask'][0])
    assert not torch.allclose(both['dec'][-1]['cls'][0], both['dec'][-1]['cls'][1], atol=1e-3)
    assert not torch.equal(both['dec'][0]['mask'][0], both['dec'][0]['mask'][1])


def test_forward_loss_decode_predict():
    cfg = small_cfg()
    torch.manual_seed(0)
    model = detr3d.DETR3D(cfg).train()
    batch = evaluate.example_batch(cfg, batch_size=2, history=False, num_gt=5)
    out = model(batch)
    B, C, Q, N, L = 2, cfg.embed_dims, cfg.num_query, 6, cfg.fpn_levels
    Wp, Hp = cfg.padded_size
    assert [tuple(f.shape) for f in out['fpn']] == [(B, N, C, Hp // 8, Wp // 8), (B, N, C, Hp // 16, Wp // 16),
                                                   (B, N, C, Hp // 32, Wp // 32)]
    assert 'bev' not in out and len(out['dec']) == cfg.dec_layers
    d = out['dec'][0]
    assert d['query'].shape == (B, Q, C) and d['ref'].shape == (B, Q, 3) and d['cls'].shape == (B, Q, 10)
    assert d['uv'].shape == (B, Q, N, 2) and d['mask'].shape == (B, Q, N) and d['attn'].shape == (B, Q, N, L)
    assert d['mask'].dtype == torch.bool and ((d['attn'] > 0) & (d['attn'] < 1)).all()
    # refinement: each layer's input reference is the previous layer's box centre, normalised, detached
    box0 = out['dec'][0]['box']
    centre = torch.stack([box0[..., 0], box0[..., 1], box0[..., 4]], -1)
    lo, hi = torch.tensor(cfg.pc_range[:3]), torch.tensor(cfg.pc_range[3:])
    assert torch.allclose(out['dec'][1]['ref'], (centre - lo) / (hi - lo), atol=1e-5)
    assert not out['dec'][1]['ref'].requires_grad
    losses = model.loss(out, batch)
    assert sorted(losses) == sorted(f'loss_{k}_{i}' for k in ('cls', 'bbox') for i in range(cfg.dec_layers))
    sum(losses.values()).backward()
    # the first reference point is learned through the sampling and the positional encoding
    assert model.reference_points.weight.grad.abs().sum() > 0
    assert model.decoder.layers[0].cross_attn.position_encoder[0].weight.grad.abs().sum() > 0
    assert model.neck.fpn_convs[0].weight.grad.abs().sum() > 0
    assert model.backbone.conv1.weight.grad.abs().sum() > 0     # the CPU presets train the stem (from scratch)
    dets = model.decode(out)
    assert len(dets) == 2 and dets[0]['boxes'].shape[1] == 9
    res = model.predict(batch['img'][0], batch['lidar2img'][0], img_shape=tuple(batch['img_shape'][0].tolist()))
    model.eval()
    with torch.no_grad():
        ref = model.decode(model(_sample(batch, 0)))[0]
    assert model.training is False and res['state'] is None
    assert torch.allclose(res['boxes'], ref['boxes'], atol=1e-4) and torch.allclose(res['scores'], ref['scores'])
    W, H = cfg.image_size                                                    # raw images at another size
    raw = torch.rand(6, 3, 2 * H, 2 * W) * 255
    l2i = torch.diag(torch.tensor([2.0, 2.0, 1.0, 1.0])) @ evaluate.toy_lidar2img(cfg.image_size)
    assert model.predict(raw, l2i)['boxes'].shape[1] == 9


def test_presets_and_config_errors():
    assert set(detr3d.PRESETS) == {'detr3d-r101', 'detr3d-r50', 'detr3d-cpu-tiny', 'detr3d-cpu-base'}
    assert not set(detr3d.PRESETS) & set(bf.PRESETS)                         # names unique across files
    r101 = detr3d.PRESETS['detr3d-r101']
    assert (r101.backbone_depth, r101.backbone_dcn, r101.fpn_levels, r101.padded_size) == (101, True, 4, (1600, 928))
    assert detr3d.PRESETS['detr3d-cpu-base'].image_size == (400, 225)
    for name in ('detr3d-cpu-tiny', 'detr3d-cpu-base'):    # from scratch: nothing frozen, batch statistics
        c = detr3d.PRESETS[name]
        assert (c.frozen_stages, c.backbone_norm_eval, c.backbone_bn_frozen) == (-1, False, False), name
        model = detr3d.DETR3D(c).train()
        assert all(p.requires_grad for p in model.backbone.parameters())
        assert all(m.training for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    cfg = detr3d.DETR3DConfig(**json.loads(json.dumps(dataclasses.asdict(r101))))   # tuples come back as lists
    assert cfg == r101
    with pytest.raises(InputError, match='queue_length must be 1'):
        detr3d.get_config('detr3d-cpu-tiny', queue_length=3)
    with pytest.raises(InputError, match='unknown DETR3D preset'):
        detr3d.get_config('cpu-tiny')
    assert isinstance(models.build_model(models.preset_config('detr3d-cpu-tiny')), detr3d.DETR3D)


# ---------------------------------------------------------------------------------------------
# Official checkpoint
# ---------------------------------------------------------------------------------------------

def manifest_state(seed=0):
    return fixtures.manifest_state('keys_detr3d_r101.txt', seed)


@pytest.fixture(scope='module')
def r101():
    torch.manual_seed(0)
    return detr3d.DETR3D(detr3d.PRESETS['detr3d-r101'])


def test_load_official_fills_every_parameter_and_refuses_wrong_keys(r101, tmp_path):
    state = manifest_state()
    assert len(state) == 946
    detr3d.load_official(r101, state)
    own = r101.state_dict()
    assert len(own) == len(state) - 1                                          # all but code_weights
    for k, v in own.items():
        src = state[bf.official_key(k)]
        if k.startswith('reg_branches.') and k.split('.')[2] == '4':           # yaw rows converted
            assert torch.equal(v[6], -src[7]) and torch.equal(v[7], -src[6])
            assert torch.equal(v[:6], src[:6]) and torch.equal(v[8:], src[8:])
        else:
            assert torch.equal(v, src.to(v.dtype)), k
    gone = 'pts_bbox_head.transformer.decoder.layers.3.attentions.1.position_encoder.4.bias'
    with pytest.raises(InputError, match=gone.replace('.', r'\.')):
        detr3d.load_official(r101, {k: v for k, v in state.items() if k != gone})
    extra = 'pts_bbox_head.transformer.decoder.layers.0.attentions.1.sampling_offsets.weight'   # a BEVFormer key
    with pytest.raises(InputError, match='unknown key ' + extra.replace('.', r'\.')):
        detr3d.load_official(r101, {**state, extra: torch.zeros(1)})
    with pytest.raises(InputError, match='wrong --preset'):
        detr3d.load_official(detr3d.DETR3D(small_cfg()), state)
    # `python detr3d.py convert` writes a checkpoint that evaluate.py rebuilds (state dict of 946 tensors)
    src, dst = str(tmp_path / 'official.pth'), str(tmp_path / 'ours.pt')
    torch.save({'meta': {}, 'state_dict': state}, src)
    detr3d.main(['convert', src, '--preset', 'detr3d-r101', '--out', dst])
    model, cfg, _ = models.model_from_checkpoint(dst)
    assert isinstance(model, detr3d.DETR3D) and cfg.name == 'detr3d-r101'
    assert torch.equal(model.decoder.layers[5].cross_attn.attention_weights.weight,
                       state['pts_bbox_head.transformer.decoder.layers.5.attentions.1.attention_weights.weight'])


def test_convert_cli_errors_are_one_line(tmp_path, capsys):
    bad = str(tmp_path / 'bad.pth')
    with open(bad, 'w') as f:
        f.write('not a checkpoint')
    for argv, needle in ((['convert', bad, '--out', str(tmp_path / 'x.pt')], 'bad.pth'),
                         (['convert', bad, '--preset', 'tiny', '--out', str(tmp_path / 'x.pt')], '--preset tiny')):
        with pytest.raises(SystemExit) as e:
            detr3d.main(argv)
        err = capsys.readouterr().err
        assert e.value.code != 0 and err.startswith('error: ') and needle in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# FD3D for DETR3D (distill.py): focal distillation at the expert's projected reference points
# ---------------------------------------------------------------------------------------------

def _expert_out(seed=0):
    cfg = small_cfg(num_query=60)
    torch.manual_seed(seed)
    expert = detr3d.DETR3D(cfg).eval()
    _randomize(expert, seed)
    for p in expert.parameters():
        p.requires_grad_(False)
    batch = evaluate.example_batch(cfg, batch_size=2, history=False, seed=seed)
    captured = []                                  # what each layer's output_proj receives: the sampled sum
    hooks = [layer.cross_attn.output_proj.register_forward_hook(lambda m, i, o: captured.append(i[0]))
             for layer in expert.decoder.layers]
    with torch.no_grad():
        out = expert(batch)
    for h in hooks:
        h.remove()
    return expert, out, captured


def test_detr3d_focal_distillation_loss_invariants():
    import distill
    expert, out, captured = _expert_out()
    fpn_e = out['fpn']
    B, Q = out['dec'][0]['cls'].shape[:2]
    sel = torch.zeros(B, Q, dtype=torch.bool)
    sel[0, :7], sel[1, 30:35] = True, True
    # 0 at equality (generators = identity, no mask)
    same = [f.clone().requires_grad_(True) for f in fpn_e]
    assert distill.detr3d_focal_distillation_loss(same, fpn_e, out['dec'], sel) == 0
    # > 0 otherwise, and exactly the expert's points and weights: the op is linear in the features, so
    # for F^ = 2 F_E it is mean ||s_E||^2 / C with s_E what the expert's output_proj received
    hat = [(2 * f).requires_grad_(True) for f in fpn_e]
    loss = distill.detr3d_focal_distillation_loss(hat, fpn_e, out['dec'], sel)
    expect = sum((s ** 2).mean(-1)[sel].mean() for s in captured) / len(captured)
    assert loss > 0 and torch.allclose(loss, expect, rtol=1e-4)
    # gradients reach only the generated features, never the expert (features, points, weights, params)
    fpn_leaf = [f.clone().requires_grad_(True) for f in fpn_e]
    dec = [dict(d, uv=d['uv'].clone().requires_grad_(True), attn=d['attn'].clone().requires_grad_(True))
           for d in out['dec']]
    noisy = [(f + 0.1 * torch.randn_like(f)).requires_grad_(True) for f in fpn_e]
    loss = distill.detr3d_focal_distillation_loss(noisy, fpn_leaf, dec, sel)
    loss.backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in noisy)
    assert all(f.grad is None for f in fpn_leaf) and all(d['uv'].grad is None and d['attn'].grad is None for d in dec)
    assert all(p.grad is None for p in expert.parameters())
    # only the selected queries count: moving features seen only by unselected queries changes nothing
    none = torch.zeros_like(sel)
    zero = distill.detr3d_focal_distillation_loss(noisy, fpn_e, out['dec'], none)
    assert zero == 0 and zero.requires_grad
    # a level without a generated map leaves both sums (None), and the loss still sees the others
    part = distill.detr3d_focal_distillation_loss([hat[0], None, None], fpn_e, out['dec'], sel)
    assert 0 < part < expect


class IdentityAlign(torch.nn.Module):
    def forward(self, x, hw):
        return x


def test_distiller_on_a_detr3d_pair_zero_at_equality_positive_otherwise():
    """distill.Distiller on a DETR3D pair (Distiller.detr3d_losses): fd3d gives kd_pv_<l> and kd_focal,
    mgd kd_pv_<l>, heatmap kd_cwd_<l>; fitnet (BEV only) is refused. With identity adapters and
    generators, no mask, no standardisation and A's features equal to E's, every term is 0; noise -> > 0."""
    import distill
    torch.manual_seed(0)
    cfg = small_cfg(num_query=60, image_size=(96, 54))
    expert, apprentice = detr3d.DETR3D(cfg).eval(), detr3d.DETR3D(cfg)
    _randomize(expert)
    with pytest.raises(InputError, match='--distill fitnet'):
        distill.Distiller(expert=expert, apprentice=apprentice, mode='fitnet')
    batch = evaluate.example_batch(cfg, batch_size=2, history=False, num_gt=6)
    names = {'fd3d': ['kd_focal', 'kd_pv_0', 'kd_pv_1', 'kd_pv_2'], 'mgd': ['kd_pv_0', 'kd_pv_1', 'kd_pv_2'],
             'heatmap': ['kd_cwd_0', 'kd_cwd_1', 'kd_cwd_2']}
    for mode, keys in names.items():
        d = distill.Distiller(expert=expert, apprentice=apprentice, mode=mode, mask_ratio=0.0, pv_norm='none',
                              areas='gt', select='matched')
        assert not any(k.startswith('bev') for k in d.kd)
        for k in list(d.kd):
            d.kd[k] = torch.nn.ModuleList(torch.nn.Identity() for _ in d.kd[k])
        be, ba = distill.model_inputs(batch, cfg, cfg)
        with torch.no_grad():
            out_e = expert(be)
        out_a = {'fpn': [f.clone() for f in out_e['fpn']], 'dec': out_e['dec']}
        terms = d.distill_losses(out_e, out_a, be, ba)
        assert sorted(terms) == keys and all(float(v) < 1e-6 for v in terms.values()), (mode, terms)
        noisy = {'fpn': [f + 0.5 * torch.randn_like(f) for f in out_a['fpn']], 'dec': out_e['dec']}
        terms = d.distill_losses(out_e, noisy, be, ba)
        assert all(float(v) > 1e-4 for v in terms.values()), (mode, terms)
    # the whole Distiller forward (a trainable generator set) reaches the apprentice and not the expert
    d = distill.Distiller(expert=expert, apprentice=apprentice, mode='fd3d', parts='focal')
    losses = d(batch)
    assert 'kd_focal' in losses and not any(k.startswith('kd_pv') for k in losses)
    sum(losses.values()).backward()
    assert apprentice.neck.fpn_convs[0].weight.grad is not None and d.kd['pv_gens'][0][0].weight.grad is not None
    assert all(p.grad is None for p in expert.parameters())


def test_fd3d_parts_for_detr3d_work_or_are_refused_in_one_line():
    """Every subset of FD3D's terms that exists for DETR3D (pv, focal) trains; a subset with bev (DETR3D
    has no BEV) is refused with one line naming the flag; the default is all of DETR3D's terms."""
    import distill
    torch.manual_seed(0)
    cfg = small_cfg(num_query=30, image_size=(96, 54))
    expert, apprentice = detr3d.DETR3D(cfg).eval(), detr3d.DETR3D(cfg)
    batch = evaluate.example_batch(cfg, batch_size=1, history=False, num_gt=4)
    pv, every = {'kd_pv_0', 'kd_pv_1', 'kd_pv_2'}, {'kd_focal', 'kd_pv_0', 'kd_pv_1', 'kd_pv_2'}
    for parts, keys in [(None, every), ('pv', pv), ('focal', {'kd_focal'}), ('pv,focal', every)]:
        d = distill.Distiller(expert=expert, apprentice=apprentice, mode='fd3d', parts=parts, areas='gt')
        losses = d(batch)
        assert {k for k in losses if k.startswith('kd_')} == keys, parts
        sum(losses.values()).backward()
    for parts in ('bev', 'pv,bev', 'bev,focal', 'pv,bev,focal', ''):
        with pytest.raises(InputError, match=r'--fd3d-parts .*subset of pv,focal') as e:
            distill.Distiller(expert=expert, apprentice=apprentice, mode='fd3d', parts=parts)
        assert '\n' not in str(e.value)


# ---------------------------------------------------------------------------------------------
# train.py and evaluate.py on a DETR3D preset
# ---------------------------------------------------------------------------------------------

def test_smoke_train_then_evaluate_detr3d_cpu_tiny(world, tmp_path, capsys):
    """train.py --model detr3d-cpu-tiny for 2 iterations, then evaluate.py --ckpt on its checkpoint (both
    in this process, through their main())."""
    import evaluate
    import train
    out = str(tmp_path / 'run')
    train.main(['--model', 'detr3d-cpu-tiny', '--dataroot', world, '--iters', '2', '--warmup', '1', '--log-every', '1',
                '--workers', '0', '--no-eval', '--out', out, '--set', 'num_query=60', '--set', 'dec_layers=2'])
    ckpt = torch.load(os.path.join(out, 'last.pt'), weights_only=True)
    assert ckpt['config']['detector'] == 'detr3d' and ckpt['config']['num_query'] == 60 and ckpt['iter'] == 2
    log = train.read_log(os.path.join(out, 'log.jsonl'))
    assert [r['iter'] for r in log if 'loss' in r] == [1, 2] and 'loss_cls_1' in log[0]
    capsys.readouterr()
    ev = str(tmp_path / 'eval')
    evaluate.main(['--ckpt', os.path.join(out, 'last.pt'), '--dataroot', world, '--out', ev, '--workers', '0'])
    last = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert last[0] == 'NDS' and last[2] == 'mAP' and 0 <= float(last[1]) <= 1
    with open(os.path.join(ev, 'results_nusc.json')) as f:
        assert len(json.load(f)['results']) == 4                             # every val sample predicted
    # FD3D pictures of a DETR3D pair (no BEV: one column per camera); the checkpoint teaches itself here
    capsys.readouterr()
    evaluate.main(['--ckpt', os.path.join(out, 'last.pt'), '--teacher', os.path.join(out, 'last.pt'),
                   '--vis-focal', '1', '--dataroot', world, '--out', ev])
    printed = capsys.readouterr().out
    pictures = os.listdir(os.path.join(ev, 'vis_focal'))
    assert len(pictures) == 1 and 'selected queries' in printed
    from PIL import Image
    assert Image.open(os.path.join(ev, 'vis_focal', pictures[0])).size[0] > 1000


# ---------------------------------------------------------------------------------------------
# Slow
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_overfit_one_synthetic_sample(world):
    import data
    from train import get_lr
    torch.manual_seed(0)
    cfg = detr3d.get_config('detr3d-cpu-tiny', dropout=0.0)
    ds = data.NuScenesDataset(world, 'v1.0-mini', 'train', image_size=cfg.image_size, queue_length=1, train=False)
    item = next(ds[i] for i in range(len(ds)) if len(ds[i]['gt_boxes']) >= 5)
    batch = data.collate([item])
    model = detr3d.DETR3D(cfg).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    # train.py's cosine decay to 0: at a constant lr the far boxes keep jittering around the 0.5 m threshold
    # (measured: 8-16 of 21 boxes matched between 400 and 800 iterations at 1e-3; 25 of 33 after 600 decayed)
    iters = 1000
    first = None
    for it in range(iters):
        for group in opt.param_groups:
            group['lr'] = get_lr(it, 1e-3, total=iters, warmup=0, min_ratio=0.0)
        loss = sum(model.loss(model(batch), batch).values())
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 35)
        opt.step()
    assert float(loss.detach()) < 0.3 * first
    model.eval()
    with torch.no_grad():
        det = model.decode(model(batch))[0]
    keep = det['scores'] > 0.3
    boxes, labels = det['boxes'][keep], det['labels'][keep]
    gt, gl = item['gt_boxes'], item['gt_labels']
    hit = sum(int((((boxes[:, :2] - gt[k, :2]).norm(dim=-1) < 0.5) & (labels == gl[k])).any()) for k in range(len(gt)))
    assert hit >= 0.8 * len(gt), (hit, len(gt))


@pytest.mark.slow
def test_real_input_size_detr3d_r50_forward():
    torch.manual_seed(0)
    cfg = detr3d.PRESETS['detr3d-r50']
    model = detr3d.DETR3D(cfg).eval()
    batch = evaluate.example_batch(cfg, batch_size=1, history=False, num_gt=10)
    with torch.no_grad():
        out = model(batch)
    assert [tuple(f.shape[-2:]) for f in out['fpn']] == [(116, 200), (58, 100), (29, 50), (15, 25)]
    d = out['dec'][-1]
    assert d['cls'].shape == (1, 900, 10) and d['attn'].shape == (1, 900, 6, 4) and len(out['dec']) == 6
    assert d['mask'].any(-1).float().mean() > 0.3               # refined points fall into some camera
    assert model.decode(out)[0]['boxes'].shape == (300, 9)
