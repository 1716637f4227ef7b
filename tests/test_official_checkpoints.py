"""Official mmdet3d checkpoints as they are: `evaluate.py --ckpt X.pth` and `train.py --teacher X.pth` take
an mmcv-format file (meta of strings, tuples, ints, None and numpy scalars; an OrderedDict state dict with
`_metadata`; an optimizer state), its preset given or inferred from its keys and shapes. The files here are
built from the official key manifests (tests/keys/) with zero-stride tensors, so they are small on disk."""
import collections
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import fixtures
import models
from data import InputError

ROOT = fixtures.ROOT
MANIFESTS = {'tiny': 'keys_bevformer_tiny.txt', 'small': 'keys_bevformer_small.txt',
             'base': 'keys_bevformer_base.txt', 'detr3d-r101': 'keys_detr3d_r101.txt'}


def official_state(name, real=()):
    """An OrderedDict state dict with `_metadata`, as mmcv saves it: every tensor of the manifest as a
    zero-stride view of one value (a few bytes on disk), except the keys in `real` (random values)."""
    g = torch.Generator().manual_seed(0)
    state = collections.OrderedDict()
    for k, shape in fixtures.manifest(MANIFESTS[name]).items():
        if k.endswith('num_batches_tracked'):
            state[k] = torch.tensor(7, dtype=torch.long)
        elif k in real:
            state[k] = torch.randn(*shape, generator=g)
        else:
            state[k] = torch.full((1,) * len(shape), 0.01).expand(*shape)
    state._metadata = collections.OrderedDict([('', {'version': 1}), ('img_backbone', {'version': 1})])
    return state


def mmcv_checkpoint(name, path, meta_extra=None, **kw):
    """Write an mmcv-style checkpoint: meta (the config text, CLASSES, env info, epoch/iter, numpy scalars
    from an evaluation hook), state_dict and an AdamW optimizer state."""
    meta = {'mmcv_version': '1.4.0', 'config': "model = dict(type='BEVFormer', use_grid_mask=True)\n",
            'CLASSES': tuple(data.CLASSES), 'env_info': 'sys.platform: linux\nPython: 3.8.13', 'seed': None,
            'exp_name': f'{name}.py', 'epoch': 24, 'iter': 84408, 'time': 'Tue Jun  7 12:00:00 2022',
            'hook_msgs': {'last_ckpt': '/work_dirs/epoch_24.pth', 'best_score': np.float64(0.354),
                          'best_epoch': np.int64(24)}}
    meta.update(meta_extra or {})
    optimizer = {'state': {0: {'step': 84408, 'exp_avg': torch.zeros(4), 'exp_avg_sq': torch.zeros(4)}},
                 'param_groups': [{'lr': 2e-7, 'betas': (0.9, 0.999), 'eps': 1e-8, 'weight_decay': 0.01,
                                   'amsgrad': False, 'params': [0]}]}
    torch.save({'meta': meta, 'state_dict': official_state(name, **kw), 'optimizer': optimizer}, path)
    return path


@pytest.mark.parametrize('name', list(MANIFESTS))
def test_the_preset_of_every_official_checkpoint_is_inferred(name):
    assert models.official_preset(official_state(name), 'x') == name


def test_an_official_file_loads_as_ckpt_with_its_preset_inferred_or_given(tmp_path):
    path = mmcv_checkpoint('tiny', str(tmp_path / 'bevformer_tiny_epoch_24.pth'),
                           real=('pts_bbox_head.bev_embedding.weight', 'pts_bbox_head.reg_branches.5.4.weight'))
    src = torch.load(path, weights_only=False)['state_dict']
    for preset in (None, 'tiny'):
        model, cfg, ckpt = models.model_from_checkpoint(path, '--ckpt', preset)
        assert cfg.name == 'tiny' and ckpt['config']['name'] == 'tiny'
        assert torch.equal(model.bev_embedding.weight, src['pts_bbox_head.bev_embedding.weight'])
        reg = src['pts_bbox_head.reg_branches.5.4.weight']                 # yaw rows converted
        assert torch.equal(model.reg_branches[5][4].weight[6], -reg[7])
    with pytest.raises(InputError, match=r"missing key .* preset small; wrong preset") as e:    # the wrong preset
        models.model_from_checkpoint(path, '--ckpt', 'small')
    assert '\n' not in str(e.value) and 'bevformer_tiny_epoch_24.pth' in str(e.value)


def test_official_ckpt_errors_are_one_line_on_the_command_line(tmp_path):
    path = mmcv_checkpoint('tiny', str(tmp_path / 'tiny.pth'))
    with open(path, 'rb') as f:
        head = f.read()
    cut = str(tmp_path / 'cut.pth')
    with open(cut, 'wb') as f:
        f.write(head[:len(head) // 2])
    for argv, expect in [(['--ckpt', path, '--preset', 'base'], 'tiny.pth'), (['--ckpt', cut], 'cut.pth')]:
        r = subprocess.run([sys.executable, 'evaluate.py', *argv], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.strip().count('\n') == 0 and expect in r.stderr, r.stderr


def test_unknown_files_and_other_classes_name_the_candidates(tmp_path):
    state = official_state('tiny')
    del state['pts_bbox_head.cls_branches.0.6.weight']
    with pytest.raises(InputError, match=r'fits none of the presets tiny, .*closest: tiny, 1 keys') as e:
        models.official_preset(state, "--teacher 'x.pth'")
    assert '\n' not in str(e.value)
    path = mmcv_checkpoint('detr3d-r101', str(tmp_path / 'd.pth'), meta_extra={'CLASSES': ('car', 'truck')})
    with pytest.raises(InputError, match='classes'):
        models.model_from_checkpoint(path)


def test_numpy_scalars_pass_but_arrays_and_code_are_refused(tmp_path):
    ok = mmcv_checkpoint('tiny', str(tmp_path / 'ok.pth'))
    assert models.load_checkpoint(ok)['meta']['hook_msgs']['best_score'] == pytest.approx(0.354)
    arr = mmcv_checkpoint('tiny', str(tmp_path / 'array.pth'), meta_extra={'scores': np.arange(3.0)})
    with pytest.raises(InputError, match='refused'):
        models.load_checkpoint(arr)
    marker = str(tmp_path / 'pwned')

    class Evil:
        def __reduce__(self):
            return (open, (marker, 'w'))

    bad = mmcv_checkpoint('tiny', str(tmp_path / 'evil.pth'), meta_extra={'x': Evil()})
    with pytest.raises(InputError, match='refused'):
        models.load_checkpoint(bad)
    assert not os.path.exists(marker)


def test_train_takes_an_official_checkpoint_as_teacher(tmp_path):
    """`python train.py --teacher OFFICIAL.pth --student NAME`: the official Tiny checkpoint as it is (preset
    inferred) teaches a CPU apprentice for one iteration; the run's checkpoint names the teacher file."""
    from fixtures import small_world
    root = small_world(tmp_path / 'world')
    teacher = mmcv_checkpoint('tiny', str(tmp_path / 'bevformer_tiny_epoch_24.pth'))
    out = str(tmp_path / 'run')
    r = subprocess.run([sys.executable, 'train.py', '--teacher', teacher, '--student', 'cpu-tiny', '--dataroot', root,
                        '--iters', '1', '--no-eval', '--workers', '0', '--out', out,
                        '--set', 'num_query=30', '--set', 'dec_layers=1'], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = torch.load(os.path.join(out, 'last.pt'), weights_only=True)
    assert ckpt['args']['teacher'] == teacher and ckpt['iter'] == 1 and 'distiller' in ckpt
