"""A small synthetic world written in the real nuScenes format (`python data.py synth`).

Why: nobody can run anything without the 300 GB nuScenes download. This file writes a dataset that
nuscenes-devkit loads as `NuScenes(version, DIR)` and scores with `DetectionEval`: the 13 tables, six
camera JPEGs and one LIDAR_TOP point file per sample, and a map mask per log. Facts about what the
devkit needs (the tables, files and fields it reads) are in docs/data.md; the world itself:

* One road per scene: a circular arc (radius 200-500 m, left or right turn), four 3.5 m lanes
  (right-hand traffic), bike lanes, parking lanes, sidewalks, terrain and unannotated buildings.
  The ego drives in the right inner lane at constant speed, so its yaw changes over the scene
  (temporal alignment matters). Keyframes at 2 Hz; every sample_data has its own ego pose (each camera
  fires a few ms after the lidar, as in nuScenes).
* Objects of all 10 detection classes with nuScenes mean sizes (+-10 %): vehicles moving in lanes (one
  speed per lane, so no collisions), cyclists in bike lanes, pedestrians walking on the sidewalks, and
  static ones (parked vehicles, a stopped bus, construction zones with barriers and cones, standing
  pedestrians, parked cycles) at exactly zero velocity. Attributes follow the velocity rule of
  BEVFormer's test-time formatting (mmdet3d's `NuScenesDataset._format_bbox`), so ground truth sent
  through the prediction path scores 1.
* Rendering: per camera, one ray per pixel. The ground (z = 0) gets a texture, lane marks, haze; above
  the horizon a sky gradient. Boxes are ray-cast (slab test) only inside their projected 2D bounding box,
  with a z-buffer for occlusion. Each face is shaded by a sun direction; the front face (+x of the box,
  its heading) is tinted light, the back face dark, so that heading is learnable. Class colours are
  jittered per instance and sizes overlap, so colour alone does not give position, heading or velocity.
  Per-image exposure and pixel noise, JPEG quality 90. Objects are drawn where they are at the sample
  (lidar) time and the ego where it is at each camera's own time, so `lidar2img` built with each
  camera's own ego pose (as the official converter's `obtain_sensor2top`) is exact for every object,
  moving or not.
* LIDAR_TOP: ground rings plus points sampled on the faces of each annotated object that face the lidar,
  in proportion to its visible fraction in the cameras (a fully hidden object gets none, like in
  nuScenes). `num_lidar_pts` is counted with the devkit's `points_in_box` on the written points.
  There is no radar: `num_radar_pts` is 0.
* Deterministic for a seed: tokens are hashes of (seed, names), every random draw comes from a
  generator seeded by (seed, scene, sample, camera), and the tables are written with a fixed key order.
"""
import hashlib
import json
import os
import shutil
import time

import numpy as np
from PIL import Image, ImageDraw
from pyquaternion import Quaternion
from scipy.ndimage import gaussian_filter     # scipy comes with nuscenes-devkit
from tqdm import tqdm

from nuscenes.utils.data_classes import Box
from nuscenes.utils.geometry_utils import points_in_box
from nuscenes.utils.splits import create_splits_scenes

from common import CAMERAS

# nuScenes category written for each detection class (the devkit maps it back with
# category_to_detection_name), mean size (w, l, h) in metres as in nuScenes, and a base colour.
CATEGORY = ('vehicle.car', 'vehicle.truck', 'vehicle.construction', 'vehicle.bus.rigid', 'vehicle.trailer',
            'movable_object.barrier', 'vehicle.motorcycle', 'vehicle.bicycle', 'human.pedestrian.adult',
            'movable_object.trafficcone')
SIZE = np.array([[1.95, 4.62, 1.73], [2.51, 6.93, 2.84], [2.85, 6.37, 3.19], [2.94, 11.19, 3.49],
                 [2.90, 12.28, 3.87], [2.53, 0.50, 0.98], [0.77, 2.11, 1.47], [0.61, 1.70, 1.28],
                 [0.67, 0.73, 1.77], [0.41, 0.41, 1.07]])
COLOUR = np.array([[190, 45, 45], [45, 80, 190], [235, 185, 30], [225, 120, 35], [130, 135, 150],
                   [225, 225, 225], [125, 40, 160], [30, 170, 170], [50, 150, 55], [250, 95, 20]], np.float32)
ATTRIBUTES = ('vehicle.moving', 'vehicle.stopped', 'vehicle.parked', 'cycle.with_rider', 'cycle.without_rider',
              'pedestrian.sitting_lying_down', 'pedestrian.standing', 'pedestrian.moving')
VISIBILITY = (('1', 'v0-40'), ('2', 'v40-60'), ('3', 'v60-80'), ('4', 'v80-100'))

# Camera rigs close to nuScenes (log n015): yaw of the optical axis in the ego frame (deg, left positive),
# position in the ego frame (m), focal length and principal point at 1600x900, trigger delay after the
# lidar (us; the lidar sweeps past each camera at a different time).
CAMERA_RIG = {
    'CAM_FRONT': (0.0, (1.700, 0.016, 1.511), 1266.4, (816.3, 491.5), 12000),
    'CAM_FRONT_RIGHT': (-55.0, (1.551, -0.493, 1.496), 1260.8, (808.0, 495.3), 20500),
    'CAM_FRONT_LEFT': (55.0, (1.521, 0.495, 1.510), 1272.6, (826.6, 479.8), 4000),
    'CAM_BACK': (180.0, (0.028, 0.004, 1.579), 809.2, (829.2, 481.8), 37000),
    'CAM_BACK_LEFT': (110.0, (1.036, 0.485, 1.591), 1256.7, (817.8, 451.9), 29000),
    'CAM_BACK_RIGHT': (-110.0, (1.015, -0.480, 1.562), 1259.5, (807.3, 501.2), 45500),
}
LIDAR_XYZ = (0.943, 0.0, 1.840)        # LIDAR_TOP in the ego frame; rotated -90 deg: lidar x = ego right
FULL_W, FULL_H = 1600, 900
SAMPLE_DT_US = 500000                  # keyframes at 2 Hz

# Road cross-section: lateral offset d (m, positive = left of the road direction).
LANES = (1.75, 5.25)                   # 3.5 m lanes: centres on each side; the ego drives at d = -1.75
BIKE_D, PARK_D, SIDEWALK_D = 7.5, 10.0, 15.2
WALK_D = (12.4, 13.4)
ROAD_EDGE, PARK_EDGE, CURB, SIDEWALK_EDGE = 7.0, 8.1, 11.8, 16.4
# Clearances hold for the largest objects (+10 %) on the tightest curve (radius 200 m: a 13.5 m box
# bulges 0.11 m out of its lane); tests/test_data.py checks that no two boxes overlap.
ANNOTATE_RANGE = 75.0                  # objects are annotated while within this distance of the ego
RENDER_RANGE = 95.0
NEAR = 0.1                             # camera near plane (m) for the 2D bounds of boxes
EDGES = np.array([(a, a ^ bit) for a in range(8) for bit in (1, 2, 4) if a < a ^ bit])   # box corner pairs
LIDAR_RANGE = 70.0


class WorldSpecError(ValueError):
    """A bad request (version, scene count, size); data.py turns it into data.InputError."""


def token(seed, *parts):
    """A deterministic 32-hex token (the format of nuScenes tokens)."""
    return hashlib.md5(('%d|' % seed + '|'.join(str(p) for p in parts)).encode()).hexdigest()


def image_size(image_scale):
    """(W, H) of the synthetic images: 1600x900 scaled, rounded half up (0.125 -> 200x113)."""
    return int(FULL_W * image_scale + 0.5), int(FULL_H * image_scale + 0.5)


def split_scene_names(version, n_train, n_val):
    """Official scene names for the requested numbers of train and val scenes."""
    splits = create_splits_scenes()
    if version == 'v1.0-mini':
        train, val = splits['mini_train'], splits['mini_val']
    elif version == 'v1.0-trainval':
        train, val = splits['train'], splits['val']
    else:
        raise WorldSpecError('version %r: expected v1.0-mini or v1.0-trainval' % version)
    n_train = len(train) if n_train is None else n_train
    n_val = len(val) if n_val is None else n_val
    if not 0 <= n_train <= len(train) or not 0 <= n_val <= len(val) or n_train + n_val == 0:
        raise WorldSpecError('--train-scenes %d --val-scenes %d: %s has %d train and %d val scenes (and at least '
                         'one scene is needed)' % (n_train, n_val, version, len(train), len(val)))
    return list(train[:n_train]), list(val[:n_val])


# ----------------------------------------------------------------------------------------------------------
# The road: a circular arc of signed curvature kappa, start point p0 and start heading theta0.
# point(s, d) = O - (rho - d) * n(theta0 + kappa * s) with rho = 1 / kappa, O = p0 + rho * n(theta0),
# n(theta) = (-sin theta, cos theta) the left normal.

class Road:
    def __init__(self, p0, theta0, kappa):
        self.p0, self.theta0, self.kappa = np.asarray(p0, np.float64), float(theta0), float(kappa)
        self.rho = 1.0 / self.kappa
        self.centre = self.p0 + self.rho * np.array([-np.sin(theta0), np.cos(theta0)])

    def heading(self, s):
        return self.theta0 + self.kappa * np.asarray(s, np.float64)

    def point(self, s, d):
        th = self.heading(s)
        r = self.rho - np.asarray(d, np.float64)
        return np.stack([self.centre[0] + r * np.sin(th), self.centre[1] - r * np.cos(th)], -1)

    def coords(self, x, y):
        """(s, d) of global points (float32 arrays; used for ground texture)."""
        vx, vy = x - self.centre[0], y - self.centre[1]
        r = np.sqrt(vx * vx + vy * vy)
        sg = np.sign(self.rho)
        th = np.arctan2(sg * vy, sg * vx) + np.pi / 2           # from n(th) = -sign(rho) * v / |v|
        dth = (th - self.theta0 + np.pi) % (2 * np.pi) - np.pi
        return dth / self.kappa, self.rho - sg * r


def yaw_quat(yaw):
    return [float(np.cos(yaw / 2)), 0.0, 0.0, float(np.sin(yaw / 2))]


# ----------------------------------------------------------------------------------------------------------
# Scene content. Every object follows s(t) = s0 + v t at lateral offset d with yaw = heading(s) + yaw_off;
# static objects have v = 0, so their global pose is the same float at every sample (velocity exactly 0).

def _populate(rng, ego_v, duration):
    """Objects of one scene as a dict of arrays (cls -1: unannotated building)."""
    objs = []   # (cls, w, l, h, s0, v, d, yaw_off)
    margin = 150.0                                          # road length kept around the ego

    def size(cls):
        return SIZE[cls] * rng.uniform(0.9, 1.1, 3)

    def add(cls, s0, v, d, yaw_off=0.0, wlh=None):
        objs.append((cls,) + tuple(size(cls) if wlh is None else wlh) + (s0, v, d, yaw_off))

    def flow(v, d, classes, gap, keep_clear=None):
        """Objects moving at speed v along offset d, covering +-margin around the ego at all times."""
        lo = -margin - max(0.0, v - ego_v) * duration
        hi = margin + max(0.0, ego_v - v) * duration
        s = lo + rng.uniform(0, gap[1])
        while s < hi:
            cls = int(rng.choice(classes))
            wlh = size(cls)
            if keep_clear is None or not keep_clear[0] - wlh[1] / 2 < s < keep_clear[1] + wlh[1] / 2:
                add(cls, s, v, d, 0.0, wlh)
            s += wlh[1] + rng.uniform(*gap)

    # Moving traffic, one speed per lane (so no collisions); the ego's lane moves at the ego's speed.
    lane_classes = [0, 0, 0, 0, 0, 1, 1, 3, 6, 6, 4, 2]
    flow(ego_v, -LANES[0], lane_classes, (10.0, 60.0), keep_clear=(-14.0, 16.0))
    flow(max(1.5, ego_v + rng.uniform(-3.0, 3.0)), -LANES[1], lane_classes, (15.0, 70.0))
    flow(-rng.uniform(4.0, 10.0), LANES[0], lane_classes, (15.0, 70.0))
    flow(-rng.uniform(4.0, 10.0), LANES[1], lane_classes, (15.0, 70.0))
    # Cyclists in the bike lanes (right-hand traffic: d < 0 moves towards +s), pedestrians walking.
    for side in (-1, 1):
        flow(-side * rng.uniform(3.0, 5.5), side * BIKE_D, [7, 6], (40.0, 100.0))
        flow(side * rng.uniform(1.0, 1.6), side * WALK_D[0], [8], (20.0, 80.0))
        flow(-side * rng.uniform(1.0, 1.6), side * WALK_D[1], [8], (20.0, 80.0))

    # Static strips: the parking lanes (parked vehicles, a stopped bus, construction zones) and the
    # sidewalk edge (standing pedestrians, parked cycles, cones). Slots along s never overlap.
    def flip():
        return float(rng.integers(2)) * np.pi

    def parking():
        if rng.uniform() < 0.12:                            # construction zone
            return [(9, rng.uniform(0, 6.3)), (9, rng.uniform(0, 6.3)), (5, np.pi / 2 + flip()), (2, flip()),
                    (5, np.pi / 2 + flip()), (9, rng.uniform(0, 6.3)), (9, rng.uniform(0, 6.3))]
        return [(int(rng.choice([0, 0, 0, 0, 0, 1, 1, 4, 3, 6])), flip())]

    def sidewalk():
        cls = int(rng.choice([8, 8, 8, 7, 7, 6, 9]))
        return [(cls, rng.uniform(0, 2 * np.pi) if cls in (8, 9) else np.pi / 2 + flip())]

    def place(group, s, d):
        """Put a group of static objects one after the other from s; returns the end."""
        for cls, yaw_off in group:
            wlh = size(cls)
            ext = abs(wlh[1] * np.cos(yaw_off)) + abs(wlh[0] * np.sin(yaw_off))   # footprint along s
            # small jitter; none sideways for long vehicles (they fill the parking lane)
            small = wlh[1] < 3.0 and cls != 5
            jitter, yaw_jitter = (rng.uniform(-0.15, 0.15), rng.normal(0, 0.01)) if small else (0.0, 0.0)
            add(cls, s + ext * 0.55, 0.0, d + jitter, yaw_off + yaw_jitter, wlh)
            s += ext * 1.1 + rng.uniform(0.4, 1.5)   # +10 %: arc length shrinks on the inside of a curve
        return s

    def strip(d, choose, reserved, gap):
        s = -margin
        while s < ego_v * duration + margin:
            if reserved and reserved[0] - 26.0 < s < reserved[1]:   # leave room for the anchors (groups < 26 m)
                s = reserved[1] + rng.uniform(0.5, 3.0)
                continue
            s = place(choose(), s, d) + rng.uniform(*gap)

    # Anchors near the scene start, so every class is within its evaluation range from the first
    # sample on (cones/barriers 30 m, cycles/pedestrians 40 m), even for very short scenes.
    end_r = place([(9, 0.3), (5, np.pi / 2), (2, 0.0), (5, np.pi / 2), (9, 1.2), (4, np.pi), (3, 0.0), (1, 0.0)],
                  -12.0, -PARK_D)
    end_l = place([(8, 0.5), (7, np.pi / 2), (6, -np.pi / 2), (9, 2.0), (8, 2.5)], -12.0, SIDEWALK_D)
    strip(-PARK_D, parking, (-12.0, end_r), (3.0, 30.0))
    strip(PARK_D, parking, None, (3.0, 30.0))
    strip(-SIDEWALK_D, sidewalk, None, (6.0, 45.0))
    strip(SIDEWALK_D, sidewalk, (-12.0, end_l), (6.0, 45.0))
    # Buildings (not annotated): blocks behind the sidewalks.
    for side in (-1, 1):
        s = -margin - 40
        while s < ego_v * duration + margin + 40:
            l, w = rng.uniform(12, 35), rng.uniform(8, 16)
            objs.append((-1, w, l, rng.uniform(5, 22), s + l / 2, 0.0, side * (22 + w / 2 + rng.uniform(0, 6)), 0.0))
            s += l + rng.uniform(3, 20)
    a = np.array(objs, np.float64)
    return {'cls': a[:, 0].astype(np.int64), 'wlh': a[:, 1:4], 's0': a[:, 4], 'v': a[:, 5], 'd': a[:, 6],
            'yaw_off': a[:, 7]}


def _object_poses(road, objs, t):
    """Global centre [M, 3] and yaw [M] of every object at time t (s); (s [M]) along the road."""
    s = objs['s0'] + objs['v'] * t
    xy = road.point(s, objs['d'])
    yaw = road.heading(s) + objs['yaw_off'] + np.where(objs['v'] < 0, np.pi, 0.0)
    z = objs['wlh'][:, 2] / 2                               # boxes stand on the ground (z = 0)
    return np.concatenate([xy, z[:, None]], 1), yaw, s


def _object_colours(rng, objs, sun):
    """Per object and face (order -x, +x, -y, +y, -z, +z of the box frame) an RGB colour before the
    sun shading: class colour jittered per instance; +x (front, the heading) tinted light, -x dark."""
    cls = objs['cls']
    base = np.where(cls[:, None] >= 0, COLOUR[np.maximum(cls, 0)], 0).astype(np.float32)
    building = np.array([150, 140, 128], np.float32) * rng.uniform(0.6, 1.2, (len(cls), 1))
    base = np.where(cls[:, None] >= 0, base + rng.uniform(-28, 28, (len(cls), 3)), building)
    faces = np.repeat(base[:, None], 6, 1)                 # [M, 6, 3]
    annotated = cls >= 0
    faces[annotated, 1] = 0.45 * faces[annotated, 1] + 0.55 * np.array([245, 240, 215], np.float32)
    faces[annotated, 0] = 0.55 * faces[annotated, 0]
    return np.clip(faces, 0, 255)


# ----------------------------------------------------------------------------------------------------------
# Rendering.

class Camera:
    """Intrinsics at the output size and the pixel rays in the camera frame (x right, y down, z forward)."""

    def __init__(self, name, image_scale):
        yaw_deg, xyz, f, c, delay = CAMERA_RIG[name]
        self.name, self.delay = name, delay
        self.W, self.H = image_size(image_scale)
        sx, sy = self.W / FULL_W, self.H / FULL_H
        self.K = np.array([[f * sx, 0, sx * (c[0] + 0.5) - 0.5], [0, f * sy, sy * (c[1] + 0.5) - 0.5], [0, 0, 1]])
        psi = np.deg2rad(yaw_deg)
        # columns: camera x (right), y (down), z (forward) in the ego frame
        self.ego_R_cam = np.array([[np.sin(psi), 0, np.cos(psi)], [-np.cos(psi), 0, np.sin(psi)], [0, -1, 0]])
        self.ego_t_cam = np.array(xyz)
        u, v = np.meshgrid(np.arange(self.W, dtype=np.float32), np.arange(self.H, dtype=np.float32))
        pix = np.stack([u.ravel(), v.ravel(), np.ones(u.size, np.float32)], 1)
        self.rays = (pix @ np.linalg.inv(self.K).T.astype(np.float32)).astype(np.float32)   # [H*W, 3]
        # Ground (z = 0) and sky along every ray, in the ego frame: the same for every frame.
        D = self.rays @ self.ego_R_cam.T.astype(np.float32)
        o = self.ego_t_cam
        ground = D[:, 2] < -1e-4
        t = np.where(ground, -o[2] / np.where(ground, D[:, 2], -1.0), np.inf).astype(np.float32)
        xy = o[:2] + t[:, None] * D[:, :2]
        dist = np.hypot(xy[:, 0] - o[0], xy[:, 1] - o[1])
        ground &= dist < 600
        t[~ground] = np.inf
        self.depth, self.ground_idx = t, np.nonzero(ground)[0]
        self.ground_xy = xy[ground].astype(np.float32)
        self.haze = (1.0 - np.exp(-dist[ground] / 160.0)).astype(np.float32)[:, None]
        elev = np.clip(D[:, 2] / np.linalg.norm(D, axis=1), 0, 1)
        a = (np.clip(elev / 0.45, 0, 1) ** 0.7)[:, None]
        self.sky = ((1 - a) * np.array([196, 206, 220]) + a * np.array([85, 130, 200])).astype(np.float32)


class Renderer:
    """Draws one scene's cameras: background (ground, sky) then the boxes, ray-cast with a z-buffer."""

    def __init__(self, road, objs, faces, sun, rng, W, H):
        self.road, self.objs, self.faces, self.sun = road, objs, faces, sun
        tex = rng.standard_normal((256, 256)).astype(np.float32)
        tex = 0.6 * gaussian_filter(tex, 4, mode='wrap') * 4 + 0.4 * gaussian_filter(tex, 1, mode='wrap')
        self.tex = (tex / tex.std()).astype(np.float32)      # tileable, 0.25 m per texel (64 m period)
        self.dash_phase = rng.uniform(0, 9)
        self.lut, self.lut_amp = self._colour_lut()
        self.noise = rng.standard_normal((H + 64, W + 64, 3), np.float32) * 4.0

    def background(self, cam, ego_R, ego_t):
        """Colour [P, 3] and ray depth [P] (inf for sky) of the ground and sky. The world is flat and the
        ego pose is a yaw and a planar position, so each camera's ground hits are fixed in the ego frame
        (Camera.ground_xy): per frame only the move to global and the road texture are computed."""
        g, gxy = cam.ground_idx, cam.ground_xy                 # ground pixels, their ego-frame (x, y)
        gx = ego_R[0, 0] * gxy[:, 0] + ego_R[0, 1] * gxy[:, 1] + np.float32(ego_t[0])
        gy = ego_R[1, 0] * gxy[:, 0] + ego_R[1, 1] * gxy[:, 1] + np.float32(ego_t[1])
        s, d = self.road.coords(gx, gy)
        ad = np.abs(d)
        col = self.lut[np.minimum((ad * 50).astype(np.int32), len(self.lut) - 1)]        # region and lines
        amp = self.lut_amp[np.minimum((ad * 50).astype(np.int32), len(self.lut) - 1)]
        col += (amp * self.tex.ravel()[((gy * 4).astype(np.int32) & 255) * 256 + ((gx * 4).astype(np.int32) & 255)]
                )[:, None]
        dash = (np.abs(ad - 3.3) < 0.08) & (((s + self.dash_phase) % 9.0) < 3.0)       # dashed lane lines
        col[dash] = (215, 215, 210)
        col += cam.haze * (np.array([188, 196, 206], np.float32) - col)
        out = cam.sky.copy()
        out[g] = col
        return out, cam.depth.copy()

    def _colour_lut(self):
        """Ground colour and texture amplitude as a function of |d| (0.02 m steps up to 25 m)."""
        ad = np.arange(1250, dtype=np.float32) / 50 + 0.01
        col = np.empty((ad.size, 3), np.float32)
        col[:] = (72, 96, 52)                                # terrain
        col[ad < SIDEWALK_EDGE] = (168, 162, 150)           # sidewalk
        col[ad < CURB] = (96, 96, 100)                       # parking lane
        col[ad < PARK_EDGE] = (92, 82, 84)                   # bike lane
        col[ad < ROAD_EDGE] = (84, 84, 88)                   # asphalt
        col[(np.abs(ad - ROAD_EDGE) < 0.08) | (np.abs(ad - PARK_EDGE) < 0.06) | (np.abs(ad - CURB) < 0.12)] = \
            (215, 215, 210)                                  # solid lines, curb
        col[np.abs(ad - 0.12) < 0.06] = (215, 175, 40)       # double yellow centre line
        amp = np.where(ad < CURB, 9.0, np.where(ad < SIDEWALK_EDGE, 12.0, 22.0)).astype(np.float32)
        return col, amp

    def render(self, cam, ego_R, ego_t, centres, yaws, candidates, rng):
        """Image uint8 [H, W, 3], and per candidate object the pixels its box covers (hit) and the pixels
        where it is the closest surface (owned); their ratio is its visibility."""
        H, W = cam.H, cam.W
        global_R_cam, global_t_cam = ego_R @ cam.ego_R_cam, ego_R @ cam.ego_t_cam + ego_t
        D = cam.rays @ global_R_cam.T.astype(np.float32)     # [P, 3] global ray directions (not unit)
        o = global_t_cam.astype(np.float32)
        colour, depth = self.background(cam, ego_R, ego_t)
        colour, depth = colour.reshape(H, W, 3), depth.reshape(H, W)
        Dx, Dy, Dz = (D[:, i].reshape(H, W) for i in range(3))
        owner = np.full((H, W), -1, np.int64)
        hits = np.zeros(len(candidates), np.int64)
        # Cull and bound all candidate boxes at once: corners in the camera frame [M, 8, 3].
        unit = np.array([[i, j, q] for i in (-.5, .5) for j in (-.5, .5) for q in (-.5, .5)])
        wlh = self.objs['wlh'][candidates]
        cy_all, sy_all = np.cos(yaws[candidates]), np.sin(yaws[candidates])
        lx, ly = unit[None, :, 0] * wlh[:, None, 1], unit[None, :, 1] * wlh[:, None, 0]
        corners = np.stack([lx * cy_all[:, None] - ly * sy_all[:, None], lx * sy_all[:, None] + ly * cy_all[:, None],
                            unit[None, :, 2] * wlh[:, None, 2]], -1) + centres[candidates][:, None]
        pc = (corners - global_t_cam) @ global_R_cam                     # [M, 8, 3] camera frame
        # Boxes partly behind the camera are clipped by the plane z = NEAR: the 2D bound covers the corners
        # in front and the points where the 12 edges cross the plane (exact for a convex box).
        pa, pb = pc[:, EDGES[:, 0]], pc[:, EDGES[:, 1]]                   # [M, 12, 3]
        za, zb = pa[..., 2:], pb[..., 2:]
        with np.errstate(divide='ignore', invalid='ignore'):
            cut = pa + (NEAR - za) / (zb - za) * (pb - pa)
        pts = np.concatenate([pc, cut], 1)                                 # [M, 20, 3]
        ok = np.concatenate([pc[..., 2] > NEAR, (za[..., 0] > NEAR) != (zb[..., 0] > NEAR)], 1)
        z = np.where(ok, pts[..., 2], 1.0)
        u = np.where(ok, pts[..., 0] / z * cam.K[0, 0] + cam.K[0, 2], np.nan)
        v = np.where(ok, pts[..., 1] / z * cam.K[1, 1] + cam.K[1, 2], np.nan)
        any_front = ok[:, :8].any(1)
        with np.errstate(invalid='ignore'):
            box2d = np.stack([np.floor(np.nanmin(np.where(any_front[:, None], u, 0), 1)),
                              np.floor(np.nanmin(np.where(any_front[:, None], v, 0), 1)),
                              np.ceil(np.nanmax(np.where(any_front[:, None], u, -1), 1)),
                              np.ceil(np.nanmax(np.where(any_front[:, None], v, -1), 1))], 1)
        box2d = np.clip(np.nan_to_num(box2d), -1, max(W, H) + 1).astype(np.int64)
        box2d[:, :2] = np.maximum(box2d[:, :2], 0)
        box2d[:, 2] = np.minimum(box2d[:, 2], W - 1)
        box2d[:, 3] = np.minimum(box2d[:, 3], H - 1)
        todo = np.nonzero(any_front & (box2d[:, 0] <= box2d[:, 2]) & (box2d[:, 1] <= box2d[:, 3]))[0]
        for k in todo:
            m = candidates[k]
            w, l, h = self.objs['wlh'][m]
            c, cy, sy = centres[m], cy_all[k], sy_all[k]
            R = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]])      # global_R_box
            u0, v0, u1, v1 = box2d[k]
            win = np.s_[v0:v1 + 1, u0:u1 + 1]
            dx, dy, dz = Dx[win], Dy[win], Dz[win]
            ol = (o - c) @ R                                 # camera centre in the box frame
            # Slab test in the box frame (x along the length, y the width, z up).
            lo, hi = [], []
            with np.errstate(divide='ignore', invalid='ignore'):
                for dl, ob, half in ((dx * cy + dy * sy, ol[0], l / 2), (dy * cy - dx * sy, ol[1], w / 2),
                                     (dz, ol[2], h / 2)):
                    inv = np.float32(1.0) / dl
                    t1, t2 = (-half - ob) * inv, (half - ob) * inv
                    lo.append((np.minimum(t1, t2), dl))
                    hi.append(np.maximum(t1, t2))
            tnear = np.maximum(np.maximum(lo[0][0], lo[1][0]), lo[2][0])
            tfar = np.minimum(np.minimum(hi[0], hi[1]), hi[2])
            hit = (tnear <= tfar) & (tnear > 0)
            hits[k] = np.count_nonzero(hit)
            if not hits[k]:
                continue
            show = hit & (tnear < depth[win])
            # The face seen is on the slab entered last; its sign is opposite to the ray direction.
            (t0, d0), (t1, d1), (t2, d2) = ((t[show], d[show]) for t, d in lo)     # only the pixels drawn
            axis = np.where((t0 >= t1) & (t0 >= t2), 0, np.where(t1 >= t2, 1, 2))
            face = axis * 2 + (np.where(axis == 0, d0, np.where(axis == 1, d1, d2)) < 0)
            normals = np.concatenate([-R.T, R.T], 0)[[0, 3, 1, 4, 2, 5]]   # -x,+x,-y,+y,-z,+z in global
            shade = 0.42 + 0.58 * np.clip(normals @ self.sun, 0, 1)
            colour[win][show] = (self.faces[m] * shade[:, None])[face]
            depth[win][show] = tnear[show]
            owner[win][show] = k
        owned = np.bincount(owner[owner >= 0], minlength=len(candidates))
        # exposure per image, pixel noise from a per-scene bank at a random offset (cheap, still random)
        oy, ox = rng.integers(0, self.noise.shape[0] - H + 1), rng.integers(0, self.noise.shape[1] - W + 1)
        img = colour * rng.uniform(0.85, 1.15) + self.noise[oy:oy + H, ox:ox + W]
        return np.clip(img, 0, 255).astype(np.uint8), hits, owned


# ----------------------------------------------------------------------------------------------------------
# One scene: poses, images, lidar, tables.

def _pose_matrix(xy, yaw):
    R = np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
    return R, np.array([xy[0], xy[1], 0.0])


def _lidar_points(rng, lidar_t, centres, yaws, wlh, objs_idx, visible, dists):
    """Global points [n, 5] (x, y, z, intensity, ring): ground rings and points on the faces of each
    visible object that face the lidar (count ~ visible fraction * facing area / distance^2)."""
    pts = []
    elev = np.deg2rad(np.linspace(-30.67, -1.5, 24))
    for ring, e in enumerate(elev):
        r = lidar_t[2] / np.tan(-e)
        if r > LIDAR_RANGE:
            continue
        n = int(40 + 6 * r)
        az = rng.uniform(0, 2 * np.pi, n)
        rr = r * rng.uniform(0.97, 1.03, n)
        pts.append(np.stack([lidar_t[0] + rr * np.cos(az), lidar_t[1] + rr * np.sin(az), rng.uniform(-0.05, -0.01, n),
                             rng.uniform(0, 40, n), np.full(n, ring)], 1))
    for m, vis, dist in zip(objs_idx, visible, dists):
        if vis <= 0 or dist > LIDAR_RANGE:
            continue
        w, l, h = wlh[m]
        cy, sy = np.cos(yaws[m]), np.sin(yaws[m])
        R = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]])
        to_lidar = (lidar_t - centres[m]) @ R                 # lidar position in the box frame
        faces = []                                           # (axis, sign, area) of faces towards the lidar
        dims = np.array([l, w, h])
        for axis in range(3):
            sign = np.sign(to_lidar[axis])
            if abs(to_lidar[axis]) > dims[axis] / 2:
                faces.append((axis, sign, np.prod(np.delete(dims, axis))))
        area = sum(f[2] for f in faces)
        n_total = int(np.clip(round(vis * 2500.0 * area / max(dist, 3.0) ** 2), 1, 600))
        for axis, sign, a in faces:
            n = max(1, int(round(n_total * a / area)))
            p = rng.uniform(-0.48, 0.48, (n, 3)) * dims     # inside the box (2 % margin)
            p[:, axis] = sign * dims[axis] / 2 * 0.98
            g = p @ R.T + centres[m]
            pts.append(np.concatenate([g, rng.uniform(20, 120, (n, 1)), np.full((n, 1), 10.0)], 1))
    return np.concatenate(pts, 0)


def _lidar_sweep(path, rng, ego_pose, lidar_R_ego, centres, yaws, wlh, ids, vis, dist):
    """Write one LIDAR_TOP point file (the sensor at the ego pose (g_R_e, g_t_e)) and return
    {object index: (lidar points in its box, visibility)} for the objects `ids` (visibility `vis`,
    distance `dist`), the points counted from what was written, back in the global frame."""
    g_R_e, g_t_e = ego_pose
    lidar_t = g_R_e @ np.array(LIDAR_XYZ) + g_t_e
    pts = _lidar_points(rng, lidar_t, centres, yaws, wlh, ids, vis, dist)
    g_R_l = g_R_e @ lidar_R_ego
    local = np.concatenate([(pts[:, :3] - lidar_t) @ g_R_l, pts[:, 3:]], 1).astype(np.float32)
    local.tofile(path)
    back = local[:, :3].astype(np.float64) @ g_R_l.T + lidar_t
    stats = {}
    radius = np.linalg.norm(wlh[ids], axis=1) / 2 + 0.01
    near = (((back[None, :, :2] - centres[ids][:, None, :2]) ** 2).sum(-1) < radius[:, None] ** 2)  # [n, P]
    for j, (m, v) in enumerate(zip(ids, vis)):
        box = Box(centres[m], wlh[m], Quaternion(yaw_quat(yaws[m])))
        sel = back[near[j]]
        stats[int(m)] = (int(points_in_box(box, sel.T).sum()) if len(sel) else 0, float(v))
    return stats


def _attribute(cls, moving):
    """BEVFormer's test-time attribute rule (mmdet3d's `NuScenesDataset._format_bbox`), so that the GT sent
    through the prediction path scores 1: the attribute name of a class index, moving or not (None for
    barriers and traffic cones)."""
    if cls in (0, 1, 2, 4):
        return 'vehicle.moving' if moving else 'vehicle.parked'
    if cls == 3:
        return 'vehicle.moving' if moving else 'vehicle.stopped'
    if cls in (6, 7):
        return 'cycle.with_rider' if moving else 'cycle.without_rider'
    if cls == 8:
        return 'pedestrian.moving' if moving else 'pedestrian.standing'
    return None


def _annotations(objs, positions, ego_xy, ann_stats, n_samples, seed, tok):
    """The instance and sample_annotation records of a scene: an instance is annotated on every sample
    between the first and the last sample where it is within ANNOTATE_RANGE of the ego (0 lidar points
    where it is out of sight: filtered by users). positions[k] = (centres, yaws, exists) of sample k,
    ego_xy [n_samples, 2], ann_stats[k] = {object: (lidar points, visibility)}."""
    instances, annotations = [], []
    for m in np.nonzero(objs['cls'] >= 0)[0]:
        cls = int(objs['cls'][m])
        d = np.array([np.hypot(*(positions[k][0][m, :2] - ego_xy[k])) for k in range(n_samples)])
        inside = np.nonzero((d < ANNOTATE_RANGE) & np.array([positions[k][2][m] for k in range(n_samples)]))[0]
        if len(inside) == 0 or inside[-1] == inside[0]:
            continue                                         # box_velocity needs >= 2 annotations
        ks = range(inside[0], inside[-1] + 1)
        inst = tok('instance', m)
        moving = objs['v'][m] != 0
        attr = _attribute(cls, moving)
        for k in ks:
            c, yaw = positions[k][0][m], positions[k][1][m]           # (inside the span: within 110 m)
            n_pts, vis = ann_stats[k].get(int(m), (0, 0.0))
            level = '1' if vis < 0.4 else '2' if vis < 0.6 else '3' if vis < 0.8 else '4'
            annotations.append({
                'token': tok('ann', m, k), 'sample_token': tok('sample', k), 'instance_token': inst,
                'visibility_token': level, 'attribute_tokens': [token(seed, 'attribute', attr)] if attr else [],
                'translation': [float(x) for x in c], 'size': [float(x) for x in objs['wlh'][m]],
                'rotation': yaw_quat(yaw), 'prev': tok('ann', m, k - 1) if k > ks[0] else '',
                'next': tok('ann', m, k + 1) if k < ks[-1] else '', 'num_lidar_pts': n_pts, 'num_radar_pts': 0})
        instances.append({'token': inst, 'category_token': token(seed, 'category', CATEGORY[cls]),
                          'nbr_annotations': len(ks), 'first_annotation_token': tok('ann', m, ks[0]),
                          'last_annotation_token': tok('ann', m, ks[-1])})
    return instances, annotations


def _write_map_mask(path, road, extent, path_length):
    """The map mask PNG (0.1 m per pixel, pixel = (x / 0.1, H - y / 0.1)): the drivable surface up to the
    curbs, over the scene's extent (metres, x and y) and the ego's path length along the road."""
    mw, mh = int(np.ceil(extent[0] / 0.1)), int(np.ceil(extent[1] / 0.1))
    mask = Image.new('L', (mw, mh), 0)
    s_line = np.linspace(-200, path_length + 200, 400)
    poly = np.concatenate([road.point(s_line, np.full(400, CURB)), road.point(s_line[::-1], np.full(400, -CURB))])
    ImageDraw.Draw(mask).polygon([(float(x / 0.1), float(mh - y / 0.1)) for x, y in poly], fill=255)
    mask.save(path, compress_level=1)


def _scene(args):
    """Everything of one scene (runs in a worker process): writes its JPEGs, point files and map PNG
    and returns its table records."""
    (out, version, seed, scene_i, name, n_samples, image_scale, t0_us) = args
    rng = np.random.default_rng([seed, scene_i])
    logfile = 'synth-%d-%04d' % (seed, scene_i)
    ego_v = rng.uniform(4.0, 9.0)
    duration = (n_samples - 1) * SAMPLE_DT_US * 1e-6
    kappa = rng.choice([-1, 1]) / rng.uniform(200, 500)
    theta0 = rng.uniform(-np.pi, np.pi)
    # Place the road so that every global coordinate within 75 m of the ego path is >= 0 (map margin,
    # the devkit's `NuScenesExplorer.render_ego_centric_map` crops 40 m x sqrt(2) ~ 57 m around the ego
    # from the map mask).
    probe = Road((0.0, 0.0), theta0, kappa)
    path = probe.point(np.linspace(0, ego_v * duration, 100), np.zeros(100))
    lo, hi = path.min(0) - 75.0, path.max(0) + 75.0
    road = Road(-lo, theta0, kappa)
    extent = hi - lo
    objs = _populate(rng, ego_v, duration)
    sun_az = rng.uniform(0, 2 * np.pi)
    sun = np.array([np.cos(sun_az) * 0.64, np.sin(sun_az) * 0.64, 0.77])
    faces = _object_colours(rng, objs, sun)
    cams = [Camera(c, image_scale) for c in CAMERAS]
    renderer = Renderer(road, objs, faces, sun, rng, cams[0].W, cams[0].H)
    W, H = cams[0].W, cams[0].H

    def tok(*p):
        return token(seed, name, *p)

    scene_tok, log_tok, map_tok = tok('scene'), tok('log'), tok('map')
    cs_tok = {c: tok('calib', c) for c in CAMERAS + ('LIDAR_TOP',)}
    calib = [{'token': cs_tok[c.name], 'sensor_token': token(seed, 'sensor', c.name),
              'translation': [float(x) for x in c.ego_t_cam],
              'rotation': [float(x) for x in Quaternion(matrix=c.ego_R_cam).elements],
              'camera_intrinsic': [[float(x) for x in row] for row in c.K]} for c in cams]
    calib.append({'token': cs_tok['LIDAR_TOP'], 'sensor_token': token(seed, 'sensor', 'LIDAR_TOP'),
                  'translation': list(LIDAR_XYZ), 'rotation': yaw_quat(-np.pi / 2), 'camera_intrinsic': []})
    lidar_R_ego = Quaternion(yaw_quat(-np.pi / 2)).rotation_matrix   # ego_R_lidar

    def ego_at(t_us):
        t = (t_us - t0_us) * 1e-6
        s = ego_v * t
        return road.point(s, -LANES[0]), float(road.heading(s))

    samples, sample_data, ego_poses = [], [], []
    ann_stats = []         # per sample: dict object index -> (num_lidar_pts, visibility fraction)
    positions = []         # per sample: (centres, yaws, exists) of all objects; exists: within
                           # 110 m of the ego along the road (the arc may wrap far beyond)
    ego_xy = []
    for k in range(n_samples):
        ts = t0_us + k * SAMPLE_DT_US
        t = (ts - t0_us) * 1e-6
        centres, yaws, s_obj = _object_poses(road, objs, t)
        exy, eyaw = ego_at(ts)
        ego_xy.append(exy)
        near = np.abs(s_obj - ego_v * t) < 110
        positions.append((centres, yaws, near))
        dist = np.hypot(centres[:, 0] - exy[0], centres[:, 1] - exy[1])
        cand = np.nonzero((dist < RENDER_RANGE) & near)[0]
        hits, owned = np.zeros(len(cand), np.int64), np.zeros(len(cand), np.int64)
        sample_tok = tok('sample', k)
        samples.append({'token': sample_tok, 'timestamp': ts, 'prev': tok('sample', k - 1) if k else '',
                        'next': tok('sample', k + 1) if k + 1 < n_samples else '', 'scene_token': scene_tok})
        for ci, cam in enumerate(cams):
            cts = ts + cam.delay
            cxy, cyaw = ego_at(cts)
            g_R_e, g_t_e = _pose_matrix(cxy, cyaw)
            img, h_, o_ = renderer.render(cam, g_R_e, g_t_e, centres, yaws, cand,
                                          np.random.default_rng([seed, scene_i, k, ci]))
            hits += h_
            owned += o_
            fname = 'samples/%s/%s__%s__%d.jpg' % (cam.name, logfile, cam.name, cts)
            Image.fromarray(img).save(os.path.join(out, fname), quality=90)
            sd_tok = tok('sd', cam.name, k)
            ego_poses.append({'token': sd_tok, 'timestamp': cts, 'rotation': yaw_quat(cyaw),
                              'translation': [float(cxy[0]), float(cxy[1]), 0.0]})
            sample_data.append({'token': sd_tok, 'sample_token': sample_tok, 'ego_pose_token': sd_tok,
                                'calibrated_sensor_token': cs_tok[cam.name], 'timestamp': cts, 'fileformat': 'jpg',
                                'is_key_frame': True, 'height': H, 'width': W, 'filename': fname,
                                'prev': tok('sd', cam.name, k - 1) if k else '',
                                'next': tok('sd', cam.name, k + 1) if k + 1 < n_samples else ''})
        # LIDAR_TOP at the sample timestamp, and each annotated object's lidar points and visibility
        annotated = objs['cls'][cand] >= 0
        ids, vis = cand[annotated], (owned / np.maximum(hits, 1))[annotated]
        fname = 'samples/LIDAR_TOP/%s__LIDAR_TOP__%d.pcd.bin' % (logfile, ts)
        ann_stats.append(_lidar_sweep(os.path.join(out, fname), np.random.default_rng([seed, scene_i, k, 99]),
                                      _pose_matrix(exy, eyaw), lidar_R_ego, centres, yaws, objs['wlh'], ids, vis,
                                      dist[ids]))
        sd_tok = tok('sd', 'LIDAR_TOP', k)
        ego_poses.append({'token': sd_tok, 'timestamp': ts, 'rotation': yaw_quat(eyaw),
                          'translation': [float(exy[0]), float(exy[1]), 0.0]})
        sample_data.append({'token': sd_tok, 'sample_token': sample_tok, 'ego_pose_token': sd_tok,
                            'calibrated_sensor_token': cs_tok['LIDAR_TOP'], 'timestamp': ts, 'fileformat': 'pcd',
                            'is_key_frame': True, 'height': 0, 'width': 0, 'filename': fname,
                            'prev': tok('sd', 'LIDAR_TOP', k - 1) if k else '',
                            'next': tok('sd', 'LIDAR_TOP', k + 1) if k + 1 < n_samples else ''})

    instances, annotations = _annotations(objs, positions, np.array(ego_xy), ann_stats, n_samples, seed, tok)
    _write_map_mask(os.path.join(out, 'maps', map_tok + '.png'), road, extent, ego_v * duration)

    scene = {'token': scene_tok, 'log_token': log_tok, 'nbr_samples': n_samples,
             'first_sample_token': samples[0]['token'], 'last_sample_token': samples[-1]['token'], 'name': name,
             'description': 'synthetic, seed %d, curve radius %.0f m, ego %.1f m/s' % (seed, abs(1 / kappa), ego_v)}
    log = {'token': log_tok, 'logfile': logfile, 'vehicle': 'synth', 'date_captured': '2018-07-24',
           'location': 'synthetic'}
    map_rec = {'category': 'semantic_prior', 'token': map_tok, 'filename': 'maps/%s.png' % map_tok,
               'log_tokens': [log_tok]}
    return {'scene': [scene], 'log': [log], 'map': [map_rec], 'sample': samples, 'sample_data': sample_data,
            'ego_pose': ego_poses, 'calibrated_sensor': calib, 'instance': instances,
            'sample_annotation': annotations}


def write_synthetic_world(out, version='v1.0-mini', train_scenes=None, val_scenes=None, samples_per_scene=40,
                          image_scale=0.25, seed=0, workers=None, progress=True):
    """Write a nuScenes-format world to `out` (see the module docstring). train_scenes / val_scenes: how
    many scenes of the official split (None: all of v1.0-mini's 8 + 2; for v1.0-trainval 8 + 2 too).
    workers: processes used for rendering (default: min(2, CPUs), or 0 (this process) below 40 samples).
    Returns a dict of statistics (seconds, bytes, samples, annotations)."""
    start = time.time()
    if version == 'v1.0-trainval':
        train_scenes = 8 if train_scenes is None else train_scenes
        val_scenes = 2 if val_scenes is None else val_scenes
    train, val = split_scene_names(version, train_scenes, val_scenes)
    if samples_per_scene < 2:
        raise WorldSpecError('--samples-per-scene %d: expected at least 2 (box velocities need two samples)'
                         % samples_per_scene)
    if not 0.02 <= image_scale <= 1.0:
        raise WorldSpecError('--image-scale %g: expected a fraction of 1600x900 in [0.02, 1]' % image_scale)
    # A new folder is written under a temporary name and renamed at the end, so an interrupted run never
    # leaves a half world that looks complete (train.py writes the world when the folder is missing).
    final, fresh = out, not os.path.exists(out)
    if fresh:
        out = out.rstrip('/\\') + '.partial'
        if os.path.isdir(out):
            shutil.rmtree(out)
    for sub in [version, 'maps'] + ['samples/' + c for c in CAMERAS + ('LIDAR_TOP',)]:
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    names = train + val
    t0 = 1532402927000000
    jobs = [(out, version, seed, i, n, samples_per_scene, image_scale, t0 + i * 3600 * 1000000)
            for i, n in enumerate(names)]
    if workers is None:                                     # processes only pay off for real worlds
        workers = min(2, os.cpu_count() or 1) if len(jobs) * samples_per_scene >= 40 else 0
    bar = tqdm(total=len(jobs), desc='synthetic world', unit='scene', disable=not progress)
    if workers > 0 and len(jobs) > 1:
        import multiprocessing as mp
        ctx = mp.get_context('fork' if 'fork' in mp.get_all_start_methods() else 'spawn')
        with ctx.Pool(workers) as pool:
            results = []
            for r in pool.imap(_scene, jobs):                # ordered: tables do not depend on timing
                results.append(r)
                bar.update()
    else:
        results = []
        for j in jobs:
            results.append(_scene(j))
            bar.update()
    bar.close()
    tables = {t: [] for t in ('scene', 'log', 'map', 'sample', 'sample_data', 'ego_pose', 'calibrated_sensor',
                              'instance', 'sample_annotation')}
    for r in results:
        for t in tables:
            tables[t] += r[t]
    tables['sensor'] = [{'token': token(seed, 'sensor', c), 'channel': c, 'modality': 'camera'} for c in CAMERAS] + \
                       [{'token': token(seed, 'sensor', 'LIDAR_TOP'), 'channel': 'LIDAR_TOP', 'modality': 'lidar'}]
    tables['category'] = [{'token': token(seed, 'category', c), 'name': c, 'description': 'synthetic ' + c}
                          for c in CATEGORY]
    tables['attribute'] = [{'token': token(seed, 'attribute', a), 'name': a, 'description': ''} for a in ATTRIBUTES]
    tables['visibility'] = [{'token': t, 'level': lv, 'description': 'visible fraction in the cameras ' + lv}
                            for t, lv in VISIBILITY]
    for name, records in tables.items():
        with open(os.path.join(out, version, name + '.json'), 'w') as f:
            json.dump(records, f, separators=(',', ':'))
    if fresh:
        os.replace(out, final)
        out = final
    size = 0
    for root, _, files in os.walk(out):
        size += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return {'seconds': time.time() - start, 'bytes': size, 'scenes': len(names), 'samples': len(tables['sample']),
            'annotations': len(tables['sample_annotation']), 'image_size': image_size(image_scale)}
