"""train.py and evaluate.py: the loop's schedule, checkpoints and exact resume, the submission path
(oracle, and a deliberate convention error that it must catch), safe checkpoint loading, one-line
errors, torchrun.

The loop tests use a stand-in detector defined here (the model interface in a few lines: backbone,
forward, loss, decode, predict, GridMask-like randomness from torch's global generator) so that they
run in seconds; the smoke tests run the real `cpu-tiny`.
"""
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import evaluate  # noqa: E402
import models  # noqa: E402
import train  # noqa: E402

# ------------------------------------------------------------------------------------------------
# A tiny world shared by the module (written once) and a stand-in detector


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    from fixtures import small_world     # 2 train scenes + 1 val scene, 4 samples each, 200x113 images
    return small_world(tmp_path_factory.mktemp('world'))


@dataclasses.dataclass
class StandInConfig:
    name: str = 'stand-in'
    detector: str = 'bevformer'
    image_size: tuple = (64, 36)
    queue_length: int = 2
    num_classes: int = 10
    width: int = 8
    drop: float = 0.3


class StandIn(nn.Module):
    """The model interface with almost no model: pooled image features -> one box per class."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.backbone = nn.Conv2d(3, cfg.width, 3, stride=4)
        self.head = nn.Linear(cfg.width, cfg.num_classes * 10)
        self.sigint_at = None        # forward call number at which to send ourselves Ctrl-C
        self.calls = 0

    def forward(self, batch):
        self.calls += 1
        if self.sigint_at == self.calls:
            os.kill(os.getpid(), signal.SIGINT)
        img = batch['img'] / 255.0                                   # [B, N, 3, H, W]
        if self.training:                                            # like GridMask: torch's global RNG
            img = img * (torch.rand(img.shape[-2:], device=img.device) > self.cfg.drop)
        B, N = img.shape[:2]
        feat = self.backbone(img.flatten(0, 1)).mean((2, 3)).view(B, N, -1).mean(1)   # [B, C]
        if 'history' in batch and batch['history_valid'].any():
            feat = feat + 0.01 * batch['history']['img'].mean()
        code = self.head(feat).view(B, self.cfg.num_classes, 10)     # [B, 10 classes, 10]
        return {'cls': code[..., 0], 'box': code[..., 1:]}

    def loss(self, out, batch):
        target_cls = torch.zeros_like(out['cls'])
        target_box = torch.zeros_like(out['box'])
        for b, (boxes, labels) in enumerate(zip(batch['gt_boxes'], batch['gt_labels'])):
            for box, label in zip(boxes, labels):
                target_cls[b, label] = 1.0
                target_box[b, label] = box[:9]
        return {'loss_cls': nn.functional.binary_cross_entropy_with_logits(out['cls'], target_cls),
                'loss_bbox': 0.01 * (out['box'] - target_box).abs().mean()}

    def decode(self, out):
        dets = []
        for cls, box in zip(out['cls'], out['box']):
            boxes = box.detach().clone()
            boxes[:, 3:6] = boxes[:, 3:6].abs() + 0.5               # sizes > 0
            dets.append({'boxes': boxes, 'scores': cls.sigmoid(), 'labels': torch.arange(len(cls))})
        return dets

    def predict(self, img, lidar2img, can_bus=None, state=None, img_shape=None, scene_token=None):
        det = self.decode(self({'img': img[None], 'lidar2img': lidar2img[None]}))[0]
        return {**det, 'state': {'scene_token': scene_token}}


@pytest.fixture
def stand_in(monkeypatch):
    """train.py/evaluate.py build the stand-in instead of a preset; returns the list of built models."""
    built = []

    def build(cfg):
        built.append(StandIn(cfg))
        return built[-1]

    monkeypatch.setattr(models, 'preset_config', lambda name, flag='--model': StandInConfig())
    monkeypatch.setattr(models, 'config_from_dict', lambda d, what='': StandInConfig(**d))
    monkeypatch.setattr(models, 'build_model', build)
    return built


def run_train(argv):
    """train.main in this process; returns the exit code (0 when it returns normally)."""
    try:
        train.main(argv)
    except SystemExit as e:
        return e.code
    return 0


# ------------------------------------------------------------------------------------------------
# Smoke: the real cpu-tiny, a few iterations, a checkpoint, evaluate.py on it

SMALLER = ['--set', 'bev_h=20', '--set', 'bev_w=20', '--set', 'num_query=60', '--set', 'enc_layers=1']


def test_smoke_train_then_evaluate_cpu_tiny(world, tmp_path):
    out = str(tmp_path / 'run')
    r = subprocess.run([sys.executable, 'train.py', '--dataroot', world, '--iters', '2', '--warmup', '1',
                        '--log-every', '1', '--workers', '0', '--no-eval', '--out', out] + SMALLER,
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(os.path.join(out, 'last.pt'), weights_only=True)
    assert ckpt['config']['name'] == 'cpu-tiny' and ckpt['config']['bev_h'] == 20 and ckpt['iter'] == 2
    log = train.read_log(os.path.join(out, 'log.jsonl'))
    assert [r['iter'] for r in log if 'loss' in r] == [1, 2] and all(np.isfinite(r['loss']) for r in log if 'loss' in r)
    assert any(k.startswith('loss_cls_') for k in log[0]) and os.path.exists(os.path.join(out, 'learning_curve.png'))
    # evaluate.py rebuilds the model from the checkpoint's (overridden) config alone
    ev = str(tmp_path / 'eval')
    r = subprocess.run([sys.executable, 'evaluate.py', '--ckpt', os.path.join(out, 'last.pt'), '--dataroot', world,
                        '--out', ev, '--workers', '0', '--vis', '1'], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    last = r.stdout.strip().splitlines()[-1].split()
    assert last[0] == 'NDS' and last[2] == 'mAP' and 0 <= float(last[1]) <= 1 and 0 <= float(last[3]) <= 1
    assert 'Per-class results:' in r.stdout
    with open(os.path.join(ev, 'metrics_summary.json')) as f:
        assert json.load(f)['nd_score'] == pytest.approx(float(last[1]), abs=1e-4)
    assert len([f for f in os.listdir(os.path.join(ev, 'vis')) if f.endswith('.png')]) == 1


def test_backbone_weights_are_loaded(world, tmp_path):
    import bevformer
    torch.manual_seed(123)
    donor = bevformer.BEVFormer(bevformer.PRESETS['cpu-tiny'])
    path = str(tmp_path / 'backbone.pth')
    torch.save({k: v for k, v in donor.state_dict().items() if k.startswith('backbone.')}, path)
    out = str(tmp_path / 'run')
    # lr 0: the weights after one iteration are the loaded ones
    assert run_train(['--dataroot', world, '--iters', '1', '--lr', '0', '--no-eval', '--workers', '0',
                      '--backbone-weights', path, '--out', out] + SMALLER) == 0
    ckpt = torch.load(os.path.join(out, 'last.pt'), weights_only=True)
    # pretrained backbone 0.1x, the rest 1x, the point layers 0.1x (--points-lr-mult)
    assert [g['lr_mult'] for g in ckpt['optimizer']['param_groups']] == [0.1, 1.0, 0.1]
    got = ckpt['model']
    convs = [k for k in got if k.startswith('backbone.') and 'conv' in k and k.endswith('weight')]
    assert convs and all(torch.equal(got[k], donor.state_dict()[k]) for k in convs)
    neck = next(k for k in got if k.startswith('neck.') and k.endswith('weight'))
    assert not torch.equal(got[neck], donor.state_dict()[neck])       # only the backbone was loaded


# ------------------------------------------------------------------------------------------------
# Schedule and --set


def test_get_lr_warmup_from_a_third_then_cosine_to_the_floor():
    lr, total, warm = 1e-3, 1000, 100
    assert train.get_lr(0, lr, total, warm, 1e-3) == pytest.approx(lr / 3)
    ramp = [train.get_lr(i, lr, total, warm, 1e-3) for i in range(warm + 1)]
    assert all(b > a for a, b in zip(ramp, ramp[1:]))                           # linear warm-up rises
    floor = lr * 1e-3
    expected = floor + (lr - floor) * 0.5 * (1 + np.cos(np.pi * 0.1))
    assert train.get_lr(warm, lr, total, warm, 1e-3) == pytest.approx(expected)
    tail = [train.get_lr(i, lr, total, warm, 1e-3) for i in range(warm, total + 1)]
    assert all(b <= a for a, b in zip(tail, tail[1:]))                          # cosine only decreases
    assert train.get_lr(total, lr, total, warm, 1e-3) == pytest.approx(lr * 1e-3)


def test_set_overrides_convert_to_field_types_and_reject_unknown_keys():
    cfg = models.apply_overrides(StandInConfig(), ['width=16', 'drop=0.5', 'image_size=32,18', 'name=x'])
    assert (cfg.width, cfg.drop, cfg.image_size, cfg.name) == (16, 0.5, (32, 18), 'x')
    assert isinstance(cfg.width, int) and isinstance(cfg.image_size[0], int)
    with pytest.raises(data.InputError, match='unknown config field'):
        models.apply_overrides(StandInConfig(), ['bev_hh=3'])
    with pytest.raises(data.InputError, match='expected int'):
        models.apply_overrides(StandInConfig(), ['width=wide'])


# ------------------------------------------------------------------------------------------------
# The loop with the stand-in: checkpoints, log, exact resume after Ctrl-C


def _weights(path):
    return torch.load(path, weights_only=True)


def test_interrupted_and_resumed_run_is_bit_identical(world, stand_in, tmp_path):
    common = ['--dataroot', world, '--iters', '7', '--warmup', '3', '--lr', '3e-2', '--log-every', '1',
              '--ckpt-every', '100', '--no-eval', '--ema', '0.5', '--seed', '3']
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    assert run_train(common + ['--out', a, '--workers', '0']) == 0

    # Run b: Ctrl-C arrives during iteration 3 (of 7): it finishes that iteration, saves, exits 130.
    def build_and_arm(cfg):
        model = StandIn(cfg)
        model.sigint_at = 3
        return model

    handler_before = signal.getsignal(signal.SIGINT)      # SIG_IGN under `nohup ... &`, not the default
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, 'build_model', build_and_arm)
        assert run_train(common + ['--out', b, '--workers', '2']) == 130
    assert signal.getsignal(signal.SIGINT) is handler_before                # handler given back
    ckpt = _weights(os.path.join(b, 'last.pt'))
    assert ckpt['iter'] == 3
    # resume with 2 workers: the items' randomness must not depend on who loads them
    assert run_train(['--resume', os.path.join(b, 'last.pt'), '--workers', '2']) == 0

    wa, wb = _weights(os.path.join(a, 'last.pt')), _weights(os.path.join(b, 'last.pt'))
    assert wa['iter'] == wb['iter'] == 7
    for k in wa['model']:
        assert torch.equal(wa['model'][k], wb['model'][k]), k
        assert torch.equal(wa['ema'][k], wb['ema'][k]), k                  # the average resumes too
    assert wa['ema_steps'] == wb['ema_steps'] == 7
    assert not torch.equal(wa['ema']['head.weight'], wa['model']['head.weight'])
    for k, state in wa['optimizer']['state'].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(wb['optimizer']['state'][k][name])), (k, name)
    la, lb = train.read_log(os.path.join(a, 'log.jsonl')), train.read_log(os.path.join(b, 'log.jsonl'))
    assert [r['iter'] for r in la if 'loss' in r] == [r['iter'] for r in lb if 'loss' in r] == list(range(1, 8))
    assert [r['loss'] for r in la if 'loss' in r] == [r['loss'] for r in lb if 'loss' in r]

    # ...and the check can fail: another seed gives other weights.
    c = str(tmp_path / 'c')
    assert run_train(common[:-1] + ['4', '--out', c, '--workers', '0']) == 0
    wc = _weights(os.path.join(c, 'last.pt'))
    assert not all(torch.equal(wa['model'][k], wc['model'][k]) for k in wa['model'])


def test_ema_is_the_exponentially_weighted_average_of_the_weights_seen():
    """--ema: after n updates the average is sum_k decay**(n-k) w_k / sum_k decay**(n-k) over the weights
    w_1..w_n seen (no trace of anything before w_1); BatchNorm's running statistics are averaged alike and
    its step counter is copied."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = train.make_ema(0.9, model)
    seen = []
    for n in range(1, 41):
        with torch.no_grad():
            for t in list(model.parameters()) + [model[1].running_mean, model[1].running_var]:
                t.add_(torch.randn_like(t))
        model[1].num_batches_tracked += 1
        ema.update_parameters(model)
        seen.append(torch.cat([model[0].weight.flatten(), model[1].running_var]).detach().clone())
        w = torch.tensor([0.9 ** (n - k) for k in range(1, n + 1)])
        expected = (w[:, None] * torch.stack(seen)).sum(0) / w.sum()
        got = torch.cat([ema.module[0].weight.flatten(), ema.module[1].running_var])
        assert torch.allclose(got, expected, atol=1e-5), n
        assert int(ema.module[1].num_batches_tracked) == n
    assert not torch.allclose(got, seen[-1])                 # ...and it is an average, not a copy
    assert train.make_ema(0.0, model) is None
    with pytest.raises(train.InputError, match='--ema'):
        train.make_ema(1.5, model)


def test_a_checkpoint_with_an_average_loads_it_unless_told_otherwise(world, stand_in, tmp_path):
    """models.model_from_checkpoint (evaluate.py --ckpt, train.py --teacher) rebuilds the weights the run
    scored: the average under --ema; averaged=False (evaluate.py --trained-weights) the trained ones."""
    out = str(tmp_path / 'run')
    assert run_train(['--dataroot', world, '--iters', '4', '--lr', '3e-2', '--no-eval', '--workers', '0',
                      '--ema', '0.9', '--out', out]) == 0
    path = os.path.join(out, 'last.pt')
    ckpt = _weights(path)
    averaged = models.model_from_checkpoint(path)[0]
    trained = models.model_from_checkpoint(path, averaged=False)[0]
    for k, v in averaged.state_dict().items():
        assert torch.equal(v, ckpt['ema'][k]) and torch.equal(trained.state_dict()[k], ckpt['model'][k]), k
    assert not torch.equal(averaged.head.weight, trained.head.weight)


def test_a_second_run_never_destroys_the_first(world, stand_in, tmp_path, capsys):
    """The same command again into a folder that holds a run stops with one line naming --resume and
    --out, before anything is written; --overwrite replaces it; resuming into its own folder goes on."""
    common = ['--dataroot', world, '--iters', '3', '--log-every', '1', '--no-eval', '--workers', '0']
    out = str(tmp_path / 'run')
    assert run_train(common + ['--out', out]) == 0
    files = {f: open(os.path.join(out, f), 'rb').read() for f in ('last.pt', 'log.jsonl')}
    capsys.readouterr()
    assert run_train(common + ['--out', out, '--seed', '5']) == 2
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and '--resume' in err and '--out' in err and '--overwrite' in err, err
    assert all(open(os.path.join(out, f), 'rb').read() == data for f, data in files.items())
    other = str(tmp_path / 'other')                                   # a resumed run sent into a held folder
    assert run_train(common + ['--out', other]) == 0
    assert run_train(['--resume', os.path.join(out, 'last.pt'), '--out', other, '--iters', '4']) == 2
    assert run_train(['--resume', os.path.join(out, 'last.pt'), '--iters', '4']) == 0     # its own folder
    assert _weights(os.path.join(out, 'last.pt'))['iter'] == 4
    assert run_train(common + ['--out', out, '--seed', '5', '--overwrite']) == 0
    replaced = _weights(os.path.join(out, 'last.pt'))
    assert replaced['iter'] == 3 and replaced['args']['seed'] == 5


def test_checkpoint_is_plain_and_stores_the_overridden_config(world, stand_in, tmp_path):
    out = str(tmp_path / 'run')
    assert run_train(['--dataroot', world, '--iters', '2', '--warmup', '1', '--no-eval', '--workers', '0',
                      '--set', 'width=4', '--out', out]) == 0
    ckpt = torch.load(os.path.join(out, 'last.pt'), weights_only=True)      # plain: weights_only reads it
    assert ckpt['config']['width'] == 4 and ckpt['model']['backbone.weight'].shape[0] == 4
    assert ckpt['iter'] == 2 and ckpt['args']['set'] == ['width=4']
    assert set(ckpt) >= {'model', 'config', 'args', 'optimizer', 'iter', 'rng'}
    # a backbone trained from scratch gets the full lr (0.1x is for --backbone-weights, tested below)
    groups = ckpt['optimizer']['param_groups']
    assert [g['lr_mult'] for g in groups] == [1.0, 1.0] and len(groups[0]['params']) == 2
    assert groups[0]['lr'] == pytest.approx(groups[1]['lr'])
    assert os.path.exists(os.path.join(out, 'learning_curve.png'))
    assert not any(f.endswith('.tmp') for f in os.listdir(out))


def test_amp_on_the_cpu_runs_the_image_cnn_in_bfloat16_and_the_rest_in_float32(world, tmp_path, monkeypatch):
    """--amp on the CPU: the image CNN of the training forward runs in bfloat16, the BEV encoder, decoder and
    loss in float32 (in bfloat16 they cost orientation: docs/benchmarks.md), there is no loss scaler, and
    the weights and the logged loss stay float32 and finite; the run's evaluation is float32, as
    `evaluate.py --ckpt` is."""
    dtypes, evals = [], []
    plain_build = models.build_model

    def build(cfg):
        model = plain_build(cfg)
        model.backbone.register_forward_hook(lambda m, a, out: (dtypes if m.training else evals).append(out[-1].dtype))
        model.register_forward_hook(lambda m, a, out: dtypes.append(out['bev_seq'].dtype) if m.training else None)
        return model

    monkeypatch.setattr(models, 'build_model', build)
    out = str(tmp_path / 'run')
    assert run_train(['--amp', '--dataroot', world, '--iters', '2', '--warmup', '1', '--log-every', '1',
                      '--workers', '0', '--no-eval', '--threads', '1', '--out', out] + SMALLER) == 0
    assert dtypes == [torch.bfloat16, torch.float32] * 2          # (image CNN, BEV) of each iteration
    ckpt = _weights(os.path.join(out, 'last.pt'))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all()
               for v in ckpt['model'].values() if v.is_floating_point())
    assert not ckpt['scaler']                                  # disabled: nothing to scale in bfloat16
    rows = [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]
    assert all(math.isfinite(r['loss']) for r in rows if 'loss' in r)
    # the run's evaluation: float32
    dtypes.clear()
    assert run_train(['--amp', '--dataroot', world, '--iters', '1', '--warmup', '1', '--workers', '0',
                      '--threads', '1', '--out', str(tmp_path / 'eval')] + SMALLER) == 0
    assert dtypes == [torch.bfloat16, torch.float32] and evals and set(evals) == {torch.float32}
    # without --amp the image CNN stays float32
    dtypes.clear()
    assert run_train(['--dataroot', world, '--iters', '1', '--warmup', '1', '--workers', '0', '--no-eval',
                      '--threads', '1', '--out', str(tmp_path / 'fp32')] + SMALLER) == 0
    assert dtypes == [torch.float32, torch.float32]


@pytest.mark.parametrize('mult', [1.0, 0.1])
def test_points_lr_mult_gives_the_point_layers_their_own_lr(mult):
    """--points-lr-mult: reference_points and every sampling_offsets layer (TSA, SCA, decoder) in a group of
    their own at that multiple; at 1.0 the two groups of before, in the model's parameter order."""
    model = models.build_model(models.preset_config('cpu-tiny'))
    args = train.make_parser().parse_args(['--points-lr-mult', str(mult)])
    optimizer, _, params = train.make_optimizer(args, model, model, use_amp=False)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[names[id(p)] for p in g['params']] for g in optimizer.param_groups]
    assert sorted(n for g in groups for n in g) == sorted(names.values())       # each parameter once
    assert all(n.startswith('backbone.') for n in groups[0])
    is_point = [n for n in names.values() if n.startswith('reference_points.') or '.sampling_offsets.' in n]
    assert len(is_point) == 2 + 2 * (model.cfg.enc_layers * 2 + model.cfg.dec_layers)   # weight and bias each
    if mult == 1.0:
        assert [g['lr_mult'] for g in optimizer.param_groups] == [1.0, 1.0]
        assert groups[1] == [n for n, _ in model.named_parameters() if not n.startswith('backbone.')]
    else:
        assert [g['lr_mult'] for g in optimizer.param_groups] == [1.0, 1.0, 0.1]
        assert sorted(groups[2]) == sorted(is_point)


def test_nan_guard_stops_with_the_loss_dict(world, stand_in, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(StandIn, 'loss', lambda self, out, batch: {'loss_cls': out['cls'].sum() * float('nan'),
                                                                    'loss_bbox': out['box'].sum()})
    code = run_train(['--dataroot', world, '--iters', '3', '--no-eval', '--workers', '0', '--out', str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) >= 1
    assert 'non-finite loss at iteration 0' in err[-1] and "'loss_cls': nan" in err[-1] and 'loss_bbox' in err[-1]
    assert not os.path.exists(os.path.join(tmp_path, 'last.pt'))


# ------------------------------------------------------------------------------------------------
# Submission path: the oracle, and a convention error it must catch


def _oracle(world, out, perturb=None):
    ds = data.NuScenesDataset(world, version='v1.0-mini', split='val', train=False)
    preds = evaluate.ground_truth_as_predictions(ds, progress=False)
    if perturb is not None:
        for p in preds.values():
            perturb(p['boxes'])
    path = os.path.join(out, 'results_nusc.json')
    evaluate.write_json(path, evaluate.to_submission(ds.nusc, preds, ds.sample_tokens))
    return evaluate.score(ds.nusc, path, 'mini_val', out, verbose=False)


def test_oracle_scores_one_and_catches_convention_errors(world, tmp_path):
    good = _oracle(world, str(tmp_path / 'good'))
    assert good['nd_score'] >= 0.99 and good['mean_ap'] >= 0.99
    assert os.path.exists(tmp_path / 'good' / 'metrics_summary.json')

    def old_yaw(b):          # mmdet3d's yaw' = -yaw - pi/2 forgotten somewhere
        b[:, 6] = -b[:, 6] - np.pi / 2

    def swapped_wl(b):
        b[:, [3, 4]] = b[:, [4, 3]]

    for name, perturb in [('yaw', old_yaw), ('wl', swapped_wl)]:
        bad = _oracle(world, str(tmp_path / name), perturb)
        assert bad['nd_score'] < 0.95, (name, bad['nd_score'])
    # missing the lidar -> ego calibration step moves every box: mAP collapses
    saved = evaluate.lidar_pose
    evaluate.lidar_pose = lambda nusc, token: ({'rotation': [1, 0, 0, 0], 'translation': [0, 0, 0]},
                                               saved(nusc, token)[1])
    try:
        bad = _oracle(world, str(tmp_path / 'calib'))
    finally:
        evaluate.lidar_pose = saved
    assert bad['mean_ap'] < 0.9


def test_attribute_rule():
    assert evaluate.attribute_name('car', (1.0, 0.0)) == 'vehicle.moving'
    assert evaluate.attribute_name('car', (0.1, 0.1)) == 'vehicle.parked'
    assert evaluate.attribute_name('bus', (0.0, 0.0)) == 'vehicle.stopped'
    assert evaluate.attribute_name('pedestrian', (0.0, 0.1)) == 'pedestrian.standing'
    assert evaluate.attribute_name('pedestrian', (1.0, 0.0)) == 'pedestrian.moving'
    assert evaluate.attribute_name('bicycle', (0.0, 0.3)) == 'cycle.with_rider'
    assert evaluate.attribute_name('motorcycle', (0.0, 0.0)) == 'cycle.without_rider'
    assert evaluate.attribute_name('traffic_cone', (5.0, 0.0)) == ''


def test_submission_has_every_token_and_devkit_fields(world, stand_in, tmp_path):
    ds = data.NuScenesDataset(world, version='v1.0-mini', split='val', image_size=(64, 36), train=False)
    model = StandIn(StandInConfig())
    preds = evaluate.predict_split(model, ds, torch.device('cpu'), progress=False)
    sub = evaluate.to_submission(ds.nusc, preds, ds.sample_tokens)
    assert set(sub['results']) == set(ds.sample_tokens)
    box = next(b for v in sub['results'].values() for b in v)
    assert set(box) == {'sample_token', 'translation', 'size', 'rotation', 'velocity', 'detection_name',
                        'detection_score', 'attribute_name'}
    # --format-only: the submission, no scoring
    out = str(tmp_path / 'fmt')
    evaluate.main(['--model', 'stand-in', '--dataroot', world, '--format-only', '--out', out, '--workers', '0'])
    with open(os.path.join(out, 'results_nusc.json')) as f:
        assert set(json.load(f)['results']) == set(ds.sample_tokens)
    assert not os.path.exists(os.path.join(out, 'metrics_summary.json'))


# ------------------------------------------------------------------------------------------------
# Checkpoint safety


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))      # unpickling would create the marker file


def test_malicious_checkpoint_is_refused_and_its_code_never_runs(tmp_path):
    marker = str(tmp_path / 'pwned')
    path = str(tmp_path / 'evil.pt')
    torch.save({'model': {}, 'config': {'detector': 'bevformer'}, 'x': _Evil(marker)}, path)
    assert not os.path.exists(marker)
    with pytest.raises(data.InputError, match='refused'):
        models.load_checkpoint(path)
    assert not os.path.exists(marker)
    # the same file through the CLI: one line, non-zero, marker still absent
    r = subprocess.run([sys.executable, 'evaluate.py', '--ckpt', path], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.strip().count('\n') == 0 and 'evil.pt' in r.stderr and 'refused' in r.stderr
    assert not os.path.exists(marker)
    # sanity of the test itself: a full unpickle would have run the code
    torch.load(path, weights_only=False)
    assert os.path.exists(marker)


@pytest.mark.parametrize('entry', ['train', 'evaluate'])
def test_entry_points_let_idle_cpu_threads_sleep_unless_the_environment_says_otherwise(entry):
    """train.py and evaluate.py set OMP_WAIT_POLICY=PASSIVE before torch loads (spinning threads cost a 10x
    slowdown with two runs side by side, docs/benchmarks.md; evaluate.py's step benchmarks time what a run
    runs). libgomp's own report of its settings (OMP_DISPLAY_ENV=VERBOSE) shows what torch's threads got: its
    spin count before a thread sleeps, 0 under PASSIVE. (Its OMP_WAIT_POLICY line cannot tell: it reads
    'PASSIVE' when nothing is set, where threads spin 300000 rounds first.) A policy the user set is kept."""
    def spin_counts(env):
        env = {**{k: v for k, v in os.environ.items() if k != 'OMP_WAIT_POLICY'}, 'OMP_DISPLAY_ENV': 'VERBOSE', **env}
        r = subprocess.run([sys.executable, '-c', f'import {entry}'], cwd=ROOT, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return {ln.split('=')[1].strip(" '") for ln in r.stderr.splitlines()
                if ln.strip().startswith('GOMP_SPINCOUNT')}

    default = spin_counts({})
    if not default and not sys.platform.startswith('linux'):     # torch's Linux wheels ship libgomp
        pytest.skip(f'torch on {sys.platform} does not run on libgomp: no GOMP_SPINCOUNT to read')
    assert default == {'0'}                           # each OpenMP runtime loaded reports its own
    assert '0' not in spin_counts({'OMP_WAIT_POLICY': 'ACTIVE'})


# ------------------------------------------------------------------------------------------------
# Command line: one-line errors naming the culprit (subprocesses, run side by side)


def test_bad_inputs_give_one_line_naming_the_culprit(world, tmp_path):
    import shutil
    broken = str(tmp_path / 'broken')
    shutil.copytree(world, broken)
    cam_dir = os.path.join(broken, 'samples', 'CAM_FRONT')
    for name in os.listdir(cam_dir):                      # every front image becomes garbage
        with open(os.path.join(cam_dir, name), 'wb') as f:
            f.write(b'not a jpeg')
    out = str(tmp_path / 'out')
    cases = {
        'missing dataroot': (['train.py', '--dataroot', str(tmp_path / 'nowhere'), '--out', out], 'nowhere'),
        'unknown preset': (['train.py', '--model', 'cpu-huge', '--dataroot', world, '--out', out], 'cpu-huge'),
        'missing checkpoint': (['evaluate.py', '--ckpt', str(tmp_path / 'none.pt'), '--dataroot', world], 'none.pt'),
        'corrupt image': (['train.py', '--dataroot', broken, '--iters', '1', '--workers', '1', '--no-eval',
                           '--out', out], 'CAM_FRONT'),
    }
    procs = {k: subprocess.Popen([sys.executable] + argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for k, (argv, _) in cases.items()}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        lines = [l for l in stderr.splitlines() if l.strip() and not l.startswith('train:')]   # tqdm bar
        assert proc.returncode not in (0, None), name
        assert len(lines) == 1 and lines[0].startswith('error: '), (name, stderr[-2000:])
        assert cases[name][1] in lines[0], (name, lines[0])
        assert 'Traceback' not in stderr, name


def test_bad_flags_in_process(world, tmp_path, capsys):
    for argv, culprit in [(['--set', 'bev_hh=3'], 'bev_hh'), (['--set', 'bev_h'], 'KEY=VALUE'),
                          (['--resume', str(tmp_path / 'gone.pt')], 'gone.pt'),
                          (['--batch-size', '1000'], '--batch-size')]:
        code = run_train(argv + ['--dataroot', world, '--out', str(tmp_path / 'o'), '--workers', '0', '--no-eval'])
        err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
        assert code == 2 and len(err) == 1 and err[0].startswith('error: ') and culprit in err[0], (argv, err)


def test_evaluate_set_flag_errors(tmp_path, capsys):
    """evaluate.py --set: only with --model (a checkpoint keeps its config), and fields are checked."""
    import evaluate
    for argv, culprit in [(['--ckpt', str(tmp_path / 'x.pt'), '--set', 'bev_h=3'], '--model only'),
                          (['--model', 'cpu-tiny', '--speed', '--set', 'bev_hh=3'], 'bev_hh')]:
        with pytest.raises(SystemExit) as e:
            evaluate.main(argv)
        err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith('error: ') and culprit in err[0], (argv, err)


# ------------------------------------------------------------------------------------------------
# Distributed: torchrun with 2 CPU processes (gloo), whole val scenes per rank, rank 0 gathers


def test_torchrun_two_cpu_processes(world, tmp_path):
    out = str(tmp_path / 'ddp')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           os.path.abspath(__file__), '--stand-in', '--dataroot', world, '--iters', '4', '--warmup', '1',
           '--log-every', '1', '--workers', '0', '--out', out]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1].startswith('NDS ')
    ckpt = torch.load(os.path.join(out, 'last.pt'), weights_only=True)
    assert ckpt['iter'] == 4 and len(ckpt['rng']) == 2                  # both ranks' RNG states
    assert not torch.equal(ckpt['rng'][0]['torch'], ckpt['rng'][1]['torch'])
    log = train.read_log(os.path.join(out, 'log.jsonl'))
    assert [r['iter'] for r in log if 'loss' in r] == [1, 2, 3, 4]
    ds = data.NuScenesDataset(world, split='val')
    with open(os.path.join(out, 'results_nusc.json')) as f:
        assert set(json.load(f)['results']) == set(ds.sample_tokens)   # every val sample, from both ranks


# ------------------------------------------------------------------------------------------------
# Slow: the same properties with the real cpu-tiny, through the command line


@pytest.mark.slow
def test_real_ctrl_c_and_resume_are_bit_identical_cpu_tiny(world, tmp_path):
    import time
    common = [sys.executable, 'train.py', '--dataroot', world, '--iters', '8', '--warmup', '2', '--log-every', '1',
              '--no-eval', '--threads', '1', '--seed', '5'] + SMALLER
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    r = subprocess.run(common + ['--out', a, '--workers', '0'], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    proc = subprocess.Popen(common + ['--out', b, '--workers', '2'], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log = os.path.join(b, 'log.jsonl')
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None:     # Ctrl-C once two iterations are logged
        if os.path.exists(log) and len(train.read_log(log)) >= 2:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.2)
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 130 and 'interrupted: saved' in stdout, stderr[-2000:]
    assert 2 <= torch.load(os.path.join(b, 'last.pt'), weights_only=True)['iter'] < 8
    r = subprocess.run([sys.executable, 'train.py', '--resume', os.path.join(b, 'last.pt')], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    wa, wb = _weights(os.path.join(a, 'last.pt')), _weights(os.path.join(b, 'last.pt'))
    assert wb['iter'] == 8
    assert all(torch.equal(wa['model'][k], wb['model'][k]) for k in wa['model'])


@pytest.mark.slow
def test_torchrun_two_cpu_processes_cpu_tiny(world, tmp_path):
    out = str(tmp_path / 'ddp')
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        'train.py', '--dataroot', world, '--iters', '3', '--warmup', '1', '--log-every', '1',
                        '--workers', '0', '--out', out] + SMALLER, cwd=ROOT, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1].startswith('NDS ')
    assert torch.load(os.path.join(out, 'last.pt'), weights_only=True)['iter'] == 3


@pytest.mark.slow
def test_default_run_learns(tmp_path):
    """The default run end to end: `python train.py` with its defaults (the temporal cpu-tiny on the
    default world, evaluated on its val split as scene chains) ends at or above the lowest of the runs in
    docs/experiments.md ("Seeds": ten runs, five with the deformable attention's PyTorch fallback and five
    with its CPU kernel, NDS 0.357-0.412, mAP 0.241-0.294) less a margin: NDS >= 0.34 and mAP >= 0.22.
    (Issue 18's bar, NDS >= 0.40 and mAP >= 0.25 in every run, is not met yet: three of the ten runs reach
    NDS 0.40.) 22-34 min on 2 cores."""
    root, out = str(tmp_path / 'world'), str(tmp_path / 'run')
    data.write_synthetic_world(root, progress=False)           # data.DEFAULT_WORLD, as train.py writes it
    r = subprocess.run([sys.executable, 'train.py', '--dataroot', root, '--out', out], cwd=ROOT,
                       capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    last = r.stdout.strip().splitlines()[-1].split()           # 'NDS 0.xxxx mAP 0.xxxx'
    assert last[0] == 'NDS' and last[2] == 'mAP', last
    nds, m_ap = float(last[1]), float(last[3])
    with open(os.path.join(out, 'metrics_summary.json')) as f:     # the devkit's own file agrees
        summary = json.load(f)
    assert abs(summary['nd_score'] - nds) < 1e-4
    assert nds >= 0.34 and m_ap >= 0.22, (nds, m_ap, summary['tp_errors'])


if __name__ == '__main__' and '--stand-in' in sys.argv:
    # torchrun entry of test_torchrun_two_cpu_processes: train.py's main with the stand-in detector
    sys.argv.remove('--stand-in')
    models.preset_config = lambda name, flag='--model': StandInConfig()
    models.config_from_dict = lambda d, what='': StandInConfig(**d)
    models.build_model = StandIn
    train.main()


@pytest.mark.parametrize('preset,extra,history', [
    ('cpu-tiny', [], 'previous BEV in the state'),                  # the default preset is temporal
    ('cpu-tiny-single', [], 'single frame (no temporal state)'),
    ('cpu-tiny', ['--set', 'queue_length=1'], 'single frame (no temporal state)'),
    ('cpu-tiny-stream', [], 'previous BEV in the state'),
    ('detr3d-cpu-tiny', [], 'single frame (no temporal state)')])
def test_speed_prints_the_protocol_and_the_figures(preset, extra, history, capsys):
    """evaluate.py --speed: the protocol line names the preset, batch, input size, precision and the
    temporal state the detector really has; the figures line has latency, FPS, parameters and GFLOPs."""
    import evaluate
    res = evaluate.main(['--model', preset, '--speed', '--device', 'cpu'] + extra)
    lines = capsys.readouterr().out.strip().splitlines()
    protocol, figures = lines[-2], lines[-1]
    assert protocol.startswith(f'protocol: {preset}, model.predict, batch 1, 6 cameras, input tensor 224x128 '
                               f'(content 200x113), fp32') and history in protocol, protocol
    assert 'data loading and resizing excluded' in protocol
    fields = figures.split()
    assert fields[0] == 'latency' and fields[3] == 'FPS' and fields[5] == 'parameters' and fields[8] == 'GFLOPs'
    assert float(fields[1]) > 0 and float(fields[6]) > 0.1 and float(fields[9]) > 0.1
    assert res is None   # main() prints; the figures are in run()'s return value


def test_evaluate_loads_the_split_as_the_checkpoints_preset_does(world, tmp_path):
    # tests/data/bevformer_bf44445.pt: cpu-tiny shrunk, image_size (64, 36), image_loading 'fast'; the
    # world's images are 200x113, so the 'official' resize (no antialiasing) would give other pixels
    ckpt = os.path.join(ROOT, 'tests', 'data', 'bevformer_bf44445.pt')
    model, cfg, _ = models.model_from_checkpoint(ckpt)
    assert cfg.image_loading == 'fast' and tuple(cfg.image_size) == (64, 36)
    out = str(tmp_path / 'eval')
    evaluate.main(['--ckpt', ckpt, '--dataroot', world, '--version', 'v1.0-mini', '--out', out,
                   '--workers', '0', '--device', 'cpu'])
    with open(os.path.join(out, 'results_nusc.json')) as f:
        got = json.load(f)['results']
    ds = data.NuScenesDataset(world, version='v1.0-mini', split='val', train=False,
                              view=data.view_of(cfg, queue_length=1))
    assert evaluate.eval_dataset(world, 'v1.0-mini', 'val', cfg).view == ds.view
    want = evaluate.to_submission(ds.nusc, evaluate.predict_split(model, ds, torch.device('cpu'), progress=False),
                                  ds.sample_tokens)['results']
    assert sorted(got) == sorted(want)
    for token in want:
        a = sorted((d['detection_name'], d['translation']) for d in got[token])
        b = sorted((d['detection_name'], d['translation']) for d in want[token])
        assert len(a) == len(b) and all(x[0] == y[0] and np.allclose(x[1], y[1], atol=1e-4) for x, y in zip(a, b))


def test_attention_picture_cameras_agree_with_the_projection(world, tmp_path):
    import bevformer
    ckpt = os.path.join(ROOT, 'tests', 'data', 'bevformer_bf44445.pt')      # temporal (queue 2), tiny
    model, cfg, _ = models.model_from_checkpoint(ckpt)
    model.eval()
    ds = evaluate.eval_dataset(world, 'v1.0-mini', 'val', cfg)
    path = str(tmp_path / 'a.png')
    hits = evaluate.vis_attention(model, ds, 2, path)
    assert os.path.getsize(path) > 10_000 and len(hits) > 0
    _, rec = evaluate.record_attention(model, ds[2], evaluate.record_attention(model, ds[1], None)[0]['state'])
    assert rec['has_prev']                                                   # TSA saw the previous BEV
    item = ds[2]
    img, l2i = item['img'][None].float(), item['lidar2img'][None].float()
    uv, mask = bevformer.project_points(bevformer.pillar_points(cfg, 'cpu'), l2i, img.shape[-2:])  # [N, 1, Q, Z]
    for q, cams in hits.items():
        assert cams == [n for n in range(mask.shape[0]) if bool(mask[n, 0, q].any())]
    assert any(hits.values())                                                # some cell is seen by a camera


# ------------------------------------------------------------------------------------------------
# history_draw 'stream': the order that walks whole scenes, the carried-over BEV, exact resume


def _train_split(world):
    return data.NuScenesDataset(world, split='train', train=True)


@pytest.mark.parametrize('lanes,world_size,batch', [(4, 1, 1), (2, 2, 1), (1, 1, 2)])
def test_stream_order_walks_each_scene_frame_by_frame(world, lanes, world_size, batch):
    """Each lane runs whole scenes in time order, one frame per visit; iteration it uses lane it % lanes,
    so two iterations in a row come from different lanes; the lanes of all processes share out each
    epoch's scenes before the next epoch begins; a run started at iteration k sees the rest."""
    ds = _train_split(world)
    total = 40
    orders = [train.StreamOrder(ds, batch, r, world_size, 3, 0, total, lanes) for r in range(world_size)]
    visits = {}                                              # global lane -> dataset indices in visit order
    for r, order in enumerate(orders):
        for it, picks in enumerate(order):
            assert len(picks) == batch
            for j, (index, _) in enumerate(picks):
                visits.setdefault(order.lane_of(it, j), []).append(index)
            if lanes > 1 and it:
                assert order.lane_of(it, 0) != order.lane_of(it - 1, 0)
    assert len(visits) == world_size * batch * lanes
    starts = set(ds.scene_start)
    for lane, seq in visits.items():
        for a, b in zip(seq, seq[1:]):                       # the next frame of the scene, or a scene's first
            assert b == a + 1 and ds.scene_index[b] == ds.scene_index[a] or b in starts, (lane, seq)
    # epoch 0's scenes go to the first lanes, each once, before epoch 1's
    first_scenes = [ds.scene_index[visits[lane][0]] for lane in sorted(visits)]
    n = min(len(ds.scenes), len(visits))
    assert len(set(first_scenes[:n])) == n
    # resumable: what iteration it sees depends on (seed, it) only
    full = list(train.StreamOrder(ds, batch, 0, world_size, 3, 0, total, lanes))
    assert list(train.StreamOrder(ds, batch, 0, world_size, 3, 13, total, lanes)) == full[13:]
    # ...and the seed matters
    assert list(train.StreamOrder(ds, batch, 0, world_size, 4, 0, total, lanes)) != full


def test_stream_warmup_starts_shuffled_then_streams(world):
    """stream_warmup: the first iterations are TrainOrder's shuffled ones and carry no previous BEV (nor
    leave one for the lanes); then the lanes walk whole scenes from their first frames; a run started
    anywhere (inside the warm-up, at its end, in the stream) sees the rest."""
    ds = _train_split(world)
    total, warmup, lanes = 30, 5, 2
    order = train.StreamOrder(ds, 1, 0, 1, 3, 0, total, lanes, warmup=warmup)
    full = list(order)
    assert len(full) == total
    assert full[:warmup] == list(train.TrainOrder(ds, 1, 0, 1, 3, 0, warmup))
    # after the warm-up: exactly the stream of a run without one, shifted by `warmup` iterations
    assert ([p[0][0] for p in full[warmup:]]
            == [p[0][0] for p in train.StreamOrder(ds, 1, 0, 1, 3, 0, total - warmup, lanes)])
    assert all(full[warmup + s][0][0] in ds.scene_start for s in range(lanes))   # each lane starts a scene
    assert order.lane_of(warmup, 0) != order.lane_of(warmup + 1, 0)
    for start in (3, warmup, 12):
        assert list(train.StreamOrder(ds, 1, 0, 1, 3, start, total, lanes, warmup=warmup)) == full[start:]
    # during the warm-up every frame is predicted as a scene's first, and nothing is kept for the lanes
    stream = train.BEVStream(torch.nn.Linear(1, 1), order)
    batch = data.collate([ds[full[1][0][0]]])
    stream.latest = torch.zeros(1, 4, 8)
    stream.attach(batch, 1)
    assert batch['prev_bev'] is None and not batch['has_prev'].any()
    stream.keep(batch, 1)
    assert stream.memory == {}
    stream.latest = torch.zeros(1, 4, 8)
    stream.keep(batch, warmup)                               # from the warm-up's end on, the lanes keep
    assert list(stream.memory) == [order.lane_of(warmup, 0)]


def test_stream_dataset_loads_no_history_and_keeps_every_sample(world):
    view = data.View(image_size=(64, 36), queue_length=2, history_draw='stream')
    ds = data.NuScenesDataset(world, split='train', train=True, view=view)
    for i in range(len(ds)):
        item = ds[i]
        assert item['index'] == i and item['history'] == []


def _stream_run(world, out, extra=()):
    return ['--model', 'cpu-tiny-stream', '--set', 'stream_lanes=2',
            '--dataroot', world, '--warmup', '2', '--log-every', '1', '--no-eval', '--threads', '1', '--seed', '5',
            '--out', out] + SMALLER + list(extra)


def test_stream_carries_the_previous_frames_bev_and_resumes_exactly(world, tmp_path, monkeypatch):
    """A streamed run hands each frame the BEV its scene's previous frame got (has_prev exactly when the
    lane's last frame is the one just before), trains no history frame, and an interrupted and resumed
    run ends bit-identical to an uninterrupted one (the lanes' BEVs are in the checkpoint)."""
    seen = []                                                # (index, has_prev, prev_bev) of each training forward
    bevs = {}                                                # index -> the BEV its training forward made
    plain_build = models.build_model

    def build(cfg, sigint_at=None):
        model = plain_build(cfg)
        calls = [0]

        def before(module, args):
            batch = args[0]
            if module.training:
                calls[0] += 1
                if calls[0] == sigint_at:
                    os.kill(os.getpid(), signal.SIGINT)
                assert 'history' not in batch or not batch['history_valid'].any()
                prev = batch['prev_bev']
                seen.append((int(batch['index'][0]), bool(batch['has_prev'][0]),
                             None if prev is None else prev[0].clone()))

        def after(module, args, out):
            if module.training:
                bevs[int(args[0]['index'][0])] = out['bev_seq'][0].detach().clone()
        model.register_forward_pre_hook(before)
        model.register_forward_hook(after)
        return model

    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    monkeypatch.setattr(models, 'build_model', build)
    assert run_train(_stream_run(world, a, ['--iters', '8', '--workers', '0'])) == 0
    ds = _train_split(world)
    assert sum(h for _, h, _ in seen) >= 4                    # 4-frame scenes in 2 lanes: most frames have one
    for index, has_prev, prev in seen:
        first = index in ds.scene_start
        assert has_prev == (not first and index - 1 in bevs), index
        if has_prev:
            assert torch.equal(prev, bevs[index - 1])          # exactly the BEV of the frame before
    # interrupted during iteration 3, resumed
    monkeypatch.setattr(models, 'build_model', lambda cfg: build(cfg, sigint_at=3))
    assert run_train(_stream_run(world, b, ['--iters', '8', '--workers', '0'])) == 130
    ckpt = _weights(os.path.join(b, 'last.pt'))
    assert ckpt['iter'] == 3 and len(ckpt['stream'][0]) == 2  # both lanes' last BEVs
    monkeypatch.setattr(models, 'build_model', build)
    assert run_train(['--resume', os.path.join(b, 'last.pt'), '--workers', '2']) == 0
    wa, wb = _weights(os.path.join(a, 'last.pt')), _weights(os.path.join(b, 'last.pt'))
    assert wb['iter'] == 8
    assert all(torch.equal(wa['model'][k], wb['model'][k]) for k in wa['model'])
    # an expert trained so cannot teach yet: one line naming the flag
    with pytest.raises(train.InputError, match='--teacher .*stream'):
        train.train(train.get_args(['--teacher', os.path.join(a, 'last.pt'), '--student', 'cpu-tiny',
                                    '--dataroot', world, '--iters', '1', '--out', str(tmp_path / 'c')])[0])
