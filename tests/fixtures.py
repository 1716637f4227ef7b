"""A small synthetic nuScenes-format world for tests (owned by data.py's author; reuse it freely).

    from fixtures import small_world            # tests/ is on sys.path under pytest
    root = small_world(tmp_path_factory.mktemp('world'))
    ds = data.NuScenesDataset(root, 'v1.0-mini', 'val', image_size=(200, 113), queue_length=3)

Two mini_train scenes and one mini_val scene (scene-0103), 4 keyframes each, images 200x113 (1600x900
x 0.125), all 10 classes within their evaluation ranges in every scene. About 1 s of CPU. Calling it
again on the same folder returns at once (the world is reused when it is complete).
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SMALL_WORLD = dict(version='v1.0-mini', train_scenes=2, val_scenes=1, samples_per_scene=4, image_scale=0.125,
                   seed=0)


def small_world(tmp_dir, **overrides):
    """Write (once) the small world into tmp_dir and return tmp_dir as a str. overrides: any argument of
    data.write_synthetic_world (then the marker differs and the world is rewritten)."""
    import data
    kwargs = dict(SMALL_WORLD, **overrides)
    root = str(tmp_dir)
    marker = os.path.join(root, '.small_world_done')
    stamp = repr(sorted(kwargs.items()))
    if os.path.exists(marker) and open(marker).read() == stamp:
        return root
    data.write_synthetic_world(root, progress=False, **kwargs)
    with open(marker, 'w') as f:
        f.write(stamp)
    return root


def devkit_pixels(nusc, sample_token, cam, points):
    """points [K, 3] metric LIDAR_TOP -> (pixels [2, K] in the original image, depth [K], (W, H)),
    through the devkit's own chain: lidar -> ego -> global -> ego (camera time) -> camera -> view_points."""
    import numpy as np
    from nuscenes.utils.data_classes import LidarPointCloud
    from nuscenes.utils.geometry_utils import view_points
    from pyquaternion import Quaternion
    sample = nusc.get('sample', sample_token)
    lidar_sd = nusc.get('sample_data', sample['data']['LIDAR_TOP'])
    l_cs = nusc.get('calibrated_sensor', lidar_sd['calibrated_sensor_token'])
    l_pose = nusc.get('ego_pose', lidar_sd['ego_pose_token'])
    sd = nusc.get('sample_data', sample['data'][cam])
    cs = nusc.get('calibrated_sensor', sd['calibrated_sensor_token'])
    pose = nusc.get('ego_pose', sd['ego_pose_token'])
    pts = points.double().numpy().T
    pc = LidarPointCloud(np.concatenate([pts, np.zeros((1, pts.shape[1]))]))
    pc.rotate(Quaternion(l_cs['rotation']).rotation_matrix)
    pc.translate(np.array(l_cs['translation']))
    pc.rotate(Quaternion(l_pose['rotation']).rotation_matrix)
    pc.translate(np.array(l_pose['translation']))
    pc.translate(-np.array(pose['translation']))
    pc.rotate(Quaternion(pose['rotation']).rotation_matrix.T)
    pc.translate(-np.array(cs['translation']))
    pc.rotate(Quaternion(cs['rotation']).rotation_matrix.T)
    depth = pc.points[2].copy()
    px = view_points(pc.points[:3], np.array(cs['camera_intrinsic']), normalize=True)[:2]
    return px, depth, (sd['width'], sd['height'])


# The official checkpoints' parameter names and shapes (tests/keys/, see its README): facts derived from
# the official module definitions, kept in the repository so that the tests run in a clone on its own.
KEYS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'keys')


def manifest(name):
    """{official key: shape (list of ints)} of tests/keys/<name> (e.g. 'keys_bevformer_tiny.txt')."""
    out = {}
    with open(os.path.join(KEYS, name)) as f:
        for line in f:
            if line.startswith('#') or not line.strip():
                continue
            key, shape = line.rstrip('\n').split('\t')
            out[key] = [int(s) for s in shape.strip('[]').split(',') if s.strip()]
    return out


def manifest_state(name, seed=0):
    """A state dict with every key of the manifest: random tensors of its shapes (BatchNorm's
    num_batches_tracked an int64 scalar), as an official checkpoint's 'state_dict' holds them."""
    import torch
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.tensor(7, dtype=torch.long) if k.endswith('num_batches_tracked')
                else torch.randn(*shape, generator=g)) for k, shape in manifest(name).items()}
