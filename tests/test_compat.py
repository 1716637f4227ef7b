"""Checkpoints written by earlier code load and predict exactly as they did.

tests/data/*_bf44445.pt were written by `train.py` at commit bf44445 (before the restructure of issue 17):
a temporal BEVFormer (cpu-tiny shrunk with --set, queue 2) and a DETR3D (detr3d-cpu-tiny shrunk), 3
iterations each on the small test world. expected_bf44445.pt holds what that commit's code computed
from them on the same world: `decode` of a val batch of two samples, two `predict` calls chained through
the temporal state, and the training losses for torch.manual_seed(0). With the image CNN in bf44445's memory layout
(channels_last=False) the numbers were the same to rtol 1e-6 on the CPU that wrote them (AVX-512), but a
CPU with other vector units (AVX2) adds the convolutions' and matmuls' terms in another order, as today's
NHWC layout does: both move the numbers by float32 rounding only (the losses, through training-mode
BatchNorm, by ~2e-5 relative; on an AVX2 CPU both layouts differ from the AVX-512 numbers by up to
2.3e-5), so both layouts are checked at rtol 1e-4.
"""
import dataclasses
import os

import pytest
import torch

import data
import models
from fixtures import small_world

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    return small_world(tmp_path_factory.mktemp('world'))


@pytest.fixture(scope='module')
def expected():
    return torch.load(os.path.join(HERE, 'expected_bf44445.pt'), weights_only=True)


def assert_same(a, b, what, tol):
    if torch.is_tensor(a):
        assert a.shape == b.shape and a.dtype == b.dtype, what
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=what)
    elif isinstance(a, dict):
        assert sorted(a) == sorted(b), what
        for k in a:
            assert_same(a[k], b[k], f'{what}.{k}', tol)
    else:
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f'{what}[{i}]', tol)


@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('detector', ['bevformer', 'detr3d'])
def test_checkpoint_from_bf44445_predicts_as_then(world, expected, detector, channels_last):
    model, cfg, _ = models.model_from_checkpoint(os.path.join(HERE, f'{detector}_bf44445.pt'))
    assert cfg.channels_last                 # the default for a checkpoint that predates the field
    if not channels_last:
        cfg = dataclasses.replace(cfg, channels_last=False)
        state = model.state_dict()
        model = models.build_model(cfg)
        model.load_state_dict(state)
    tol = 1e-4                               # float32 rounding across layouts and CPU types (docstring)
    ds = data.NuScenesDataset(world, 'v1.0-mini', 'val', view=data.view_of(cfg), train=False)
    batch = data.collate([ds[1], ds[2]])
    want = expected[detector]
    model.eval()
    with torch.no_grad():
        assert_same(model.decode(model(batch)), want['decode'], 'decode', tol)
        state, preds = None, []
        for i in (0, 1):
            it = ds[i]
            r = model.predict(it['img'], it['lidar2img'], it['can_bus'], state=state,
                              img_shape=it['img_shape'], scene_token=it['scene_token'])
            state = r.pop('state')
            preds.append(r)
        assert_same(preds, want['predict'], 'predict', tol)
    if detector == 'bevformer':
        assert state['bev'] is not None         # the temporal path ran (queue 2)
    model.train()
    torch.manual_seed(0)
    losses = {k: v.detach() for k, v in model.loss(model(batch), batch).items()}
    assert_same(losses, want['losses'], 'losses', tol)
