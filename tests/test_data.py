"""data.py and synthetic.py: geometry against nuscenes-devkit, ground truth through DetectionEval,
determinism, the temporal history, batching and bad input. One small world per session (fixtures.py)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from pyquaternion import Quaternion

import data
from evaluate import eval_set_name
from fixtures import ROOT, small_world
from nuscenes.eval.common.utils import quaternion_yaw
from nuscenes.eval.detection.utils import category_to_detection_name
from nuscenes.utils.data_classes import Box
from nuscenes.utils.geometry_utils import BoxVisibility, view_points

SIZE = (160, 96)   # != the world's 200x113: exercises the anisotropic resize in lidar2img


@pytest.fixture(scope='session')
def world(tmp_path_factory):
    return small_world(tmp_path_factory.mktemp('small_world'))


@pytest.fixture(scope='session')
def val(world):
    return data.NuScenesDataset(world, 'v1.0-mini', 'val', image_size=SIZE, queue_length=3)


def lidar_box_to_global(nusc, sample_token, row):
    """A contract row [x, y, z, w, l, h, yaw, vx, vy] (LIDAR_TOP frame) as a devkit Box in the global frame,
    moved with the devkit's own Box.rotate / translate."""
    sample = nusc.get('sample', sample_token)
    sd = nusc.get('sample_data', sample['data']['LIDAR_TOP'])
    cs = nusc.get('calibrated_sensor', sd['calibrated_sensor_token'])
    pose = nusc.get('ego_pose', sd['ego_pose_token'])
    x, y, z, w, l, h, yaw, vx, vy = [float(v) for v in row]
    box = Box([x, y, z], [w, l, h], Quaternion(axis=[0, 0, 1], angle=yaw), velocity=(vx, vy, 0.0))
    box.rotate(Quaternion(cs['rotation']))
    box.translate(np.array(cs['translation']))
    box.rotate(Quaternion(pose['rotation']))
    box.translate(np.array(pose['translation']))
    return box, pose


def test_item_layout_and_collate(val):
    item = val[1]
    H, W = item['img_shape']
    assert (W, H) == SIZE
    assert item['img'].shape == (6, 3, 96, 160) and item['img'].dtype == torch.float32   # 96, 160: x32 already
    assert 0 <= item['img'].min() and item['img'].max() <= 255 and item['img'].max() > 100
    assert item['lidar2img'].shape == (6, 4, 4) and item['can_bus'].shape == (18,)
    assert item['gt_boxes'].shape[1] == 9 and item['gt_labels'].dtype == torch.int64
    assert len(item['gt_boxes']) == len(item['gt_labels']) == len(item['gt_tokens']) > 5
    assert set(item['gt_labels'].tolist()) <= set(range(10))
    # GT filter: strictly inside +-51.2 m, every kept box has lidar points
    assert item['gt_boxes'][:, :2].abs().max() < 51.2
    for t in item['gt_tokens']:
        ann = val.nusc.get('sample_annotation', t)
        assert ann['num_lidar_pts'] + ann['num_radar_pts'] > 0
    batch = data.collate([val[0], val[2]])
    assert batch['img'].shape == (2, 6, 3, 96, 160) and batch['img_shape'] == (96, 160)
    assert batch['history']['img'].shape == (2, 2, 6, 3, 96, 160)
    assert batch['history']['lidar2img'].shape == (2, 2, 6, 4, 4) and batch['history']['can_bus'].shape == (2, 2, 18)
    # sample 0 has no history, sample 2 has two frames; history is right-aligned, padding is zero
    assert batch['history_valid'].tolist() == [[False, False], [True, True]]
    assert batch['history']['img'][0].abs().sum() == 0 and batch['history']['img'][1].abs().sum() > 0
    assert isinstance(batch['gt_boxes'], list) and batch['timestamp'].dtype == torch.int64
    moved = data.to_device(batch, 'cpu')
    assert moved.keys() == batch.keys() and torch.equal(moved['history']['img'], batch['history']['img'])


def test_padding_to_32(world):
    ds = data.NuScenesDataset(world, 'v1.0-mini', 'val', image_size=(200, 113))
    item = ds[0]
    assert item['img_shape'] == (113, 200) and item['img'].shape[-2:] == (128, 224)
    assert item['img'][:, :, 113:].abs().sum() == 0 and item['img'][:, :, :, 200:].abs().sum() == 0


def test_lidar2img_matches_devkit_projection(val):
    """Every GT centre projected with the item's lidar2img lands where the devkit projects it: the boxes of
    get_sample_data(camera) with the camera intrinsic, scaled to the resized image (0.5 px)."""
    checked = 0
    for i in range(len(val)):
        item = val[i]
        sample = val.nusc.get('sample', item['sample_token'])
        by_token = dict(zip(item['gt_tokens'], item['gt_boxes'][:, :3].double()))
        for n, cam in enumerate(data.CAMERAS):
            sd = val.nusc.get('sample_data', sample['data'][cam])
            sx, sy = SIZE[0] / sd['width'], SIZE[1] / sd['height']
            _, boxes, K = val.nusc.get_sample_data(sd['token'], box_vis_level=BoxVisibility.NONE)
            M = item['lidar2img'][n].double()
            for box in boxes:
                if box.token not in by_token or box.center[2] < 1.0:
                    continue
                ref = view_points(box.center[:, None], K, normalize=True)[:2, 0] * [sx, sy]
                p = M @ torch.cat([by_token[box.token], torch.ones(1, dtype=torch.float64)])
                uv = (p[:2] / p[2]).numpy()
                assert abs(p[2].item() - box.center[2]) < 1e-3                  # depth is the camera z
                if -50 < ref[0] < SIZE[0] + 50 and -50 < ref[1] < SIZE[1] + 50:
                    assert np.abs(uv - ref).max() < 0.5, (cam, box.token, uv, ref)
                    checked += 1
    assert checked > 50


def test_boxes_back_to_global_match_annotations(val):
    """Item rows -> devkit Box in the lidar frame -> global with the devkit's transforms equals the
    sample_annotation translation, size, yaw and box_velocity (1e-3)."""
    nusc, checked, moving = val.nusc, 0, 0
    for i in range(len(val)):
        item = val[i]
        for row, tok, label in zip(item['gt_boxes'].double(), item['gt_tokens'], item['gt_labels']):
            ann = nusc.get('sample_annotation', tok)
            box, _ = lidar_box_to_global(nusc, item['sample_token'], row)
            assert np.allclose(box.center, ann['translation'], atol=1e-3)
            assert np.allclose(box.wlh, ann['size'], atol=1e-3)
            dyaw = quaternion_yaw(box.orientation) - quaternion_yaw(Quaternion(ann['rotation']))
            assert abs((dyaw + np.pi) % (2 * np.pi) - np.pi) < 1e-3
            v = nusc.box_velocity(tok)[:2]
            assert np.allclose(box.velocity[:2], np.nan_to_num(v), atol=1e-3)
            assert category_to_detection_name(ann['category_name']) == data.CLASSES[label]
            checked += 1
            moving += np.hypot(*v) > 1.0
    assert checked > 50 and moving > 5


# -- ground truth through DetectionEval --------------------------------------------------------------------

CLASS_RANGE = {'car': 50, 'truck': 50, 'bus': 50, 'trailer': 50, 'construction_vehicle': 50, 'pedestrian': 40,
               'motorcycle': 40, 'bicycle': 40, 'traffic_cone': 30, 'barrier': 30}


def attribute_rule(name, speed):
    """BEVFormer's test-time attribute (mmdet3d's `NuScenesDataset._format_bbox`)."""
    if speed > 0.2:
        if name in ('car', 'construction_vehicle', 'bus', 'truck', 'trailer'):
            return 'vehicle.moving'
        if name in ('bicycle', 'motorcycle'):
            return 'cycle.with_rider'
    else:
        if name == 'pedestrian':
            return 'pedestrian.standing'
        if name == 'bus':
            return 'vehicle.stopped'
    return {'car': 'vehicle.parked', 'truck': 'vehicle.parked', 'trailer': 'vehicle.parked',
            'construction_vehicle': 'vehicle.parked', 'pedestrian': 'pedestrian.moving', 'bus': 'vehicle.moving',
            'bicycle': 'cycle.without_rider', 'motorcycle': 'cycle.without_rider'}.get(name, '')


def submission(ds, shift=0.0, seed=0):
    """A minimal GT -> nuScenes submission (the production one is evaluate.py's): every item box, score 1,
    moved to global with the devkit, optionally shifted by `shift` metres in a random direction."""
    rng = np.random.default_rng(seed)
    results = {}
    for i in range(len(ds)):
        item = ds[i]
        dets = []
        for row, label in zip(item['gt_boxes'].double(), item['gt_labels']):
            row = row.clone()
            a = rng.uniform(0, 2 * np.pi)
            row[0] += shift * np.cos(a)
            row[1] += shift * np.sin(a)
            box, pose = lidar_box_to_global(ds.nusc, item['sample_token'], row)
            name = data.CLASSES[label]
            if np.hypot(*(box.center[:2] - pose['translation'][:2])) > CLASS_RANGE[name]:
                continue                     # (the devkit filters these anyway)
            dets.append({'sample_token': item['sample_token'], 'translation': box.center.tolist(),
                         'size': box.wlh.tolist(), 'rotation': box.orientation.elements.tolist(),
                         'velocity': box.velocity[:2].tolist(), 'detection_name': name, 'detection_score': 1.0,
                         'attribute_name': attribute_rule(name, float(np.hypot(*box.velocity[:2])))})
        results[item['sample_token']] = dets
    return {'meta': {'use_camera': True, 'use_lidar': False, 'use_radar': False, 'use_map': False,
                     'use_external': False}, 'results': results}


def evaluate(ds, sub, out):
    from nuscenes.eval.common.config import config_factory
    from nuscenes.eval.detection.evaluate import DetectionEval
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, 'results.json')
    with open(path, 'w') as f:
        json.dump(sub, f)
    ev = DetectionEval(ds.nusc, config_factory('detection_cvpr_2019'), path, eval_set_name(ds.version, ds.split),
                       out, verbose=False)
    metrics, _ = ev.evaluate()
    return metrics


def test_ground_truth_scores_one_and_shifted_less(val, tmp_path):
    # the split holds all 10 classes within their evaluation ranges (else mAP < 1 for perfect predictions)
    assert len(val.sample_tokens) == 4
    m = evaluate(val, submission(val), str(tmp_path / 'gt'))
    assert m.mean_ap >= 0.99 and m.nd_score >= 0.99, (m.mean_ap, m.nd_score, m.tp_errors)
    m2 = evaluate(val, submission(val, shift=0.5), str(tmp_path / 'shifted'))
    assert m2.nd_score < 0.93 and m2.mean_ap < 0.9, (m2.mean_ap, m2.nd_score)
    assert abs(m2.tp_errors['trans_err'] - 0.5) < 0.01


# -- synthetic world ---------------------------------------------------------------------------------------

def test_synthetic_world_is_deterministic(tmp_path):
    kw = dict(version='v1.0-mini', train_scenes=2, val_scenes=0, samples_per_scene=2, image_scale=0.05, progress=False)
    a, b, c = (str(tmp_path / n) for n in 'abc')
    data.write_synthetic_world(a, seed=3, workers=0, **kw)
    data.write_synthetic_world(b, seed=3, workers=2, **kw)          # processes do not change a byte
    data.write_synthetic_world(c, seed=4, workers=0, **kw)
    with pytest.raises(data.InputError, match='no scene of split val'):
        data.NuScenesDataset(a, 'v1.0-mini', 'val')                # this world has train scenes only
    tables = sorted(os.listdir(os.path.join(a, 'v1.0-mini')))
    assert len(tables) == 13
    for t in tables:
        ta, tb = (open(os.path.join(r, 'v1.0-mini', t), 'rb').read() for r in (a, b))
        assert ta == tb, t
    assert open(os.path.join(a, 'v1.0-mini', 'sample_annotation.json'), 'rb').read() != \
        open(os.path.join(c, 'v1.0-mini', 'sample_annotation.json'), 'rb').read()
    for sub in ('samples/CAM_FRONT', 'samples/LIDAR_TOP'):
        fa = sorted(os.listdir(os.path.join(a, sub)))
        assert fa == sorted(os.listdir(os.path.join(b, sub))) and fa
        assert open(os.path.join(a, sub, fa[0]), 'rb').read() == open(os.path.join(b, sub, fa[0]), 'rb').read()


def test_synthetic_world_content(val):
    """Motion, attributes and points: static objects at exactly 0, moving ones > 0.2 m/s with the
    attribute of the velocity rule, the ego moves and turns, lidar points inside kept boxes."""
    nusc = val.nusc
    static = moving = 0
    for ann in nusc.sample_annotation:
        v = nusc.box_velocity(ann['token'])[:2]
        name = category_to_detection_name(ann['category_name'])
        speed = float(np.hypot(*v))
        assert speed == 0.0 or speed > 0.5
        static += speed == 0.0
        moving += speed > 0
        attr = [nusc.get('attribute', a)['name'] for a in ann['attribute_tokens']]
        assert attr == ([attribute_rule(name, speed)] if attribute_rule(name, speed) else [])
        assert ann['visibility_token'] in '1234'
    assert static > 50 and moving > 50
    first, last = val[0]['can_bus'], val[len(val) - 1]['can_bus']
    assert torch.norm(first[:2] - last[:2]) > 5.0                     # the ego drives
    assert 0 <= first[16] < 2 * np.pi and abs(np.rad2deg(first[16].item()) - first[17].item()) < 1e-3
    assert first[13] > 1.0 and abs(first[14]) < 0.3                    # forward velocity in the ego frame
    # every scene has all 10 classes with lidar points within their evaluation ranges
    for scene in nusc.scene:
        found, tok = set(), scene['first_sample_token']
        while tok:
            sample = nusc.get('sample', tok)
            ego = nusc.get('ego_pose', nusc.get('sample_data', sample['data']['LIDAR_TOP'])['ego_pose_token'])
            for a in sample['anns']:
                ann = nusc.get('sample_annotation', a)
                name = category_to_detection_name(ann['category_name'])
                dist = np.hypot(*(np.array(ann['translation'][:2]) - ego['translation'][:2]))
                if ann['num_lidar_pts'] > 0 and dist < CLASS_RANGE[name]:
                    found.add(name)
            tok = sample['next']
        assert found == set(data.CLASSES), (scene['name'], set(data.CLASSES) - found)
    # every sample has a LIDAR_TOP file the devkit reads
    from nuscenes.utils.data_classes import LidarPointCloud
    pc = LidarPointCloud.from_file(nusc.get_sample_data_path(nusc.sample[0]['data']['LIDAR_TOP']))
    assert pc.points.shape[0] == 4 and pc.points.shape[1] > 1000


def test_no_two_objects_overlap(val):
    """Physical plausibility: no two annotated boxes of a sample overlap in the ground plane (within 68 m
    of the ego, where the world is built for)."""
    from shapely.geometry import Polygon
    nusc = val.nusc
    pairs = 0
    for sample in nusc.sample:
        ego = nusc.get('ego_pose', nusc.get('sample_data', sample['data']['LIDAR_TOP'])['ego_pose_token'])
        boxes = [nusc.get_box(a) for a in sample['anns']]
        boxes = [b for b in boxes if np.hypot(*(b.center[:2] - ego['translation'][:2])) < 68]
        centres = np.array([b.center[:2] for b in boxes])
        radius = np.array([np.hypot(b.wlh[0], b.wlh[1]) / 2 for b in boxes])
        close = np.hypot(*(centres[:, None] - centres[None]).transpose(2, 0, 1)) < radius[:, None] + radius[None]
        polys = [Polygon(b.bottom_corners()[:2].T) for b in boxes]
        for i, j in zip(*np.nonzero(np.triu(close, 1))):
            pairs += 1
            assert polys[i].intersection(polys[j]).area < 1e-3, (boxes[i], boxes[j])
    assert pairs > 0


def test_can_bus_expansion_is_used_when_present(world, tmp_path):
    """With <dataroot>/can_bus/<scene>_pose.json, can_bus[7:16] are accel, rotation_rate, vel of the first
    pose message after the sample (official converter); 0-6 and 16-17 still come from the ego pose."""
    copy = str(tmp_path / 'with_can')
    shutil.copytree(world, copy)
    os.makedirs(os.path.join(copy, 'can_bus'))
    ds0 = data.NuScenesDataset(world, 'v1.0-mini', 'val', image_size=SIZE)
    sample = ds0.nusc.get('sample', ds0.sample_tokens[1])
    scene = ds0.nusc.get('scene', sample['scene_token'])['name']
    ts = sample['timestamp']
    msgs = [{'utime': ts - 40000 + 10000 * k, 'pos': [0, 0, 0], 'orientation': [1, 0, 0, 0],
             'accel': [k, 0.5, 9.8], 'rotation_rate': [0, 0, 0.1 * k], 'vel': [5 + k, 0, 0]} for k in range(8)]
    with open(os.path.join(copy, 'can_bus', scene + '_pose.json'), 'w') as f:
        json.dump(msgs, f)
    ds = data.NuScenesDataset(copy, 'v1.0-mini', 'val', image_size=SIZE)
    cb, cb0 = ds.can_bus(1), ds0.can_bus(1)
    first_after = msgs[5]                      # utime ts + 10000 is the first > ts
    assert cb[7:16].tolist() == pytest.approx(first_after['accel'] + first_after['rotation_rate'] + first_after['vel'])
    assert torch.equal(cb[:7], cb0[:7]) and torch.equal(cb[16:], cb0[16:])
    assert not torch.allclose(cb[7:16], cb0[7:16])


# -- temporal history ----------------------------------------------------------------------------------------

def test_history_same_scene_and_earlier(world):
    T = 3
    for train in (False, True):
        ds = data.NuScenesDataset(world, 'v1.0-mini', 'train', image_size=SIZE, queue_length=T, train=train)
        assert len(ds.scenes) == 2
        for i in range(len(ds)):
            pos = i - ds.scene_start[ds.scene_index[i]]          # position of i inside its scene
            for _ in range(3 if train else 1):
                h = ds.history_indices(i)
                assert h == sorted(h) and all(ds.scene_index[j] == ds.scene_index[i] for j in h)
                assert all(i - T <= j < i for j in h) and len(set(h)) == len(h)
                if not train:
                    assert h == list(range(i - min(T - 1, pos), i))
                else:
                    assert len(h) >= min(T - 1, pos) - 1
        item = ds[len(ds) - 1]
        assert 1 <= len(item['history']) <= T - 1
        for f in item['history']:
            assert f['scene_token'] == item['scene_token'] and f['timestamp'] < item['timestamp']
            assert f['img'].shape == item['img'].shape
    # history_draw='previous' (the CPU presets): training takes the frames just before, as evaluation
    ds = data.NuScenesDataset(world, 'v1.0-mini', 'train', image_size=SIZE, queue_length=T, train=True,
                              history_draw='previous')
    for i in range(len(ds)):
        pos = i - ds.scene_start[ds.scene_index[i]]
        for _ in range(3):
            h = ds.history_indices(i)
            assert h == list(range(i - min(T - 1, pos), i))
    with pytest.raises(data.InputError, match="history_draw 'next'"):
        data.NuScenesDataset(world, 'v1.0-mini', 'train', history_draw='next')


def test_photometric_flag(world):
    plain = data.NuScenesDataset(world, 'v1.0-mini', 'val', image_size=SIZE)
    aug = data.NuScenesDataset(world, 'v1.0-mini', 'val', image_size=SIZE, train=True, photometric=True)
    torch.manual_seed(0)
    a, p = aug[0], plain[0]
    assert a['img'].shape == p['img'].shape and torch.isfinite(a['img']).all()   # not clipped (official)
    assert not torch.equal(a['img'], p['img'])
    assert torch.equal(a['lidar2img'], p['lidar2img']) and torch.equal(a['gt_boxes'], p['gt_boxes'])


# -- bad input ---------------------------------------------------------------------------------------------

def test_bad_input_messages(world, tmp_path):
    with pytest.raises(data.InputError, match='nowhere.*not found'):
        data.NuScenesDataset(str(tmp_path / 'nowhere'))
    with pytest.raises(data.InputError, match='v1.0-trainval.*not found'):
        data.NuScenesDataset(world, 'v1.0-trainval', 'val')
    with pytest.raises(data.InputError, match='--split test'):
        data.NuScenesDataset(world, 'v1.0-mini', 'test')
    with pytest.raises(data.InputError, match='v1.0-mini has 8 train'):
        data.write_synthetic_world(str(tmp_path / 'w'), 'v1.0-mini', train_scenes=9)
    # a missing image is found when the dataset is built, a corrupt one when it is read
    copy = str(tmp_path / 'copy')
    shutil.copytree(world, copy)
    ds = data.NuScenesDataset(copy, 'v1.0-mini', 'val')
    first = os.path.join(copy, ds.nusc.get('sample_data', ds.nusc.get('sample', ds.sample_tokens[0])['data']
                                           ['CAM_FRONT'])['filename'])
    with open(first, 'wb') as f:
        f.write(b'not a jpeg')
    with pytest.raises(data.InputError, match=os.path.basename(first) + '.*cannot read'):
        ds[0]
    os.remove(first)
    with pytest.raises(data.InputError, match=os.path.basename(first) + '.*missing'):
        data.NuScenesDataset(copy, 'v1.0-mini', 'val')


def test_version_auto_picks_the_folder_present(world, tmp_path):
    """--version auto (the CLIs' default): the version whose tables are in the root, trainval before mini,
    v1.0-test for the test split; an explicit version is kept; nothing usable is a one-line InputError."""
    assert data.resolve_version(world) == 'v1.0-mini' and data.NuScenesDataset(world).version == 'v1.0-mini'
    both = tmp_path / 'both'
    for v in ('v1.0-mini', 'v1.0-trainval', 'v1.0-test'):
        (both / v).mkdir(parents=True)
    assert data.resolve_version(str(both)) == 'v1.0-trainval'
    assert data.resolve_version(str(both), split='test') == 'v1.0-test'
    assert data.resolve_version(str(both), 'v1.0-mini') == 'v1.0-mini'
    with pytest.raises(data.InputError,
                       match=r'--version auto: .* holds no v1.0-test tables \(versions present: v1.0-mini\)'):
        data.resolve_version(world, split='test')
    with pytest.raises(data.InputError, match='--dataroot .*nowhere: folder not found'):
        data.resolve_version(str(tmp_path / 'nowhere'))


def test_cli_error_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'data.py'), 'bench', '--dataroot', str(tmp_path / 'x')],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: --dataroot') and 'x' in lines[0], r.stderr


def test_cli_synth_bench_picture_in_process(world, tmp_path, capsys):
    out = str(tmp_path / 'cli_world')
    assert data.main(['synth', '--out', out, '--train-scenes', '1', '--val-scenes', '0', '--samples-per-scene', '2',
                      '--image-scale', '0.05', '--workers', '0']) == 0
    assert 'wrote %s: 1 scenes, 2 samples' % out in capsys.readouterr().out
    assert data.main(['bench', '--dataroot', world, '--samples', '2', '--warmup', '1']) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [l.split(':')[0] for l in lines[-2:]] == ['workers 0', 'workers 2'] and 'samples/s' in lines[-1]
    png = str(tmp_path / 'cams.png')
    assert data.main(['picture', '--dataroot', world, '--out', png]) == 0
    from PIL import Image
    assert Image.open(png).size == (3 * 200, 2 * 113)
    assert data.main(['synth', '--out', out, '--samples-per-scene', '1']) == 2
    assert capsys.readouterr().err.startswith('error: --samples-per-scene 1')


@pytest.mark.slow
def test_devkit_utilities_on_synthetic_world(world, tmp_path):
    """The devkit's own rendering (camera with boxes, LIDAR_TOP with the map underlay) and multi-sweep
    loading work on the synthetic world."""
    import matplotlib
    matplotlib.use('Agg')
    from nuscenes.nuscenes import NuScenes
    from nuscenes.utils.data_classes import LidarPointCloud
    nusc = NuScenes('v1.0-mini', world, verbose=False)
    sample = nusc.sample[2]
    nusc.render_sample_data(sample['data']['CAM_FRONT'], out_path=str(tmp_path / 'cam.png'), verbose=False)
    nusc.render_sample_data(sample['data']['LIDAR_TOP'], underlay_map=True, nsweeps=2,
                            out_path=str(tmp_path / 'lidar.png'), verbose=False)
    assert os.path.getsize(tmp_path / 'cam.png') > 10000 and os.path.getsize(tmp_path / 'lidar.png') > 10000
    pc, _ = LidarPointCloud.from_file_multisweep(nusc, sample, 'LIDAR_TOP', 'LIDAR_TOP', nsweeps=2)
    assert pc.points.shape[1] > 2000


def test_trainval_names(tmp_path):
    """--version v1.0-trainval writes official trainval scene names; the loader maps train/val to them."""
    from nuscenes.utils.splits import create_splits_scenes
    root = str(tmp_path / 'tv')
    data.write_synthetic_world(root, 'v1.0-trainval', train_scenes=1, val_scenes=1, samples_per_scene=2,
                               image_scale=0.05, progress=False)
    splits = create_splits_scenes()
    for split in ('train', 'val'):
        ds = data.NuScenesDataset(root, 'v1.0-trainval', split)
        assert [s['name'] for s in ds.scenes] == [splits[split][0]] and len(ds) == 2
        assert ds[1]['img'].shape[-2:] == (64, 96)            # 80x45 padded to x32
    with pytest.raises(data.InputError, match='v1.0-trainval has 700 train and 150 val'):
        data.write_synthetic_world(root, 'v1.0-trainval', train_scenes=701, val_scenes=0)


@pytest.mark.slow
def test_default_world_ground_truth_scores_one(tmp_path_factory):
    """The default world (data.DEFAULT_WORLD: 100 + 15 trainval scenes x 12 samples, 200x113): every scene
    holds all 10 classes and its ground truth through the prediction path scores mAP = NDS = 1 on val."""
    root = str(tmp_path_factory.mktemp('default_world'))
    data.write_synthetic_world(root, progress=False)
    ds = data.NuScenesDataset(root, split='val', image_size=(200, 113))
    w = data.DEFAULT_WORLD
    assert ds.version == w['version'] == 'v1.0-trainval'
    assert len(ds) == w['val_scenes'] * w['samples_per_scene']
    assert len(ds.nusc.scene) == w['train_scenes'] + w['val_scenes']
    m = evaluate(ds, submission(ds), str(tmp_path_factory.mktemp('default_eval')))
    assert m.mean_ap >= 0.99 and m.nd_score >= 0.99, (m.mean_ap, m.nd_score, m.tp_errors)
    test_no_two_objects_overlap(ds)


def test_load_image_keeps_resize_geometry(tmp_path):
    """The fast path (CPU presets) uses the JPEG draft decode only for exact 1/k sizes: the result matches
    the full decode with the same antialiased resize (exactly for 225 rows -> 113, closely for 450 ->
    225 decoded at 1/2)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 255, (225, 400, 3), dtype=np.uint8)).resize((400, 225))
    from scipy.ndimage import gaussian_filter
    smooth = gaussian_filter(rng.uniform(0, 255, (450, 800, 3)), (6, 6, 0))
    big = Image.fromarray(np.clip((smooth - smooth.mean()) * 8 + 128, 0, 255).astype(np.uint8))
    for im, size, tol in ((small, (200, 113), 0.0), (big, (400, 225), 1.5)):
        path = str(tmp_path / ('%dx%d.jpg' % im.size))
        im.save(path, quality=90)
        out, native = data.load_image(path, size, 'fast')
        full = torch.from_numpy(np.asarray(Image.open(path).convert('RGB'), np.float32)).permute(2, 0, 1)
        ref = data.resize_images(full, size, antialias=True).permute(1, 2, 0).numpy()
        assert native == im.size and out.shape == (size[1], size[0], 3)
        assert np.abs(out - ref).mean() <= tol
        if tol:                                  # a half-pixel shift would be far larger
            assert np.abs(out[:, 1:] - ref[:, :-1]).mean() > 3 * tol


def naive_bilinear(img, size):
    """cv2.INTER_LINEAR / mmcv.imresize on a float image, written out: output pixel (x, y) reads the
    input at ((x + 0.5) * sx - 0.5, (y + 0.5) * sy - 0.5), clamped to the image, mixing its two
    neighbours per axis (no antialiasing)."""
    H, W = img.shape[:2]
    w, h = size
    def taps(n_out, n_in):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0
    y0, y1, fy = taps(h, H)
    x0, x1, fx = taps(w, W)
    img = img.astype(np.float64)
    rows = img[y0] * (1 - fy)[:, None, None] + img[y1] * fy[:, None, None]
    return rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]


def test_official_loading_is_full_decode_and_bilinear_without_antialias(tmp_path):
    """The official presets' path: the whole file decoded, then mmcv's bilinear resize (no antialias),
    checked against the naive resize above; the fast path's antialiased resize differs measurably."""
    from PIL import Image
    rng = np.random.default_rng(1)
    im = Image.fromarray(rng.integers(0, 255, (225, 400, 3), dtype=np.uint8))
    path = str(tmp_path / 'cam.png')                  # lossless: the decode itself is exact
    im.save(path)
    raw = np.asarray(im, np.float32)
    for size in ((200, 112), (160, 90), (640, 360)):
        out, native = data.load_image(path, size, 'official')
        assert native == (400, 225) and out.shape == (size[1], size[0], 3)
        np.testing.assert_allclose(out, naive_bilinear(raw, size), atol=5e-3)   # float32 rounding
    fast, _ = data.load_image(path, (200, 112), 'fast')
    assert np.abs(fast - naive_bilinear(raw, (200, 112))).mean() > 1.0


def test_hsv_conversion_matches_colorsys_and_round_trips():
    import colorsys
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (200, 3)).astype(np.float32)
    x[:5] = x[:5, :1]                                                     # some greys (S = 0)
    hsv = data.rgb_to_hsv(x)
    ref = np.array([colorsys.rgb_to_hsv(*(p / 255.0)) for p in x])
    np.testing.assert_allclose(hsv[:, 0], ref[:, 0] * 360, atol=1e-3)
    np.testing.assert_allclose(hsv[:, 1], ref[:, 1], atol=1e-5)
    np.testing.assert_allclose(hsv[:, 2], ref[:, 2] * 255, atol=1e-3)
    np.testing.assert_allclose(data.hsv_to_rgb(hsv), x, atol=1e-3)
    turned = hsv.copy()
    turned[:, 0] = (turned[:, 0] + 120) % 360                             # a hue turn of 120 degrees: R -> G
    np.testing.assert_allclose(data.hsv_to_rgb(turned), x[:, [2, 0, 1]], atol=1e-2)


def test_photometric_distortion_follows_the_official_steps():
    """A grey image stays grey through saturation and hue (only brightness and contrast move it); the
    draws are reproducible from the generator; values are not clipped; over many draws each step fires
    about half the time (brightness: the mean moves)."""
    grey = np.full((4, 5, 3), 100.0, np.float32)
    moved = 0
    for seed in range(200):
        out = data.photometric_distortion(grey, np.random.default_rng(seed))
        np.testing.assert_allclose(out, out[..., :1].repeat(3, -1), atol=1e-3)     # still grey
        moved += abs(float(out.mean()) - 100.0) > 1e-3
        again = data.photometric_distortion(grey, np.random.default_rng(seed))
        assert np.array_equal(out, again)
    assert 120 < moved < 200                     # brightness or contrast fired in ~3/4 of the draws
    bright = np.full((2, 2, 3), 250.0, np.float32)
    assert max(float(data.photometric_distortion(bright, np.random.default_rng(s)).max()) for s in range(50)) > 255


# -- what a preset owns: CAN bus without the expansion, the redraw rule, a second model's view ---------------

def test_can_bus_without_the_expansion_is_zeros_for_official_presets(world):
    """No CAN-bus expansion: the official presets get the official converter's zeros in can_bus[7:16],
    the CPU presets the values derived from the ego poses (gravity on z, forward velocity); the pose
    part (0-6, 16-17) is the same."""
    import bevformer
    official = data.NuScenesDataset(world, 'v1.0-mini', 'val',
                                    view=data.view_of(bevformer.PRESETS['tiny'], image_size=SIZE))
    cpu = data.NuScenesDataset(world, 'v1.0-mini', 'val',
                               view=data.view_of(bevformer.PRESETS['cpu-tiny'], image_size=SIZE))
    assert official.view.can_bus_fallback == 'zeros' and cpu.view.can_bus_fallback == 'poses'
    for i in (0, 2):
        a, b = official[i]['can_bus'], cpu[i]['can_bus']
        assert torch.equal(a[7:16], torch.zeros(9))
        assert abs(float(b[9]) - 9.81) < 1.0 and float(b[13]) > 1.0
        assert torch.equal(a[:7], b[:7]) and torch.equal(a[16:], b[16:])


def test_training_draws_another_sample_when_any_queue_frame_has_no_gt(world, monkeypatch):
    """As the official training set (filter_empty_gt over the whole queue): a sample whose drawn queue
    holds a frame without GT is replaced, so no item has that frame as its current frame or history,
    while without the rule some do."""
    ds = data.NuScenesDataset(world, 'v1.0-mini', 'train', image_size=SIZE, queue_length=3, train=True)
    empty = ds.sample_tokens[2]                                   # the third frame of the first scene
    real_gt = ds.gt

    def gt(sample):
        boxes, labels, tokens = real_gt(sample)
        return (boxes[:0], labels[:0], []) if sample['token'] == empty else (boxes, labels, tokens)

    monkeypatch.setattr(ds, 'gt', gt)
    torch.manual_seed(0)
    redrawn = 0
    for _ in range(3):
        for i in range(len(ds)):
            item = ds[i]
            used = [item['sample_token']] + [f['sample_token'] for f in item['history']]
            assert empty not in used
            redrawn += item['index'] != i
    assert redrawn > 0
    monkeypatch.setattr(ds, 'train', False)                       # evaluation keeps every sample
    assert ds[2]['sample_token'] == empty and ds[3]['history'][-1]['sample_token'] == empty


def test_the_apprentice_view_has_its_own_size_history_and_draw(world):
    """The loader serves a second model's view of the same sample: its own image size and lidar2img, its
    own queue length and history rule (here 'previous' with T = 2 beside the loader's random T = 3), the
    same GT; collate batches it like the main view."""
    view = data.View(image_size=(100, 56), image_loading='fast', queue_length=2, history_draw='previous')
    ds = data.NuScenesDataset(world, 'v1.0-mini', 'train', image_size=SIZE, queue_length=3, train=True,
                              apprentice=view)
    torch.manual_seed(0)
    for i in range(len(ds)):
        item = ds[i]
        a = item['apprentice']
        assert a['img'].shape[-2:] == (64, 128) and a['img_shape'] == (56, 100) and a['queue_length'] == 2
        pos = item['index'] - ds.scene_start[ds.scene_index[item['index']]]
        expect = [ds.sample_tokens[item['index'] - 1]] if pos > 0 else []
        assert [f['sample_token'] for f in a['history']] == expect          # the frame just before
        assert a['sample_token'] == item['sample_token'] and len(item['history']) <= 2
        scale = torch.tensor([100 / SIZE[0], 56 / SIZE[1], 1.0, 1.0])
        assert torch.allclose(a['lidar2img'], torch.diag(scale) @ item['lidar2img'], rtol=1e-4, atol=1e-3)
    batch = data.collate([ds[len(ds) - 1], ds[len(ds) - 2]])
    assert batch['apprentice']['img'].shape == (2, 6, 3, 64, 128)
    assert batch['apprentice']['history']['img'].shape == (2, 1, 6, 3, 64, 128)
    assert batch['apprentice']['history_valid'].shape == (2, 1)
