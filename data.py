"""nuScenes-format data: a loader built on nuscenes-devkit, and the CLI of the synthetic world.

    python data.py synth --out data/synthetic        # writes the synthetic world (synthetic.py)
    python data.py bench --dataroot data/synthetic   # loading throughput, 0 and 2 workers
    python data.py picture --dataroot data/synthetic # one sample's six cameras as a PNG

`NuScenesDataset` reads any nuScenes-format root (v1.0-mini, v1.0-trainval, v1.0-test, the synthetic
world) directly with the devkit: no info pkl, no converter. Tables, `get_sample_data`, `Box`,
`box_velocity` and the quaternions are the devkit's; this file only composes them.

Item layout (contract): the current frame's `img` [N, 3, Hp, Wp] (RGB 0..255, resized to `image_size`,
zero-padded bottom/right to a multiple of 32), `img_shape` (H, W) before padding, `lidar2img` [N, 4, 4]
for exactly that tensor, `can_bus` [18], `gt_boxes` [K, 9] / `gt_labels` [K] in the LIDAR_TOP frame,
`gt_tokens` (their sample_annotation tokens), `sample_token`, `scene_token`, `timestamp` (us), `index`,
`queue_length` T, and `history`: up to T-1 earlier
frames of the same scene (oldest first), each with `img`, `img_shape`, `lidar2img`, `can_bus`,
`scene_token`, `timestamp`, `sample_token`.

Differences from the official pipeline (mmdet3d info pkl + BEVFormer dataset), all on purpose:
* Images are read as RGB by PIL (the official loader reads BGR with OpenCV); models normalise (the
  caffe presets flip to BGR first). A preset chooses how images are decoded and resized
  (`image_loading`, see `load_image`): 'official' decodes in full and resizes bilinearly without
  antialiasing, as mmcv's imresize (cv2 INTER_LINEAR) does; 'fast' (the CPU presets) decodes JPEGs at
  1/2, 1/4 or 1/8 scale where that is exact and resizes with antialiasing.
* Boxes keep nuScenes' own yaw (contract); the official `-yaw - pi/2` is converted only when loading
  official checkpoints.
* Without the CAN-bus expansion a preset chooses can_bus[7:16] (`can_bus_fallback`): the official
  zeros, or values derived from the ego poses (the CPU presets; see `can_bus`).
* The training history is drawn from the previous T frames as in BEVFormer, but frames of another scene
  are dropped instead of being run and reset (same effect on the model: no usable prev_bev). As in the
  official training set, a sample is drawn again when any frame of its queue has no GT.
* For distillation the loader can also serve a second model's view of every sample (`apprentice`): its
  own image size, image loading, history length and draw, and CAN bus, from the same files and the same
  photometric draws, so that the apprentice trains on exactly the pixels it is evaluated on.
"""
import argparse
import os
import sys
import time
from dataclasses import dataclass, fields

import numpy as np
import torch
from PIL import Image
from pyquaternion import Quaternion

from nuscenes.eval.common.utils import quaternion_yaw
from nuscenes.eval.detection.utils import category_to_detection_name
from nuscenes.utils.geometry_utils import BoxVisibility, transform_matrix
from nuscenes.utils.splits import create_splits_scenes

import synthetic
from common import (CAMERAS, CAN_BUS_FALLBACK, CLASSES, HISTORY_DRAW, IMAGE_LOADING,  # noqa: F401
                    InputError, resize_images, streams)

PC_RANGE_XY = 51.2           # GT kept when |x| and |y| are strictly inside (BEVFormer's ObjectRangeFilter)
PAD = 32                     # images are zero-padded to a multiple of this


# The world `python train.py` writes when data/synthetic is missing (and `python data.py synth` by default):
# many short scenes, under v1.0-trainval names because mini has only 8 + 2, with images at the cpu-tiny
# input size (200x113: nothing to resize, 4x fewer pixels to render and decode). Why: on mini's 8 long
# scenes (320 training samples) cpu-tiny overfit within the default run (after 2000 iterations: train mAP
# 0.092, val 0.025); docs/experiments.md has the measurements that chose these numbers.
DEFAULT_WORLD = dict(version='v1.0-trainval', train_scenes=100, val_scenes=15, samples_per_scene=12,
                     image_scale=0.125)


def write_synthetic_world(out, version=DEFAULT_WORLD['version'], train_scenes=DEFAULT_WORLD['train_scenes'],
                          val_scenes=DEFAULT_WORLD['val_scenes'], samples_per_scene=DEFAULT_WORLD['samples_per_scene'],
                          image_scale=DEFAULT_WORLD['image_scale'], seed=0, **kwargs):
    """Write the synthetic nuScenes-format world (synthetic.py; kwargs: workers, progress); the defaults
    are DEFAULT_WORLD, and train_scenes/val_scenes None mean all of the version's. Returns its statistics
    (seconds, bytes, scenes, samples, annotations, image_size). Bad requests raise InputError."""
    try:
        return synthetic.write_synthetic_world(out, version, train_scenes, val_scenes, samples_per_scene,
                                               image_scale, seed, **kwargs)
    except synthetic.WorldSpecError as e:
        raise InputError(str(e)) from None


def to_device(batch, device):
    """Move every tensor of a (nested dict/list/tuple) batch to `device`; other values are kept."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list):
        return [to_device(v, device) for v in batch]
    if isinstance(batch, tuple):
        return tuple(to_device(v, device) for v in batch)
    return batch


VERSIONS = ('v1.0-trainval', 'v1.0-mini', 'v1.0-test')


def resolve_version(dataroot, version='auto', split=None):
    """`--version auto` (the CLIs' default) -> the version whose tables are in dataroot: v1.0-test for the
    test split, otherwise v1.0-trainval if present, else v1.0-mini. Any other value is returned as given
    (a missing dataroot is an InputError either way)."""
    if not os.path.isdir(dataroot):
        raise InputError('--dataroot %s: folder not found; expected a nuScenes-format root (run `python data.py '
                         'synth --out %s` for the synthetic world)' % (dataroot, dataroot))
    if version != 'auto':
        return version
    present = [v for v in VERSIONS if os.path.isdir(os.path.join(dataroot, v))]
    wanted = ('v1.0-test',) if split == 'test' else ('v1.0-trainval', 'v1.0-mini')
    for v in wanted:
        if v in present:
            return v
    raise InputError('--version auto: %s holds no %s tables (versions present: %s); give the right --dataroot '
                     'or --version' % (dataroot, ' or '.join(wanted), ', '.join(present) or 'none'))


def split_scene_names(version, split):
    """The official scene names of `split` for `version` (mini: train/val -> mini_train/mini_val)."""
    splits = create_splits_scenes()
    if version.endswith('mini'):
        key = {'train': 'mini_train', 'val': 'mini_val'}.get(split, split)
        allowed = ('train', 'val', 'mini_train', 'mini_val')
    elif version.endswith('trainval'):
        key, allowed = split, ('train', 'val')
    elif version.endswith('test'):
        key, allowed = split, ('test',)
    else:
        raise InputError('--version %s: expected v1.0-mini, v1.0-trainval or v1.0-test' % version)
    if split not in allowed:
        raise InputError('--split %s: expected one of %s for %s' % (split, ', '.join(allowed), version))
    return set(splits[key])


# ----------------------------------------------------------------------------------------------------------
# Per-frame pieces.

def load_image(path, size, loading='official', distort=None):
    """RGB float32 [H, W, 3] in 0..255 at size = (W, H) (None: the file's size), and the file's (W, H).

    loading 'official' (BEVFormer's and DETR3D's pipeline): decode the whole file, apply `distort` (the
    photometric distortion, a function of an RGB float image) at the file's resolution, then resize
    bilinearly without antialiasing (`resize_images`). The official order is load -> distort ->
    normalise -> resize -> pad; normalising is per-channel affine and the resize is linear with weights
    summing to one, so resizing before the model normalises gives the same pixels.
    loading 'fast' (CPU presets): JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale first when the target
    is that much smaller (much faster on 1600x900 files), only where that scale divides the file's size
    exactly so that the pixels keep the geometry of a plain resize; then an antialiased resize, then
    `distort` at the model's resolution."""
    try:
        with Image.open(path) as f:
            native, im = f.size, f
            if loading == 'fast' and size is not None and f.format == 'JPEG':
                f.draft('RGB', tuple(size))
                k = native[0] // f.size[0]
                if (f.size[0] * k, f.size[1] * k) != native:
                    im = Image.open(path)                   # not an exact 1/k: decode in full
            rgb = np.asarray(im.convert('RGB'), dtype=np.float32)
    except (OSError, SyntaxError, ValueError) as e:   # PIL raises these for truncated or non-image files
        raise InputError('%s: cannot read the image (%s); expected a readable JPEG/PNG' % (path, e)) from None
    if distort is not None and loading == 'official':
        rgb = distort(rgb)
    if size is not None and (rgb.shape[1], rgb.shape[0]) != tuple(size):
        x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)            # [3, H, W]
        rgb = resize_images(x, size, antialias=loading == 'fast').permute(1, 2, 0).numpy()
    if distort is not None and loading == 'fast':
        rgb = distort(rgb)
    return np.ascontiguousarray(rgb, dtype=np.float32), native


def rgb_to_hsv(img):
    """RGB float [..., 3] -> HSV as OpenCV computes it for float images: H in degrees [0, 360),
    S = (max - min) / |max| in [0, 1], V = max (in the input's units, here 0..255)."""
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    v = img.max(-1)
    diff = v - img.min(-1)
    eps = np.float32(np.finfo(np.float32).eps)
    s = diff / (np.abs(v) + eps)
    k = np.float32(60.0) / (diff + eps)
    h = np.where(v == r, (g - b) * k, np.where(v == g, (b - r) * k + 120, (r - g) * k + 240))
    h = np.where(h < 0, h + 360, h)
    return np.stack([h, s, v], -1).astype(np.float32)


def hsv_to_rgb(hsv):
    """The inverse of `rgb_to_hsv` (OpenCV's float HSV -> RGB: six hue sectors of 60 degrees)."""
    h, s, v = hsv[..., 0] / np.float32(60.0), hsv[..., 1], hsv[..., 2]
    h = np.mod(h, 6)
    sector = np.floor(h).astype(np.int64) % 6
    f = h - np.floor(h)
    tab = np.stack([v, v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))], -1)       # [..., 4]
    # (r, g, b) indices into tab for each sector (red -> yellow -> green -> cyan -> blue -> magenta)
    order = np.array([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])
    rgb = np.take_along_axis(tab, order[sector], -1)
    return np.where((s == 0)[..., None], v[..., None], rgb).astype(np.float32)


def photometric_distortion(img, rng):
    """BEVFormer's PhotoMetricDistortionMultiViewImage (mmdet's PhotoMetricDistortion per camera) on one
    RGB float image [H, W, 3] in 0..255: brightness +-32 with probability 1/2; contrast x0.5..1.5 with
    probability 1/2, either first or last (a coin); in HSV (OpenCV's float convention, `rgb_to_hsv`)
    saturation x0.5..1.5 and hue +-18 degrees (wrapped to [0, 360)), each with probability 1/2; a random
    channel permutation with probability 1/2. No clipping, as in the official code (the model normalises
    whatever comes). The official code works on BGR; hue and the permutation are symmetric in the channel
    order, so the distribution is the same."""
    def coin():
        return rng.integers(2) == 1
    img = img.astype(np.float32, copy=True)
    if coin():
        img += np.float32(rng.uniform(-32, 32))
    contrast_first = coin()
    if contrast_first and coin():
        img *= np.float32(rng.uniform(0.5, 1.5))
    hsv = rgb_to_hsv(img)
    if coin():
        hsv[..., 1] *= np.float32(rng.uniform(0.5, 1.5))
    if coin():
        hsv[..., 0] += np.float32(rng.uniform(-18, 18))
        hsv[..., 0] = np.where(hsv[..., 0] > 360, hsv[..., 0] - 360, hsv[..., 0])
        hsv[..., 0] = np.where(hsv[..., 0] < 0, hsv[..., 0] + 360, hsv[..., 0])
    img = hsv_to_rgb(hsv)
    if not contrast_first and coin():
        img *= np.float32(rng.uniform(0.5, 1.5))
    if coin():
        img = img[..., rng.permutation(3)]
    return np.ascontiguousarray(img)


def pad_to(img, multiple=PAD):
    """Zero-pad [N, 3, H, W] at the bottom/right to multiples of `multiple`."""
    H, W = img.shape[-2:]
    Hp, Wp = -(-H // multiple) * multiple, -(-W // multiple) * multiple
    return torch.nn.functional.pad(img, (0, Wp - W, 0, Hp - H))


# ----------------------------------------------------------------------------------------------------------
# The dataset.

@dataclass(frozen=True)
class View:
    """How one model sees the data (a preset owns these; `view_of` reads them from a config).

    image_size (W, H) the images are resized to (None: the files' size); image_loading 'official' or
    'fast' (`load_image`); queue_length T (T - 1 history frames); history_draw, how training draws them
    ('random': BEVFormer's T - 1 of the previous T frames; 'previous': the T - 1 frames just before, as
    evaluation; 'stream': none, train.py carries the previous BEV over from an earlier iteration);
    can_bus_fallback, can_bus[7:16] where the CAN-bus expansion has no data ('zeros': the
    official converter; 'poses': derived from the ego poses)."""
    image_size: tuple = None
    image_loading: str = 'official'
    queue_length: int = 1
    history_draw: str = 'random'
    can_bus_fallback: str = 'poses'

    def __post_init__(self):
        if self.image_size is not None:
            object.__setattr__(self, 'image_size', (int(self.image_size[0]), int(self.image_size[1])))
        for ok, msg in [(self.image_loading in IMAGE_LOADING, 'image_loading %r: expected one of %s'
                         % (self.image_loading, ', '.join(IMAGE_LOADING))),
                        (self.queue_length >= 1, 'queue_length %d: expected >= 1' % self.queue_length),
                        (self.history_draw in HISTORY_DRAW, 'history_draw %r: expected one of %s'
                         % (self.history_draw, ', '.join(HISTORY_DRAW))),
                        (self.can_bus_fallback in CAN_BUS_FALLBACK, 'can_bus_fallback %r: expected one of %s'
                         % (self.can_bus_fallback, ', '.join(CAN_BUS_FALLBACK)))]:
            if not ok:
                raise InputError(msg)


def view_of(cfg, **overrides):
    """The View a model config asks for (its preset's fields), with overrides (e.g. queue_length=1)."""
    kw = {f.name: getattr(cfg, f.name) for f in fields(View) if hasattr(cfg, f.name)}
    kw.update(overrides)
    return View(**kw)


class NuScenesDataset(torch.utils.data.Dataset):
    """Samples of one split of a nuScenes-format root, in time order per scene (scenes by start time).

    dataroot: folder holding `<version>/*.json`, `samples/`, `maps/` (and optionally `can_bus/`).
    image_size: (W, H) the images are resized to (anisotropic allowed; None keeps the native size).
    queue_length: T, the number of frames seen by the model (T - 1 history frames, 1 = none).
    train: draw history frames as BEVFormer does and draw another sample when a frame of the queue has
           no GT (not with history_draw 'stream': a streamed scene is seen frame by frame); False
           (evaluation) takes the immediately preceding frames and keeps every sample.
    photometric: photometric distortion of every image (training augmentation).
    history_draw, image_loading, can_bus_fallback: see `View`.
    view: a View instead of the five arguments above (what a preset owns: `view_of(cfg)`).
    apprentice: a second View (or a dict of its fields): every item also carries item['apprentice'],
           that model's own img, img_shape, lidar2img, can_bus, queue_length and history, drawn with its
           own rule from the same sample, with the same photometric draws (distillation).
    """

    def __init__(self, dataroot, version='auto', split='val', image_size=None, queue_length=1, train=False,
                 photometric=False, history_draw='random', image_loading='official', can_bus_fallback='poses',
                 apprentice=None, view=None):
        from nuscenes.nuscenes import NuScenes
        version = resolve_version(dataroot, version, split)
        table_dir = os.path.join(dataroot, version)
        if not os.path.isdir(table_dir):
            found = sorted(d for d in os.listdir(dataroot) if d.startswith('v1.0'))
            raise InputError('%s: folder not found; expected the %s tables there (versions present: %s)'
                             % (table_dir, version, ', '.join(found) or 'none'))
        names = split_scene_names(version, split)
        self.view = view or View(image_size, image_loading, int(queue_length), history_draw, can_bus_fallback)
        self.apprentice = View(**apprentice) if isinstance(apprentice, dict) else apprentice
        try:
            self.nusc = NuScenes(version=version, dataroot=dataroot, verbose=False)
        except (OSError, AssertionError, KeyError, ValueError) as e:
            raise InputError('%s: cannot load the nuScenes tables (%s: %s)'
                             % (table_dir, type(e).__name__, e)) from None
        self.dataroot, self.version, self.split = dataroot, version, split
        self.image_size, self.queue_length = self.view.image_size, self.view.queue_length
        self.train, self.photometric = bool(train), bool(photometric)

        scenes = [s for s in self.nusc.scene if s['name'] in names]
        if not scenes:
            raise InputError('%s: no scene of split %s (expected official scene names such as %s)'
                             % (table_dir, split, sorted(names)[0]))
        scenes.sort(key=lambda s: self.nusc.get('sample', s['first_sample_token'])['timestamp'])
        self.sample_tokens, self.scene_index = [], []   # scene_index[i]: position of sample i's scene
        self.scene_start = []                           # first dataset index of each scene
        for si, scene in enumerate(scenes):
            self.scene_start.append(len(self.sample_tokens))
            tok = scene['first_sample_token']
            while tok:
                self.sample_tokens.append(tok)
                self.scene_index.append(si)
                tok = self.nusc.get('sample', tok)['next']
        self.scenes = scenes
        self._check_images()
        self._can = self._load_can_bus()

    def _check_images(self):
        """Fail at construction, naming the first missing camera image."""
        for tok in self.sample_tokens:
            data = self.nusc.get('sample', tok)['data']
            for cam in CAMERAS:
                if cam not in data:
                    raise InputError('sample %s of %s: no %s image; expected the six cameras %s'
                                     % (tok, self.version, cam, ', '.join(CAMERAS)))
                path = os.path.join(self.dataroot, self.nusc.get('sample_data', data[cam])['filename'])
                if not os.path.isfile(path):
                    raise InputError('%s: camera image missing (listed in %s/sample_data.json); expected the '
                                     'samples/ folder of the dataset' % (path, self.version))

    def _load_can_bus(self):
        """The CAN-bus expansion (`<dataroot>/can_bus/`) when present, else None (poses are used)."""
        if not os.path.isdir(os.path.join(self.dataroot, 'can_bus')):
            return None
        from nuscenes.can_bus.can_bus_api import NuScenesCanBus
        return NuScenesCanBus(dataroot=self.dataroot)

    def __len__(self):
        return len(self.sample_tokens)

    # -- geometry ------------------------------------------------------------------------------------------

    def _lidar_pose(self, sample):
        sd = self.nusc.get('sample_data', sample['data']['LIDAR_TOP'])
        return sd, self.nusc.get('calibrated_sensor', sd['calibrated_sensor_token']), \
            self.nusc.get('ego_pose', sd['ego_pose_token'])

    def lidar2img(self, sample, scale):
        """[N, 4, 4] img_T_lidar per camera: each camera with its own ego pose (as the official converter's
        `obtain_sensor2top` chains camera -> ego at the camera's time -> global -> ego at the lidar's -> lidar).
        scale: [N, 2] (sx, sy) of the resize applied to each image."""
        _, l_cs, l_pose = self._lidar_pose(sample)
        global_T_lidar = transform_matrix(l_pose['translation'], Quaternion(l_pose['rotation'])) @ \
            transform_matrix(l_cs['translation'], Quaternion(l_cs['rotation']))
        out = []
        for n, cam in enumerate(CAMERAS):
            sd = self.nusc.get('sample_data', sample['data'][cam])
            cs = self.nusc.get('calibrated_sensor', sd['calibrated_sensor_token'])
            pose = self.nusc.get('ego_pose', sd['ego_pose_token'])
            cam_T_global = transform_matrix(cs['translation'], Quaternion(cs['rotation']), inverse=True) @ \
                transform_matrix(pose['translation'], Quaternion(pose['rotation']), inverse=True)
            K = np.eye(4)
            K[:3, :3] = cs['camera_intrinsic']
            out.append(np.diag([scale[n][0], scale[n][1], 1.0, 1.0]) @ K @ cam_T_global @ global_T_lidar)
        return torch.tensor(np.stack(out), dtype=torch.float32)

    def can_bus(self, index, fallback=None):
        """[18] absolute can_bus of BEVFormer's layout (official `CustomNuScenesDataset.get_data_info` and the
        converter's `_get_can_bus_info`): 0-2 ego position (global, the
        LIDAR_TOP sample_data's ego pose), 3-6 ego rotation (w, x, y, z), 7-9 acceleration, 10-12 rotation
        rate, 13-15 velocity (ego frame), 16 yaw in rad [0, 2pi), 17 the same yaw in degrees.
        7-15 come from the CAN-bus expansion when present (pose message; accel, rotation rate and velocity
        from the first message after the sample, as the official converter does); otherwise from the
        `fallback` (default: the dataset's can_bus_fallback): 'zeros', as the official converter writes
        for a dataset or scene without CAN data, or 'poses': from the ego poses of the neighbouring
        samples of the same scene: velocity by central difference, rotation rate as the yaw rate about
        z, acceleration by second difference plus gravity on z (an IMU measures +9.81 m/s^2 upwards at
        rest, like the CAN pose message)."""
        sample = self.nusc.get('sample', self.sample_tokens[index])
        _, _, pose = self._lidar_pose(sample)
        rot = Quaternion(pose['rotation'])
        yaw = quaternion_yaw(rot) % (2 * np.pi)
        out = np.zeros(18)
        out[:3] = pose['translation']
        out[3:7] = rot.elements
        out[16], out[17] = yaw, np.rad2deg(yaw)
        motion = self._can_motion(sample) if self._can is not None else None
        if motion is None:
            zeros = (fallback or self.view.can_bus_fallback) == 'zeros'
            motion = np.zeros(9) if zeros else self._pose_motion(index)
        out[7:16] = motion
        return torch.tensor(out, dtype=torch.float32)

    def _can_motion(self, sample):
        scene = self.nusc.get('scene', sample['scene_token'])
        try:
            msgs = self._can.get_messages(scene['name'], 'pose', print_warnings=False)
        except Exception:                       # scenes without CAN data (the devkit's blacklist)
            return None
        if not msgs:
            return None
        after = next((m for m in msgs if m['utime'] > sample['timestamp']), msgs[-1])
        return np.concatenate([after['accel'], after['rotation_rate'], after['vel']])

    def _pose_motion(self, index):
        si = self.scene_index[index]
        lo, hi = index, index
        if index > 0 and self.scene_index[index - 1] == si:
            lo = index - 1
        if index + 1 < len(self) and self.scene_index[index + 1] == si:
            hi = index + 1
        if lo == hi:
            return np.array([0, 0, 9.81, 0, 0, 0, 0, 0, 0], np.float64)
        poses = []
        for i in range(lo, hi + 1):
            s = self.nusc.get('sample', self.sample_tokens[i])
            p = self._lidar_pose(s)[2]
            poses.append((s['timestamp'] * 1e-6, np.array(p['translation']), Quaternion(p['rotation'])))
        ego_R_global = poses[index - lo][2].inverse
        (t0, p0, q0), (t1, p1, q1) = poses[0], poses[-1]
        vel = ego_R_global.rotate((p1 - p0) / (t1 - t0))
        dyaw = (quaternion_yaw(q1) - quaternion_yaw(q0) + np.pi) % (2 * np.pi) - np.pi
        rate = np.array([0.0, 0.0, dyaw / (t1 - t0)])
        acc = np.array([0.0, 0.0, 9.81])
        if len(poses) == 3:
            (ta, pa, _), (tb, pb, _), (tc, pc, _) = poses
            acc += ego_R_global.rotate(((pc - pb) / (tc - tb) - (pb - pa) / (tb - ta)) / ((tc - ta) / 2))
        return np.concatenate([acc, rate, vel])

    def gt(self, sample):
        """gt_boxes [K, 9] (contract layout, LIDAR_TOP frame), gt_labels [K] int64 and the K annotation
        tokens, as the official converter and training pipeline give them (the valid_flag of
        `_fill_trainval_infos`, mmdet3d's `ObjectRangeFilter`):
        boxes from the devkit at the lidar sample_data, velocity from `box_velocity` rotated into the lidar
        frame, kept when num_lidar_pts + num_radar_pts > 0 and |x|, |y| < 51.2 (z not filtered)."""
        lidar_token = sample['data']['LIDAR_TOP']
        _, l_cs, l_pose = self._lidar_pose(sample)
        lidar_R_global = Quaternion(l_cs['rotation']).inverse * Quaternion(l_pose['rotation']).inverse
        _, boxes, _ = self.nusc.get_sample_data(lidar_token, box_vis_level=BoxVisibility.NONE)
        rows, labels, tokens = [], [], []
        for box in boxes:
            name = category_to_detection_name(box.name)
            if name is None:
                continue
            ann = self.nusc.get('sample_annotation', box.token)
            if ann['num_lidar_pts'] + ann['num_radar_pts'] <= 0:
                continue
            x, y, z = box.center
            if not (abs(x) < PC_RANGE_XY and abs(y) < PC_RANGE_XY):
                continue
            v = self.nusc.box_velocity(box.token)
            v = np.nan_to_num(np.array([v[0], v[1], 0.0]), nan=0.0)   # NaN (one annotation) -> 0, as mmdet3d
            vx, vy, _ = lidar_R_global.rotate(v)
            rows.append([x, y, z, *box.wlh, box.orientation.yaw_pitch_roll[0], vx, vy])
            labels.append(CLASSES.index(name))
            tokens.append(box.token)
        boxes_t = torch.tensor(np.array(rows, np.float64).reshape(-1, 9), dtype=torch.float32)
        return boxes_t, torch.tensor(labels, dtype=torch.int64), tokens

    # -- items ---------------------------------------------------------------------------------------------

    def frame(self, index, view=None, seed=None):
        """One frame as `view` sees it (no GT, no history): img, img_shape, lidar2img, can_bus, tokens,
        timestamp. seed: the item's photometric seed (None: no distortion); the draws depend only on
        (seed, frame), so two views of one frame are distorted alike."""
        view = view or self.view
        sample = self.nusc.get('sample', self.sample_tokens[index])
        rng = None if seed is None else np.random.default_rng([seed, index])
        distort = None if rng is None else (lambda im: photometric_distortion(im, rng))
        imgs, scale = [], []
        for cam in CAMERAS:
            sd = self.nusc.get('sample_data', sample['data'][cam])
            img, (w0, h0) = load_image(os.path.join(self.dataroot, sd['filename']), view.image_size,
                                       view.image_loading, distort)
            scale.append((img.shape[1] / w0, img.shape[0] / h0))      # the intrinsics are for the file's size
            imgs.append(img)
        shapes = {im.shape for im in imgs}
        if len(shapes) > 1:
            raise InputError('sample %s: camera images of different sizes %s; pass image_size=(W, H)'
                             % (sample['token'], sorted(shapes)))
        img = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2)    # [N, 3, H, W]
        H, W = img.shape[-2:]
        return {'img': pad_to(img).contiguous(), 'img_shape': (int(H), int(W)),
                'lidar2img': self.lidar2img(sample, scale), 'can_bus': self.can_bus(index, view.can_bus_fallback),
                'sample_token': sample['token'], 'scene_token': sample['scene_token'],
                'timestamp': int(sample['timestamp'])}

    def queue_draw(self, index, view=None, generator=None):
        """The dataset indices of a queue's history frames as the official code draws them, oldest first
        (official `CustomNuScenesDataset.prepare_train_data`): in training T-1 frames at random from the
        previous T ('random'), else the T-1 immediately preceding frames; indices below 0 become 0 (frames
        of other scenes included)."""
        view = view or self.view
        T = view.queue_length
        if T <= 1:
            return []
        if self.train and streams(view):
            return []                              # the previous BEV comes from train.py's BEVStream
        if self.train and view.history_draw == 'random':
            prev = list(range(index - T, index))
            keep = torch.randperm(T, generator=generator)[:T - 1].tolist()
            prev = sorted(prev[k] for k in keep)
        else:
            prev = list(range(index - T + 1, index))
        return [max(0, i) for i in prev]

    def same_scene(self, index, draw):
        """The frames of a queue draw that the model runs: of index's scene, earlier, each once."""
        si = self.scene_index[index]
        return sorted({i for i in draw if i < index and self.scene_index[i] == si})

    def history_indices(self, index, generator=None, view=None):
        """Dataset indices of the history frames, oldest first, all of the same scene and earlier
        (`queue_draw` without the frames of other scenes)."""
        return self.same_scene(index, self.queue_draw(index, view, generator))

    def _has_gt(self, index):
        return len(self.gt(self.nusc.get('sample', self.sample_tokens[index]))[1]) > 0

    def __getitem__(self, index):
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index = index % len(self)
        views = [self.view] + ([self.apprentice] if self.apprentice is not None else [])
        for _ in range(1000):
            draws = [self.queue_draw(index, v) for v in views]
            sample = self.nusc.get('sample', self.sample_tokens[index])
            gt_boxes, gt_labels, gt_tokens = self.gt(sample)
            # the official training set draws another sample when ANY frame of the queue has no GT
            # (filter_empty_gt in prepare_train_data), frames of other scenes included; a streamed
            # sample is kept as it is (its scene's chain must not skip a frame)
            if not self.train or any(streams(v) for v in views) or \
                    (len(gt_labels) and all(self._has_gt(i) for d in draws for i in set(d) - {index})):
                break
            index = int(torch.randint(len(self), ()).item())
        seed = int(torch.randint(2 ** 31, ()).item()) if self.photometric else None
        item = self.view_item(index, self.view, draws[0], seed)
        item.update(gt_boxes=gt_boxes, gt_labels=gt_labels, gt_tokens=gt_tokens, index=index)
        if self.apprentice is not None:
            item['apprentice'] = self.view_item(index, self.apprentice, draws[1], seed)
        return item

    def view_item(self, index, view, draw, seed):
        """The current frame and its history frames (of the same scene) as one view sees them."""
        item = self.frame(index, view, seed)
        item['queue_length'] = view.queue_length
        item['history'] = [self.frame(i, view, seed) for i in self.same_scene(index, draw)]
        return item


def collate(items):
    """Batch a list of items: tensors stacked with a leading B; `gt_boxes`/`gt_labels` kept as lists;
    strings as lists; `img_shape` as the common (H, W); `history` padded to [B, T-1, ...] with a boolean
    `history_valid` [B, T-1]. History is right-aligned: slot T-2 is always the frame just before the
    current one, padding sits at the front (older end) and is all zeros."""
    batch = {}
    for key in items[0]:
        if key == 'history':
            continue
        if key == 'apprentice':                       # a second model's view: collated the same way
            batch[key] = collate([it[key] for it in items])
            continue
        vals = [it[key] for it in items]
        if key in ('gt_boxes', 'gt_labels', 'gt_tokens'):
            batch[key] = vals
        elif key == 'img_shape':
            if len(set(vals)) > 1:
                raise ValueError('collate: items have different img_shape %s' % sorted(set(vals)))
            batch[key] = vals[0]
        elif torch.is_tensor(vals[0]):
            batch[key] = torch.stack(vals)
        elif isinstance(vals[0], (int, np.integer)):
            batch[key] = torch.tensor(vals, dtype=torch.int64)
        else:
            batch[key] = vals
    B = len(items)
    T1 = max([it.get('queue_length', 1) - 1 for it in items] + [len(it['history']) for it in items])
    cur = items[0]
    hist = {'img': torch.zeros((B, T1) + tuple(cur['img'].shape), dtype=cur['img'].dtype),
            'lidar2img': torch.zeros((B, T1) + tuple(cur['lidar2img'].shape)),
            'can_bus': torch.zeros((B, T1) + tuple(cur['can_bus'].shape)),
            'timestamp': torch.zeros((B, T1), dtype=torch.int64),
            'img_shape': cur['img_shape'],
            'scene_token': [[''] * T1 for _ in range(B)], 'sample_token': [[''] * T1 for _ in range(B)]}
    valid = torch.zeros((B, T1), dtype=torch.bool)
    for b, it in enumerate(items):
        frames = it['history']
        for j, f in enumerate(frames):
            t = T1 - len(frames) + j
            for key in ('img', 'lidar2img', 'can_bus'):
                hist[key][b, t] = f[key]
            hist['timestamp'][b, t] = f['timestamp']
            hist['scene_token'][b][t] = f['scene_token']
            hist['sample_token'][b][t] = f['sample_token']
            valid[b, t] = True
    batch['history'] = hist
    batch['history_valid'] = valid
    return batch


# ----------------------------------------------------------------------------------------------------------
# CLI

def bench(args):
    """Samples per second through a DataLoader (batch 1, collate) with 0 and 2 workers."""
    size, T = (args.image_size[0], args.image_size[1]), args.queue_length
    ds = NuScenesDataset(args.dataroot, args.version, args.split, image_size=size, queue_length=T, train=True,
                         photometric=True)
    n = min(args.samples, len(ds))
    print('dataset %s %s %s: %d samples; image_size %dx%d, queue_length %d (%d frames x 6 cameras per sample), '
          'train=True, photometric=True; %d samples timed after %d warm-up'
          % (args.dataroot, ds.version, args.split, len(ds), size[0], size[1], T, T, n, args.warmup))
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(ds, batch_size=1, shuffle=True, num_workers=workers,
                                             collate_fn=collate, persistent_workers=False)
        it = iter(loader)
        for _ in range(args.warmup):
            next(it)
        t = time.perf_counter()
        for _ in range(n):
            next(it)
        dt = time.perf_counter() - t
        print('workers %d: %.1f samples/s (%.1f ms per sample)' % (workers, n / dt, 1000 * dt / n))
        del it, loader


def picture(dataroot, version, split, index, out):
    """One sample's six camera images as a 3x2 mosaic (front row: FRONT_LEFT, FRONT, FRONT_RIGHT; back row:
    BACK_LEFT, BACK, BACK_RIGHT), each camera named, written to `out` (PNG)."""
    from PIL import ImageDraw
    ds = NuScenesDataset(dataroot, version, split)
    sample = ds.nusc.get('sample', ds.sample_tokens[index])
    order = ('CAM_FRONT_LEFT', 'CAM_FRONT', 'CAM_FRONT_RIGHT', 'CAM_BACK_LEFT', 'CAM_BACK', 'CAM_BACK_RIGHT')
    tiles = []
    for cam in order:
        sd = ds.nusc.get('sample_data', sample['data'][cam])
        im = Image.open(os.path.join(dataroot, sd['filename'])).convert('RGB')
        ImageDraw.Draw(im).text((4, 2), cam, fill=(255, 255, 255))
        tiles.append(np.asarray(im))
    mosaic = np.concatenate([np.concatenate(tiles[:3], 1), np.concatenate(tiles[3:], 1)], 0)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    Image.fromarray(mosaic).save(out)
    print('wrote %s: sample %s (%s, index %d of %s/%s)' % (out, sample['token'], ds.nusc.get(
        'scene', sample['scene_token'])['name'], index, ds.version, split))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    sub = p.add_subparsers(dest='cmd', required=True)
    s = sub.add_parser('synth', help='write the synthetic nuScenes-format world')
    s.add_argument('--out', default='data/synthetic', help='output folder (default data/synthetic)')
    w = DEFAULT_WORLD
    s.add_argument('--version', default=w['version'], help='v1.0-mini (8 + 2 scenes) or v1.0-trainval '
                   '(700 + 150) (default %s)' % w['version'])
    s.add_argument('--train-scenes', type=int, default=None, help='number of train scenes (default %d for the '
                   'default version, else all of the version)' % w['train_scenes'])
    s.add_argument('--val-scenes', type=int, default=None, help='number of val scenes (default %d for the '
                   'default version, else all of the version)' % w['val_scenes'])
    s.add_argument('--samples-per-scene', type=int, default=w['samples_per_scene'],
                   help='keyframes per scene at 2 Hz (default %d)' % w['samples_per_scene'])
    s.add_argument('--image-scale', type=float, default=w['image_scale'], help='image size as a fraction of '
                   '1600x900 (default %g: %dx%d)' % ((w['image_scale'],) + synthetic.image_size(w['image_scale'])))
    s.add_argument('--seed', type=int, default=0, help='random seed (same seed, same bytes)')
    s.add_argument('--workers', type=int, default=None, help='rendering processes (default min(2, CPUs))')
    b = sub.add_parser('bench', help='loading throughput with 0 and 2 workers')
    b.add_argument('--dataroot', default='data/synthetic', help='nuScenes-format root')
    b.add_argument('--version', default='auto', help='dataset version folder (auto: the one present)')
    b.add_argument('--split', default='train', help='train or val')
    b.add_argument('--image-size', type=int, nargs=2, default=(200, 113), metavar=('W', 'H'),
                   help='resize target (default 200 113: the cpu-tiny apprentice input)')
    b.add_argument('--queue-length', type=int, default=3, help='frames per sample (default 3; cpu-tiny trains with 2)')
    b.add_argument('--samples', type=int, default=40, help='samples timed per setting')
    b.add_argument('--warmup', type=int, default=3, help='samples loaded before timing')
    c = sub.add_parser('picture', help="one sample's six cameras as a PNG mosaic")
    c.add_argument('--dataroot', default='data/synthetic', help='nuScenes-format root')
    c.add_argument('--version', default='auto', help='dataset version folder (auto: the one present)')
    c.add_argument('--split', default='val', help='train or val')
    c.add_argument('--index', type=int, default=0, help='sample index in the split (time order)')
    c.add_argument('--out', default='docs/synthetic_cameras.png', help='output PNG')
    args = p.parse_args(argv)
    try:
        if args.cmd == 'synth':
            if args.version == DEFAULT_WORLD['version']:    # the default world's scene counts
                args.train_scenes = DEFAULT_WORLD['train_scenes'] if args.train_scenes is None else args.train_scenes
                args.val_scenes = DEFAULT_WORLD['val_scenes'] if args.val_scenes is None else args.val_scenes
            stats = write_synthetic_world(args.out, args.version, args.train_scenes, args.val_scenes,
                                          args.samples_per_scene, args.image_scale, args.seed, workers=args.workers)
            print('wrote %s: %d scenes, %d samples, %d annotations, images %dx%d, %.1f MB in %.1f s'
                  % (args.out, stats['scenes'], stats['samples'], stats['annotations'], *stats['image_size'],
                     stats['bytes'] / 1e6, stats['seconds']))
        elif args.cmd == 'picture':
            picture(args.dataroot, args.version, args.split, args.index, args.out)
        else:
            bench(args)
    except InputError as e:
        print('error: %s' % e, file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
