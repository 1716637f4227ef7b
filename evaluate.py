"""Evaluate a detector with the official nuScenes metrics, draw its boxes, time it.

    python evaluate.py --ckpt runs/cpu-tiny/last.pt                     # val: NDS, mAP, per-class table
    python evaluate.py --oracle --dataroot data/synthetic --out runs/oracle   # GT through the same path
    python evaluate.py --ckpt X.pt --vis 4                                # pictures under OUT/vis/
    python evaluate.py --ckpt X.pt --vis-attention 2                      # TSA/SCA/decoder sampling points
    python evaluate.py --speed --model cpu-tiny [--ckpt X.pt]             # latency, FPS, params, GFLOPs
    python evaluate.py --bench                                            # params, GMACs, CPU step per preset
    python evaluate.py --profile-step cpu-tiny [--set queue_length=1]     # one CPU step, part by part
    python evaluate.py --bench-distill cpu [--device cuda]                # one FD3D step, part by part
    python evaluate.py --ckpt A.pt --vis-focal 4 [--teacher E.pt]         # FD3D focal areas under OUT/vis_focal/
    python evaluate.py --ckpt X.pt --dataroot /data/nuscenes --version v1.0-test --split test --format-only
    python evaluate.py --ckpt bevformer_tiny_epoch_24.pth --dataroot /data/nuscenes   # official, as it is

The path from a prediction to a score is written once here and used by train.py too:
  model.predict per sample, each scene in time order with its temporal state (the official
  BEVFormer.forward_test's prev_frame_info)
  -> boxes in the LIDAR_TOP frame, our layout [x, y, z, w, l, h, yaw, vx, vy]
  -> devkit Box, lidar -> ego (LIDAR_TOP calibrated_sensor), class range filter in the ego frame,
     ego -> global (LIDAR_TOP ego_pose), attribute rule (mmdet3d's NuScenesDataset._format_bbox)
  -> results_nusc.json -> the devkit's DetectionEval -> metrics_summary.json and the table.
`--oracle` sends the ground truth through exactly this path, so a convention bug (a swapped w/l, the
old mmdet3d yaw, a missing calibration step) shows up as NDS < 1 before any GPU time is spent.

Models are built by models.py (a preset, a checkpoint of ours or an official mmdet3d one as it is).
`--bench` prints the cost of every preset (parameters, multiply-adds, CPU training step) from a synthetic
batch (`example_batch`), no data needed; `--bench-distill PAIR` times one FD3D training step part by
part (expert forward, apprentice forward and backward, distillation losses, and the overhead over the
apprentice alone). `--vis-focal K` draws FD3D's focal areas and sampling points as distill.Distiller
sees them.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time

# idle torch threads sleep instead of spinning, as in train.py (the reason is there), so that --bench,
# --profile-step and --speed time a step under the policy a run trains with; set before torch loads
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import numpy as np
import torch
from pyquaternion import Quaternion

import data
import bevformer
import distill
import models
from common import keep_freed_memory, streams
from data import InputError

# ------------------------------------------------------------------------------------------------
# Predictions: every scene in time order with the model's temporal state


def eval_set_name(version, split):
    """The devkit's split name DetectionEval needs (the devkit's `mini_val`/`val`/`test`; docs/data.md)."""
    if split == 'test':
        return 'test'
    return f'mini_{split}' if version.endswith('mini') else split


def scene_groups(ds):
    """Dataset indices grouped by scene, each in time order (ds.sample_tokens is sorted per scene)."""
    groups = {}
    for i, token in enumerate(ds.sample_tokens):
        groups.setdefault(ds.nusc.get('sample', token)['scene_token'], []).append(i)
    return list(groups.values())


def _as_numpy(det):
    return {k: det[k].detach().float().cpu().numpy() if k != 'labels' else det[k].cpu().numpy()
            for k in ('boxes', 'scores', 'labels')}


def eval_dataset(dataroot, version, split, cfg):
    """The split as the model's preset loads it for evaluation (data.view_of: its image size and image
    loading, its CAN-bus fallback; queue_length 1, because history comes from `predict`'s state).
    train.py's periodic evaluation and this file's --ckpt evaluation both use it."""
    return data.NuScenesDataset(dataroot, version=version, split=split, train=False,
                                view=data.view_of(cfg, queue_length=1))


@torch.no_grad()
def predict_split(model, ds, device, rank=0, world=1, workers=0, progress=True):
    """{sample_token: {'boxes' [K, 9], 'scores' [K], 'labels' [K]}} (numpy, LIDAR_TOP frame).

    Each scene runs in time order through `model.predict`, whose `state` carries the previous BEV
    and pose (the official BEVFormer.forward_test's prev_frame_info; it resets itself at a new scene
    token). Under torchrun whole scenes go to each rank, so the temporal chain is never cut, and rank 0
    gathers the results.
    The dataset must be built with queue_length=1: history comes from the state, not from the loader.
    """
    was_training = model.training
    model.eval()
    groups = scene_groups(ds)[rank::world]
    order = [i for g in groups for i in g]
    # batch_size=None: items come one by one, uncollated; workers only prefetch in order.
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, order), batch_size=None,
                                         num_workers=workers, generator=torch.Generator())
    preds, state = {}, None
    for item in _progress(loader, total=len(order), desc=f'predict {len(order)} samples', on=progress and rank == 0):
        res = model.predict(item['img'].to(device), item['lidar2img'].to(device),
                            can_bus=item['can_bus'].to(device), state=state,
                            img_shape=item['img_shape'], scene_token=item['scene_token'])
        state = res['state']
        preds[item['sample_token']] = _as_numpy(res)
    model.train(was_training)
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, preds)
        preds = {k: v for part in gathered for k, v in part.items()}
    return preds


def _progress(iterable, total, desc, on):
    if not on:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, leave=False)


def ground_truth_as_predictions(ds, progress=True):
    """The dataset's GT boxes with score 1, in the shape predict_split returns (for --oracle)."""
    preds = {}
    for i in _progress(range(len(ds)), total=len(ds), desc='oracle', on=progress):
        item = ds[i]
        k = len(item['gt_labels'])
        preds[item['sample_token']] = {'boxes': item['gt_boxes'].numpy().astype(np.float64),
                                       'scores': np.ones(k), 'labels': item['gt_labels'].numpy()}
    return preds


# ------------------------------------------------------------------------------------------------
# Predictions -> nuScenes submission (as mmdet3d's NuScenesDataset._format_bbox)

# Attribute rule of the official code: a moving object gets its class's "moving" attribute, a still
# one its "still" attribute; DEFAULT_ATTRIBUTE otherwise.
MOVING_ATTRIBUTE = {'car': 'vehicle.moving', 'construction_vehicle': 'vehicle.moving', 'bus': 'vehicle.moving',
                    'truck': 'vehicle.moving', 'trailer': 'vehicle.moving',
                    'bicycle': 'cycle.with_rider', 'motorcycle': 'cycle.with_rider'}
STILL_ATTRIBUTE = {'pedestrian': 'pedestrian.standing', 'bus': 'vehicle.stopped'}
DEFAULT_ATTRIBUTE = {'car': 'vehicle.parked', 'truck': 'vehicle.parked', 'trailer': 'vehicle.parked',
                     'construction_vehicle': 'vehicle.parked', 'bus': 'vehicle.moving',
                     'pedestrian': 'pedestrian.moving', 'bicycle': 'cycle.without_rider',
                     'motorcycle': 'cycle.without_rider', 'barrier': '', 'traffic_cone': ''}


def attribute_name(name, velocity):
    speed = math.hypot(velocity[0], velocity[1])
    table = MOVING_ATTRIBUTE if speed > 0.2 else STILL_ATTRIBUTE
    return table.get(name, DEFAULT_ATTRIBUTE[name])


def lidar_boxes(boxes, scores, labels):
    """Our [K, 9] LIDAR_TOP boxes as devkit Boxes in the same frame (centre, wlh and yaw are already
    nuScenes-native, so this is a plain repackaging: no -yaw - pi/2 as in mmdet3d)."""
    from nuscenes.utils.data_classes import Box
    out = []
    for b, s, l in zip(boxes, scores, labels):
        out.append(Box(center=[float(b[0]), float(b[1]), float(b[2])], size=[float(b[3]), float(b[4]), float(b[5])],
                       orientation=Quaternion(axis=[0.0, 0.0, 1.0], radians=float(b[6])),
                       velocity=(float(b[7]), float(b[8]), 0.0), label=int(l), score=float(s),
                       name=data.CLASSES[int(l)]))
    return out


def lidar_pose(nusc, sample_token):
    """(calibrated_sensor, ego_pose) records of the sample's LIDAR_TOP sample_data."""
    sd = nusc.get('sample_data', nusc.get('sample', sample_token)['data']['LIDAR_TOP'])
    return nusc.get('calibrated_sensor', sd['calibrated_sensor_token']), nusc.get('ego_pose', sd['ego_pose_token'])


def to_global(nusc, sample_token, boxes, class_range=None):
    """Devkit Boxes in the LIDAR_TOP frame -> global frame, in place; with class_range, boxes farther
    than their class's range from the ego (planar, in the ego frame) are dropped first."""
    cs, pose = lidar_pose(nusc, sample_token)
    kept = []
    for box in boxes:
        box.rotate(Quaternion(cs['rotation']))      # lidar -> ego (velocity turns with the box)
        box.translate(np.array(cs['translation']))
        if class_range is not None and np.linalg.norm(box.center[:2]) > class_range[box.name]:
            continue
        box.rotate(Quaternion(pose['rotation']))    # ego -> global
        box.translate(np.array(pose['translation']))
        kept.append(box)
    return kept


def to_submission(nusc, preds, sample_tokens):
    """nuScenes detection submission dict: every token of the split present (an empty list if none)."""
    from nuscenes.eval.common.config import config_factory
    class_range = config_factory('detection_cvpr_2019').class_range
    results = {}
    for token in sample_tokens:
        p = preds[token]
        entries = []
        for box in to_global(nusc, token, lidar_boxes(p['boxes'], p['scores'], p['labels']), class_range):
            entries.append({'sample_token': token, 'translation': box.center.tolist(), 'size': box.wlh.tolist(),
                            'rotation': box.orientation.elements.tolist(), 'velocity': box.velocity[:2].tolist(),
                            'detection_name': box.name, 'detection_score': float(box.score),
                            'attribute_name': attribute_name(box.name, box.velocity)})
        results[token] = entries
    meta = {'use_camera': True, 'use_lidar': False, 'use_radar': False, 'use_map': False, 'use_external': False}
    return {'meta': meta, 'results': results}


def write_json(path, obj):
    """Atomic JSON write (temp file + os.replace)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# Official metrics


def score(nusc, result_path, eval_set, out_dir, verbose=True):
    """Run the devkit's DetectionEval: it writes out_dir/metrics_summary.json (and metrics_details.json)
    and prints its table; we add a note for TP errors that are 1.0 only because recall < 10%."""
    from nuscenes.eval.common.config import config_factory
    from nuscenes.eval.detection.data_classes import DetectionMetricDataList
    from nuscenes.eval.detection.evaluate import DetectionEval
    cfg = config_factory('detection_cvpr_2019')
    os.makedirs(out_dir, exist_ok=True)
    evaluator = DetectionEval(nusc, cfg, result_path=result_path, eval_set=eval_set, output_dir=out_dir,
                              verbose=verbose)
    summary = evaluator.main(plot_examples=0, render_curves=False)
    with open(os.path.join(out_dir, 'metrics_details.json')) as f:
        details = DetectionMetricDataList.deserialize(json.load(f))
    # calc_tp returns 1.0 when the highest recall reached at the 2 m threshold is below min_recall.
    first = round(100 * cfg.min_recall) + 1
    low = [c for c in cfg.class_names if details[(c, cfg.dist_th_tp)].max_recall_ind < first]
    if low:
        print(f"\nnote: TP errors of 1.0 for {', '.join(low)}: recall at the {cfg.dist_th_tp:g} m threshold "
              f"stays below {cfg.min_recall:.0%}, so the devkit cannot measure these errors and writes 1.0 "
              f"(the worst value), not a measured error.")
    return summary


def evaluate_split(model, ds, out_dir, device, eval_set, rank=0, world=1, workers=0, vis=0, progress=True):
    """Predict the whole split, write OUT/results_nusc.json, score it on rank 0. Returns the devkit's
    metrics summary on rank 0 (None elsewhere). Used by train.py for its periodic and final evaluation."""
    preds = predict_split(model, ds, device, rank, world, workers, progress)
    if rank != 0:
        return None
    result_path = os.path.join(out_dir, 'results_nusc.json')
    write_json(result_path, to_submission(ds.nusc, preds, ds.sample_tokens))
    summary = score(ds.nusc, result_path, eval_set, out_dir, verbose=progress)
    if vis:
        visualise(ds, preds, os.path.join(out_dir, 'vis'), vis)
    return summary


def print_last_line(summary):
    print(f"NDS {summary['nd_score']:.4f} mAP {summary['mean_ap']:.4f}", flush=True)


# ------------------------------------------------------------------------------------------------
# Pictures: six cameras with projected boxes, and a bird's-eye view; FD3D's focal areas (--vis-focal)

PRED_COLOUR, GT_COLOUR = 'tab:red', 'tab:green'


def visualise(ds, preds, out_dir, k, score_threshold=0.3):
    """K samples spread over the split: OUT/vis/<i>_<token>.png with the six cameras (boxes projected
    with the devkit's view_points through Box.render) and a BEV plot in the LIDAR_TOP frame."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from PIL import Image
    from nuscenes.utils.geometry_utils import BoxVisibility, box_in_image
    os.makedirs(out_dir, exist_ok=True)
    nusc = ds.nusc
    picks = np.unique(np.linspace(0, len(ds) - 1, min(k, len(ds))).round().astype(int))
    for n, i in enumerate(picks):
        token = ds.sample_tokens[i]
        gt = ds[i]
        p = preds[token]
        keep = p['scores'] >= score_threshold
        sets = [(lidar_boxes(p['boxes'][keep], p['scores'][keep], p['labels'][keep]), PRED_COLOUR),
                (lidar_boxes(gt['gt_boxes'].numpy(), np.ones(len(gt['gt_labels'])), gt['gt_labels'].numpy()),
                 GT_COLOUR)]
        fig = plt.figure(figsize=(24, 7.5))
        grid = fig.add_gridspec(2, 4)
        sample = nusc.get('sample', token)
        for c, cam in enumerate(data.CAMERAS):
            ax = fig.add_subplot(grid[c // 3, c % 3])
            sd = nusc.get('sample_data', sample['data'][cam])
            cs = nusc.get('calibrated_sensor', sd['calibrated_sensor_token'])
            pose = nusc.get('ego_pose', sd['ego_pose_token'])
            intrinsic = np.array(cs['camera_intrinsic'])
            ax.imshow(Image.open(os.path.join(nusc.dataroot, sd['filename'])))
            for boxes, colour in sets:
                for box in to_global(nusc, token, [b.copy() for b in boxes]):
                    # global -> this camera's ego pose -> camera (the camera's own timestamp)
                    box.translate(-np.array(pose['translation']))
                    box.rotate(Quaternion(pose['rotation']).inverse)
                    box.translate(-np.array(cs['translation']))
                    box.rotate(Quaternion(cs['rotation']).inverse)
                    if box_in_image(box, intrinsic, (sd['width'], sd['height']), vis_level=BoxVisibility.ANY):
                        box.render(ax, view=intrinsic, normalize=True, colors=(colour,) * 3, linewidth=1)
            ax.set_xlim(0, sd['width'])
            ax.set_ylim(sd['height'], 0)
            ax.set_title(cam, fontsize=9)
            ax.axis('off')
        ax = fig.add_subplot(grid[:, 3])
        for boxes, colour in sets:
            for box in boxes:   # LIDAR_TOP frame: x right, y forward
                box.render(ax, view=np.eye(4), normalize=False, colors=(colour,) * 3, linewidth=1)
        ax.plot(0, 0, 'k^')
        ax.set_xlim(-51.2, 51.2)
        ax.set_ylim(-51.2, 51.2)
        ax.set_aspect('equal')
        ax.set_title(f'BEV (LIDAR_TOP): prediction (score >= {score_threshold}) red, GT green', fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f'{n:03d}_{token}.png'), dpi=70)
        plt.close(fig)
    print(f'wrote {len(picks)} pictures to {out_dir}')


# What TSA, SCA and the decoder look at (`--vis-attention K`), for one val sample of a BEVFormer: hooks on
# the last encoder layer (TSA's and SCA's inputs, SCA's deformable attention) and the last decoder layer
# record one `model.predict` call; nothing in the model changes.

@torch.no_grad()
def record_attention(model, item, state):
    """model.predict on one dataset item (history from `state`, as `predict_split` chains it), recording
    the last encoder layer's TSA sampling points (`TemporalSelfAttention.sampling_points`), its SCA
    inputs (the per-camera BEV cells, `compact_cameras`) and sampling points, and the last decoder
    layer's BEV sampling points and class logits. Returns (predict's result, record dict)."""
    layer, dec = model.encoder.layers[-1], model.decoder.layers[-1]
    rec = {}

    def keep(name, outputs=False):
        if outputs:
            return lambda module, args, out: rec.__setitem__(name, out)
        return lambda module, args: rec.__setitem__(name, args)

    hooks = [layer.tsa.register_forward_pre_hook(keep('tsa')), layer.sca.register_forward_pre_hook(keep('sca')),
             layer.sca.deformable_attention.register_forward_hook(keep('sca_out', True)),
             dec.cross_attn.register_forward_pre_hook(keep('dec')),
             dec.cross_attn.register_forward_hook(keep('dec_out', True)),
             model.cls_branches[-1].register_forward_hook(keep('cls', True))]
    try:
        res = model.predict(item['img'], item['lidar2img'], can_bus=item['can_bus'], state=state,
                            img_shape=item['img_shape'], scene_token=item['scene_token'])
    finally:
        for h in hooks:
            h.remove()
    x, pos, prev, cur, ref_prev, ref_cur, bev_hw = rec['tsa']
    tsa_loc, tsa_aw = layer.tsa.sampling_points(x, pos, prev, ref_prev, ref_cur, bev_hw)   # [2, Q, M, 1, P, ..]
    cams = rec['sca'][3]
    return res, {'prev_bev': prev[0], 'tsa_loc': tsa_loc[0], 'tsa_aw': tsa_aw[0],          # slot 0: previous BEV
                 'idx': cams['idx'][0], 'valid': cams['valid'][0], 'anchors': cams['ref'],   # [N, R], [N, R, Z, 2]
                 'sca_loc': rec['sca_out'][1], 'sca_aw': rec['sca_out'][2],                 # [N, R, M, L, P, ..]
                 'bev': rec['dec'][2][0], 'dec_loc': rec['dec_out'][1][0], 'dec_aw': rec['dec_out'][2][0],
                 'cls': rec['cls'][0],
                 'has_prev': model.cfg.queue_length > 1 and state is not None and state.get('bev') is not None}


def cells_on_objects(boxes, cfg, k):
    """Flat BEV indices q = row * W + col of the cells under the centres of up to k GT boxes [K, 9], one
    per cell: boxes 8 to 35 m away first (whole in a camera image), nearest first."""
    x0, y0, _, x1, y1, _ = cfg.pc_range
    dist = boxes[:, :2].norm(dim=1)
    order = torch.argsort(dist + 1000.0 * ((dist < 8) | (dist > 35)))
    cells = []
    for b in boxes[order]:
        col = int((b[0] - x0) / (x1 - x0) * cfg.bev_w)
        row = int((b[1] - y0) / (y1 - y0) * cfg.bev_h)
        q = row * cfg.bev_w + col
        if 0 <= col < cfg.bev_w and 0 <= row < cfg.bev_h and q not in cells:
            cells.append(q)
        if len(cells) == k:
            break
    return cells


def cameras_hit(rec, q):
    """{camera index: (its row r in the per-camera lists)} for BEV cell q (SCA's compaction)."""
    hit = (rec['idx'] == q) & (rec['valid'] > 0)                                   # [N, R]
    return {int(n): int(r) for n, r in zip(*torch.nonzero(hit, as_tuple=True))}


def _metres(uv, pc_range):
    """Normalised BEV (x, y) [..., 2] -> metres in the LIDAR_TOP frame (x, y), each [...]."""
    x0, y0, _, x1, y1, _ = pc_range
    return x0 + uv[..., 0] * (x1 - x0), y0 + uv[..., 1] * (y1 - y0)


def vis_attention(model, ds, i, path, cells=4, objects=4):
    """One PNG for sample i of `ds` (eval_dataset): TSA's sampling points in the aligned previous BEV
    for `cells` BEV cells on GT objects (last encoder layer; the previous frame of the scene is run
    first), the same cells' pillar anchors and SCA sampling points in every camera they hit, and the
    decoder's sampling points of the `objects` best-scoring queries over the current BEV. Marker size
    ~ attention weight. Returns {cell q: sorted camera indices it hits}."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    cfg = model.cfg
    x0, y0, _, x1, y1, _ = cfg.pc_range
    item = ds[i]
    state = None
    if i > 0 and ds.scene_index[i - 1] == ds.scene_index[i]:                  # the previous frame first
        state = record_attention(model, ds[i - 1], None)[0]['state']
    res, rec = record_attention(model, item, state)
    colours = plt.get_cmap('tab10').colors
    qs = cells_on_objects(item['gt_boxes'], cfg, cells)
    fig = plt.figure(figsize=(22, 9))
    grid = fig.add_gridspec(2, 4)
    extent = (x0, x1, y0, y1)
    # TSA: the aligned previous BEV (feature norm) and, per cell, its sampling points in it
    ax = fig.add_subplot(grid[0, 0])
    ax.imshow(rec['prev_bev'].float().norm(dim=-1).view(cfg.bev_h, cfg.bev_w).cpu(), origin='lower', cmap='gray',
              extent=extent)
    for g in item['gt_boxes'].float():
        ax.add_patch(plt.Polygon(_footprint(g), fill=False, ec='lime', ls='--', lw=0.8))
    for c, q in enumerate(qs):
        px, py = _metres(rec['tsa_loc'][q].float().cpu(), cfg.pc_range)                         # [M, 1, P] each
        ax.scatter(px.flatten(), py.flatten(), s=4 + 60 * rec['tsa_aw'][q].float().cpu().flatten(),
                   color=colours[c], alpha=0.8, linewidths=0)
        cx, cy = _metres(bevformer.bev_grid(cfg, 'cpu')[q], cfg.pc_range)
        ax.plot(float(cx), float(cy), '*', color=colours[c], ms=12, mec='white')
    what = ('the aligned previous BEV' if rec['has_prev'] else
            'no previous BEV here (first frame, or a single-frame preset): the current queries')
    ax.set_title(f'TSA (last encoder layer): cells (*) on GT objects (green) and their points in\n{what}',
                 fontsize=9)
    # decoder: the current BEV, the best queries' sampling points, their boxes and the GT
    ax2 = fig.add_subplot(grid[1, 0])
    ax2.imshow(rec['bev'].float().norm(dim=-1).view(cfg.bev_h, cfg.bev_w).cpu(), origin='lower', cmap='gray',
               extent=extent)
    for g in item['gt_boxes'].float():
        ax2.add_patch(plt.Polygon(_footprint(g), fill=False, ec='lime', ls='--', lw=0.8))
    top = rec['cls'].float().sigmoid().max(-1).values.topk(min(objects, rec['cls'].shape[0])).indices
    for c, qi in enumerate(top.tolist()):
        px, py = _metres(rec['dec_loc'][qi].float().cpu(), cfg.pc_range)
        ax2.scatter(px.flatten(), py.flatten(), s=4 + 60 * rec['dec_aw'][qi].float().cpu().flatten(),
                    color=colours[(c + 4) % 10], alpha=0.8, linewidths=0)
    for b, s in zip(res['boxes'].float().cpu(), res['scores'].float().cpu()):
        if s >= 0.3:
            ax2.add_patch(plt.Polygon(_footprint(b), fill=False, ec='red', lw=0.8))
    ax2.set_title(f'decoder (last layer): points of the {len(top)} best queries;\nboxes >= 0.3 red, GT green',
                  fontsize=9)
    for a in (ax, ax2):
        a.set_xlim(x0, x1)
        a.set_ylim(y0, y1)
        a.set_xlabel('x (m, LIDAR_TOP)', fontsize=8)
        a.set_ylabel('y (m)', fontsize=8)
    # SCA: per camera, the cells' pillar anchors (x, joined) and their sampling points
    Hp, Wp = item['img'].shape[-2:]
    h, w = (int(v) for v in item['img_shape'])
    scale = torch.tensor([Wp, Hp], dtype=torch.float32)                       # normalised -> pixels
    rows = {q: cameras_hit(rec, q) for q in qs}                              # cell -> {camera: row r}
    for n, cam in enumerate(data.CAMERAS[:item['img'].shape[0]]):
        ax = fig.add_subplot(grid[n // 3, 1 + n % 3])
        ax.imshow(item['img'][n, :, :h, :w].permute(1, 2, 0).clamp(0, 255).byte().cpu().numpy())
        for c, q in enumerate(qs):
            r = rows[q].get(n)
            if r is None:
                continue
            anchors = rec['anchors'][n, r].float().cpu() * scale                  # [Z, 2] pixels
            pts = rec['sca_loc'][n, r].float().cpu() * scale                      # [M, L, P, 2]
            ax.plot(anchors[:, 0], anchors[:, 1], 'x-', color=colours[c], ms=6, lw=0.8)
            weight = rec['sca_aw'][n, r].float().cpu().flatten()                  # [M * L * P]
            ax.scatter(pts[..., 0].flatten(), pts[..., 1].flatten(), s=4 + 60 * weight, color=colours[c],
                       alpha=0.8, linewidths=0)
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_title(f'{cam}: SCA pillar anchors (x) and points of the cells it sees', fontsize=9)
        ax.axis('off')
    fig.suptitle(f'{cfg.name}: sample {ds.sample_tokens[i]} (marker size ~ attention weight)', fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return {q: sorted(cams) for q, cams in rows.items()}


def attention_pictures(model, ds, k, out_dir):
    """`--vis-attention K`: K samples spread over the split, each not the first of its scene (so that TSA
    has a previous BEV) -> OUT/vis_attention/<n>_<token>.png. BEVFormer presets only."""
    if model.cfg.detector != 'bevformer':
        raise InputError(f'--vis-attention: BEVFormer checkpoints only (this one is {model.cfg.detector})')
    later = [i for i in range(len(ds)) if i > 0 and ds.scene_index[i - 1] == ds.scene_index[i]] or [0]
    picks = sorted({later[int(j)] for j in np.linspace(0, len(later) - 1, max(1, k)).round()})
    os.makedirs(out_dir, exist_ok=True)
    model.eval()
    for n, i in enumerate(picks):
        vis_attention(model, ds, i, os.path.join(out_dir, f'{n:03d}_{ds.sample_tokens[i]}.png'))
    print(f'wrote {len(picks)} attention pictures to {out_dir}')
    return picks


# FD3D pictures (`--vis-focal K`): what distill.py's Distiller distils from, drawn for one sample: the
# selected expert queries, their focal areas and sampling points over both BEV maps (DETR3D: per camera)

def _footprint(box):
    """The 4 ground corners (x, y) of one box [9], in drawing order -> [4, 2]."""
    return distill.box_corners(box[None], 1.0)[0, [2, 3, 7, 6], :2]


@torch.no_grad()
def vis_focal(distiller, batch, path):
    """One PNG for the first sample of `batch` (collated, at the expert's resolution) with the
    distill.Distiller's own inputs, queries and areas. BEVFormer: the expert's and the
    apprentice's BEV maps (per-cell feature norm, in metres), the BEV focal area (yellow outline), the
    selected expert queries' boxes (red), their last decoder layer's sampling points (cyan, size ~
    attention weight) and the GT boxes (green, dashed); DETR3D: one column per camera
    (`_draw_pv_focal`). Returns the number of selected queries."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    d = distiller
    batch_e, batch_a = distill.model_inputs(batch, d.expert.cfg, d.apprentice.cfg, d.expert_input)
    was_training = d.apprentice.training
    d.apprentice.eval()
    out_a = d.apprentice(batch_a)
    d.apprentice.train(was_training)
    out_e = d.expert.eval()(batch_e)
    sel, boxes = d.focal_queries(out_e, batch_e)
    if 'bev' not in out_e:  # DETR3D: no BEV, the picture is per camera
        _draw_pv_focal(d, batch_e, batch_a, out_e, out_a, sel, boxes, path)
        return int(sel[0].sum())
    pc = d.expert.cfg.pc_range
    hw = tuple(out_e['bev'].shape[-2:])
    area = distill.bev_focal_area(boxes[0], hw, pc, d.box_scale).cpu()  # [H, W]
    xs = torch.linspace(pc[0], pc[3], hw[1] + 1)[:-1] + (pc[3] - pc[0]) / hw[1] / 2  # cell centres
    ys = torch.linspace(pc[1], pc[4], hw[0] + 1)[:-1] + (pc[4] - pc[1]) / hw[0] / 2
    last = out_e['dec'][-1]
    loc = last['loc'][0, sel[0]].cpu()  # [K, M, 1, P, 2] normalised (x, y)
    attn = last['attn'][0, sel[0]].cpu()  # [K, M, 1, P]
    px, py = _metres(loc, pc)
    fig, axes = plt.subplots(1, 2, figsize=(13, 6.5))
    for ax, name, bev in [(axes[0], f'expert {d.expert.cfg.name}', out_e['bev'][0]),
                          (axes[1], f'apprentice {d.apprentice.cfg.name}', out_a['bev'][0])]:
        ax.imshow(bev.float().norm(dim=0).cpu(), origin='lower', cmap='gray', extent=(pc[0], pc[3], pc[1], pc[4]))
        if area.any():
            ax.contour(xs, ys, area, levels=[0.5], colors='yellow', linewidths=0.8)
        for g in batch_e['gt_boxes'][0].float().cpu():
            ax.add_patch(plt.Polygon(_footprint(g), fill=False, ec='lime', ls='--', lw=0.8))
        for b in boxes[0].cpu():
            ax.add_patch(plt.Polygon(_footprint(b), fill=False, ec='red', lw=1.0))
        ax.scatter(px.flatten(), py.flatten(), s=2 + 30 * attn.flatten(), c='cyan', alpha=0.6, linewidths=0)
        ax.set_title(f'{name} BEV {tuple(bev.shape[-2:])}: {int(sel[0].sum())} queries ({d.select})')
        ax.set_xlim(pc[0], pc[3])
        ax.set_ylim(pc[1], pc[4])
        ax.set_xlabel('x (m, LIDAR_TOP)')
        ax.set_ylabel('y (m)')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return int(sel[0].sum())


def _draw_pv_focal(d, batch_e, batch_a, out_e, out_a, sel, boxes, path):
    """DETR3D's picture (no BEV): one column per camera. Row 1: the expert's input image with the
    selected queries' focal rectangles (red), the GT boxes' rectangles (green, dashed) and the last
    decoder layer's projected reference points of the selected queries where visible (cyan, size ~
    summed sigmoid weight). Rows 2-3: the apprentice's finest FPN level and the expert level the loss
    pairs with it (`Distiller.level_pairs`; feature norm over the padded image) with the PV focal area
    of that expert level (yellow)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    img = batch_e['img'][0].float().cpu()                            # [N, 3, Hp, Wp] RGB 0..255
    N, (Hp, Wp) = img.shape[0], img.shape[-2:]
    l2i = batch_e['lidar2img'][0].float()
    rect, ok = distill.project_boxes(boxes[0].float(), l2i, (Hp, Wp), d.box_scale)    # [N, K, 4], [N, K]
    g_rect, g_ok = distill.project_boxes(batch_e['gt_boxes'][0].float().to(l2i.device), l2i, (Hp, Wp), 1.0)
    last = out_e['dec'][-1]
    uv = last['uv'][0, sel[0]].cpu() * torch.tensor([Wp, Hp])                            # [K, N, 2] pixels
    vis = last['mask'][0, sel[0]].cpu()                                                  # [K, N]
    weight = last['attn'][0, sel[0]].sum(-1).cpu()                                       # [K, N]
    e_level = d.level_pairs(out_e, out_a, batch_e, batch_a)[0][0]   # the expert level paired with A's level 0
    f_e = out_e['fpn'][e_level][0].float().norm(dim=1).cpu()                             # [N, h, w]
    area = d.pv_areas(boxes, batch_e, [tuple(f_e.shape[-2:])])[0][0].cpu()               # [N, h, w]
    f_a = out_a['fpn'][0][0].float().norm(dim=1).cpu()
    extent = (0, Wp, Hp, 0)
    fig, axes = plt.subplots(3, N, figsize=(3.2 * N, 6.2), squeeze=False)
    for n in range(N):
        ax = axes[0, n]
        ax.imshow(img[n].permute(1, 2, 0).clamp(0, 255).byte().numpy(), extent=extent)
        for (u0, v0, u1, v1), good in zip(g_rect[n].cpu().tolist(), g_ok[n].cpu().tolist()):
            if good:
                ax.add_patch(plt.Rectangle((u0, v0), u1 - u0, v1 - v0, fill=False, ec='lime', ls='--', lw=0.7))
        for (u0, v0, u1, v1), good in zip(rect[n].cpu().tolist(), ok[n].cpu().tolist()):
            if good:
                ax.add_patch(plt.Rectangle((u0, v0), u1 - u0, v1 - v0, fill=False, ec='red', lw=0.9))
        m = vis[:, n]
        ax.scatter(uv[m, n, 0], uv[m, n, 1], s=4 + 20 * weight[m, n], c='cyan', linewidths=0)
        name = data.CAMERAS[n] if N == len(data.CAMERAS) else f'camera {n}'
        ax.set_title(f'{name}: {int(m.sum())} reference points', fontsize=8)
        for row, fmap, who in ((1, f_e[n], f'expert {d.expert.cfg.name}'),
                               (2, f_a[n], f'apprentice {d.apprentice.cfg.name}')):
            ax = axes[row, n]
            ax.imshow(fmap, cmap='gray', extent=extent)
            if area[n].any():
                ax.contour(area[n], levels=[0.5], colors='yellow', linewidths=0.8,
                           extent=(0, Wp, 0, Hp), origin='upper')
            ax.set_title(f'{who} FPN {tuple(fmap.shape)}', fontsize=8)
    for ax in axes.flat:
        ax.set_xlim(0, Wp)
        ax.set_ylim(Hp, 0)
        ax.axis('off')
    fig.suptitle(f'{int(sel[0].sum())} selected expert queries ({d.select}): focal rectangles red, GT green, '
                 f'reference points cyan, PV focal area yellow', fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def focal_pictures(apprentice, ckpt_path, teacher, dataroot, version, split, k, out_dir, device, teacher_preset=None):
    """`evaluate.py --ckpt A.pt --vis-focal K [--teacher E.pt]`: K pictures (vis_focal) spread over the
    split under out_dir. The expert is --teacher or the one recorded in the checkpoint's arguments."""
    args = models.load_checkpoint(ckpt_path)['args'] if ckpt_path else {}
    teacher_preset = teacher_preset if teacher else args.get('teacher_preset')
    teacher = teacher or args.get('teacher')
    if not teacher:
        raise InputError('--vis-focal: give --teacher CKPT (the checkpoint does not name its expert)')
    expert, _, _ = models.model_from_checkpoint(teacher, '--teacher', teacher_preset)
    d = distill.Distiller(expert=expert.to(device), apprentice=apprentice.to(device), mode='fd3d',
                          select=args.get('fd3d_select', 'matched+confident'), score=args.get('fd3d_score', 0.3),
                          gate=args.get('fd3d_gate', 0.0),
                          box_scale=args.get('fd3d_box_scale', 1.2), areas=args.get('fd3d_areas', 'pred'),
                          expert_input=args.get('kd_expert_input', 'native'))
    view, apprentice_view = distill.loader_views(expert.cfg, apprentice.cfg, d.expert_input)
    ds = data.NuScenesDataset(dataroot, version=version, split=split, train=False, view=view,
                              apprentice=apprentice_view)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i in sorted({int(j) for j in torch.linspace(0, len(ds) - 1, max(1, k))}):
        batch = data.to_device(data.collate([ds[i]]), device)
        path = os.path.join(out_dir, f'{i:04d}_{ds.sample_tokens[i]}.png')
        n = vis_focal(d, batch, path)
        print(f'wrote {path} ({n} selected queries)')
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------
# A synthetic batch: timing and tests without a dataset (random pixels, a nuScenes-like rig)
# ------------------------------------------------------------------------------------------------

# nuScenes-like rig in the LIDAR_TOP frame (x right, y forward): heading of each camera's optical
# axis in degrees from +x, and its focal length for a 1600-pixel-wide image (front 70 deg, back 110 deg)
TOY_RIG = (('CAM_FRONT', 90.0, 1266.0), ('CAM_FRONT_RIGHT', 35.0, 1260.0), ('CAM_FRONT_LEFT', 145.0, 1260.0),
           ('CAM_BACK', 270.0, 800.0), ('CAM_BACK_LEFT', 200.0, 1260.0), ('CAM_BACK_RIGHT', 340.0, 1260.0))


def toy_lidar2img(image_size, num_cams=6):
    """lidar2img [N, 4, 4] of a nuScenes-like 6-camera rig at image_size (W, H), cameras 1.5 m up."""
    W, H = image_size
    s = W / 1600.0
    mats = []
    for _, heading, f in TOY_RIG[:num_cams]:
        a = math.radians(heading)
        z_c = np.array([math.cos(a), math.sin(a), 0.0])        # optical axis
        x_c = np.array([math.sin(a), -math.cos(a), 0.0])       # image right
        y_c = np.array([0.0, 0.0, -1.0])                       # image down
        lidar_T_cam = np.eye(4)
        lidar_T_cam[:3, :3] = np.stack([x_c, y_c, z_c], 1)
        lidar_T_cam[:3, 3] = [0.0, 0.0, 0.0 + 0.0] + 0.5 * z_c + np.array([0, 0, -0.3])
        K = np.eye(4)
        K[:3, :3] = [[f * s, 0, 800 * s], [0, f * s, 450 * s], [0, 0, 1]]
        mats.append(K @ np.linalg.inv(lidar_T_cam))
    return torch.tensor(np.stack(mats), dtype=torch.float32)


def example_batch(cfg, batch_size=1, history=True, num_gt=20, seed=0):
    """A collated batch in data.collate's layout with random images, the toy rig, an ego driving
    forward at 10 m/s, random GT boxes and (with history) queue_length - 1 history frames, or for a
    streamed preset (history_draw 'stream') a random previous BEV as train.py's BEVStream hands it."""
    g = torch.Generator().manual_seed(seed)
    W, H = cfg.image_size
    Wp, Hp = cfg.padded_size
    stream = history and streams(cfg)
    N, B, T1 = cfg.num_cams, batch_size, (cfg.queue_length - 1 if history and not stream else 0)

    def images():
        img = torch.zeros(B, N, 3, Hp, Wp)
        img[..., :H, :W] = torch.rand(B, N, 3, H, W, generator=g) * 255
        return img

    def can_bus(t):   # absolute pose at frame t (t = 0 the current frame, negative = the past)
        c = torch.zeros(B, 18)
        yaw = 0.3 + 0.02 * t + 0.1 * torch.arange(B)
        c[:, 0] = 100 + 5.0 * t * torch.cos(yaw)
        c[:, 1] = 200 + 5.0 * t * torch.sin(yaw)
        c[:, 16] = yaw
        c[:, 17] = torch.rad2deg(yaw)
        return c

    l2i = toy_lidar2img(cfg.image_size, N)[None].expand(B, -1, -1, -1).clone()
    shape = torch.tensor([[H, W]] * B)
    boxes, labels = [], []
    for _ in range(B):
        xy = (torch.rand(num_gt, 2, generator=g) - 0.5) * 80
        z = torch.rand(num_gt, 1, generator=g) * 2 - 1
        wlh = 0.5 + torch.rand(num_gt, 3, generator=g) * 4
        yaw = (torch.rand(num_gt, 1, generator=g) - 0.5) * 2 * math.pi
        vel = torch.randn(num_gt, 2, generator=g)
        boxes.append(torch.cat([xy, z, wlh, yaw, vel], 1))
        labels.append(torch.randint(0, cfg.num_classes, (num_gt,), generator=g))
    batch = {'img': images(), 'img_shape': shape, 'lidar2img': l2i, 'can_bus': can_bus(0),
             'gt_boxes': boxes, 'gt_labels': labels,
             'sample_token': [f's{b}' for b in range(B)], 'scene_token': [f'scene{b}' for b in range(B)],
             'timestamp': torch.zeros(B)}
    if T1:
        batch['history'] = {'img': torch.stack([images() for _ in range(T1)], 1),
                            'img_shape': shape[:, None].expand(-1, T1, -1).clone(),
                            'lidar2img': l2i[:, None].expand(-1, T1, -1, -1, -1).clone(),
                            'can_bus': torch.stack([can_bus(t - T1) for t in range(T1)], 1)}
        batch['history_valid'] = torch.ones(B, T1, dtype=torch.bool)
    if stream:
        batch['prev_bev'] = torch.randn(B, cfg.bev_h * cfg.bev_w, cfg.embed_dims, generator=g)   # [B, Q, C]
        batch['prev_can_bus'] = can_bus(-1)
        batch['has_prev'] = torch.ones(B, dtype=torch.bool)
    return batch


# ------------------------------------------------------------------------------------------------
# Cost: parameters, FLOPs, training-step time of every preset (`python evaluate.py --bench`), and one
# FD3D training step part by part (`python evaluate.py --bench-distill PAIR`)

# GFLOPs of the FD3D paper's tables (mmcv-style, i.e. multiply-adds), printed beside ours (indicative)
PAPER_GFLOPS = {'fd3d-tiny': 381.95, 'fd3d-small': 416.46, 'base': 1323.41, 'base-r101': 1845.36,
                'detr3d-r101': 1016.83, 'detr3d-r50': 876.94}


def count_flops(model, batch):
    """One no-grad eval-mode forward of `batch`. torch.utils.flop_counter.FlopCounterMode counts
    matmuls and convolutions as 2 FLOPs per multiply-add; the deformable-attention op is counted by
    hand (per sampled channel: 4 bilinear corners + 1 weighting = 5 multiply-adds), as are neither
    the normalisations nor the DCN's bilinear sampling. Returns {'gmacs' (multiply-adds / 1e9, the
    unit mmcv's get_flops calls "GFLOPs"), 'gflops' (= 2 * gmacs), 'msda_gmacs', 'dcn_gmacs' (the
    DCN layers' own multiply-adds, included in gmacs; mmcv's counter skips DCN modules, which is why
    the published figures of the DCN presets are lower)}."""
    from unittest import mock

    from torch.utils.flop_counter import FlopCounterMode

    import backbone
    import bevformer
    msda_macs, dcn_macs = [0], [0]

    def counted_msda(value, shapes, loc, attn):   # FlopCounterMode does not see the op's bilinear gathers
        msda_macs[0] += attn.numel() * value.shape[-1] * 5
        return plain_msda(value, shapes, loc, attn)

    def dcn_hook(m, inp, out):   # the deformable 3x3's matmul (its conv_offset is a plain Conv2d)
        dcn_macs[0] += out.numel() * m.weight.shape[1] * 9

    plain_msda = bevformer.msda
    hooks = [m.register_forward_hook(dcn_hook) for m in model.modules()
             if isinstance(m, backbone.ModulatedDeformConv2d)]
    was_training = model.training
    # FlopCounterMode's module tracker trips over no-grad views of parameters that require grad
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        # every attention of bevformer.py calls the module-level `msda`: counted for this forward only
        with torch.no_grad(), mock.patch.object(bevformer, 'msda', counted_msda), \
                FlopCounterMode(display=False) as counter:
            model(batch)
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        for h in hooks:
            h.remove()
        model.train(was_training)
    gmacs = counter.get_total_flops() / 2e9 + msda_macs[0] / 1e9
    return {'gmacs': gmacs, 'gflops': 2 * gmacs, 'msda_gmacs': msda_macs[0] / 1e9, 'dcn_gmacs': dcn_macs[0] / 1e9}


def _train_step(model, batch, opt):
    """One training iteration as train.py runs it: forward, loss, backward, AdamW step."""
    loss = sum(model.loss(model(batch), batch).values())
    opt.zero_grad()
    loss.backward()
    opt.step()


def step_setup(cfg, seed=0, lib=None):
    """(model, batch, optimiser) of a CPU training step of `cfg` on batch 1 with its own queue_length - 1
    history frames. `lib` = (models, evaluate) modules of another checkout (`import_checkout`): the
    model, batch and optimiser are then that code's."""
    mods, ev = lib or (models, sys.modules[__name__])
    torch.manual_seed(seed)
    model = mods.build_model(cfg).train()
    batch = ev.example_batch(cfg, batch_size=1, history=True, seed=seed)
    fused = lib is None            # as train.py now; an older checkout's train.py used the plain AdamW
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, fused=fused)
    return model, batch, opt


def train_step_times(setups, iters=3, threads=2):
    """Median (wall, CPU) seconds of one training iteration for each of `setups` (`step_setup` results),
    run in turn step by step (A B C A B C ...) so that a drift of the machine's speed reaches every row
    alike. The CPU time (all threads) bounds an idle machine's wall time from above and barely moves
    when other processes share the cores."""
    torch.set_num_threads(threads)
    times = [[] for _ in setups]
    for i in range(iters + 1):                                   # the first round warms up
        for k, (model, batch, opt) in enumerate(setups):
            t, c = time.perf_counter(), time.process_time()
            _train_step(model, batch, opt)
            if i:
                times[k].append((time.perf_counter() - t, time.process_time() - c))
    return [tuple(float(v) for v in np.median(np.array(ts), 0)) for ts in times]


def train_step_time(cfg, iters=3, threads=2, seed=0):
    """Median (wall, CPU) seconds of one training iteration of `cfg` (see `train_step_times`)."""
    return train_step_times([step_setup(cfg, seed)], iters, threads)[0]


PROJECT_MODULES = ('common', 'backbone', 'ops', 'bevformer', 'detr3d', 'models', 'distill', 'synthetic',
                   'data', 'evaluate', 'train', 'table')


def import_checkout(root):
    """(models, evaluate) of another checkout of this project (e.g. `git worktree add /tmp/old <commit>`),
    imported beside ours under the same names: ours are set aside while its files import, then put back.
    For `--bench --before`: both codes' steps in one process, in turn."""
    if not os.path.isfile(os.path.join(root, 'bevformer.py')):
        raise InputError(f"--before '{root}': not a checkout of this project (no bevformer.py)")

    def ours(name):
        return name.split('.')[0] in PROJECT_MODULES

    saved = {n: m for n, m in sys.modules.items() if ours(n)}
    for n in saved:
        del sys.modules[n]
    sys.path.insert(0, os.path.abspath(root))
    try:
        import importlib
        lib = importlib.import_module('models'), importlib.import_module('evaluate')
    finally:
        sys.path.remove(os.path.abspath(root))
        for n in [n for n in sys.modules if ours(n)]:
            del sys.modules[n]
        sys.modules.update(saved)
    return lib


def profile_step(cfg, iters=3, threads=2, seed=0):
    """Where one CPU training step of a BEVFormer preset goes (batch 1 with its own history frames, as
    `train_step_time`): median seconds over `iters` steps (after one warm-up) of each part's forward and
    backward, the history frames (no gradient), the pillar projection and per-camera compaction, the
    matcher, the whole loss, the whole backward and the optimiser step. Forward parts are timed by module
    hooks (current frame only; the history frames are one row); a part's backward runs from the moment
    the gradient of its output arrives to the moment the gradient of its input is complete (tensor hooks;
    the backbone's input needs none: it ends with the backward). Parts nest and the residual paths are
    counted in both neighbours, so the rows do not add up to the step. Returns {row: seconds}."""
    import contextlib
    from unittest import mock

    import bevformer
    if cfg.detector != 'bevformer':
        raise InputError(f'--profile-step: BEVFormer presets only ({cfg.name} is {cfg.detector})')
    torch.set_num_threads(threads)
    model, batch, opt = step_setup(cfg, seed)
    parts = {'backbone': model.backbone, 'FPN': model.neck}
    for i, layer in enumerate(model.encoder.layers):
        parts.update({f'encoder {i}: TSA': layer.tsa, f'encoder {i}: SCA': layer.sca, f'encoder {i}: FFN': layer.ffn})
    for i, layer in enumerate(model.decoder.layers):
        parts[f'decoder {i}'] = layer
    step, start, state = {}, {}, {'history': False}

    def add(row, seconds):
        step[row] = step.get(row, 0.0) + seconds

    def first_tensor(xs):   # the first tensor that needs a gradient in an argument or output (lists nested)
        if torch.is_tensor(xs):
            return xs if xs.requires_grad else None
        for x in (xs if isinstance(xs, (tuple, list)) else ()):
            found = first_tensor(x)
            if found is not None:
                return found
        return None

    def pre(name):
        def hook(module, args):
            if state['history']:
                return
            start[name] = time.perf_counter()
            x = first_tensor(args)
            if x is not None:      # its gradient is complete: this part's backward has ended
                x.register_hook(lambda g: add(f'{name} backward', time.perf_counter() - start.pop(name + ' bw')))
        return hook

    def post(name):
        def hook(module, args, out):
            if state['history']:
                return
            add(f'{name} forward', time.perf_counter() - start[name])
            y = first_tensor(out)
            if y is not None:      # the gradient of its output arrives: this part's backward starts
                y.register_hook(lambda g: start.__setitem__(name + ' bw', time.perf_counter()))
        return hook

    def timed(row, fn, current_only=False):
        def wrapper(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            if not (current_only and state['history']):
                add(row, time.perf_counter() - t)
            return out
        return wrapper

    def history(b):
        state['history'] = True
        try:
            return plain_history(b)
        finally:
            state['history'] = False

    plain_history = model.history_bev
    model.history_bev = timed('history frames (no gradient, eval mode)', history)   # this instance only
    hooks = [m.register_forward_pre_hook(pre(n)) for n, m in parts.items()] + \
            [m.register_forward_hook(post(n)) for n, m in parts.items()]
    rows = []
    patches = [mock.patch.object(bevformer, 'project_points',
                                 timed('pillar projection', bevformer.project_points, True)),
               mock.patch.object(bevformer, 'compact_cameras',
                                 timed('per-camera compaction', bevformer.compact_cameras, True)),
               mock.patch.object(bevformer, 'hungarian_match_batch', timed('matcher', bevformer.hungarian_match_batch))]
    try:
        with contextlib.ExitStack() as stack:
            for p in patches:
                stack.enter_context(p)
            for _ in range(iters + 1):                                   # the first one warms up
                step.clear()
                t0 = time.perf_counter()
                out = model(batch)
                add('forward (all)', time.perf_counter() - t0)
                loss = sum(timed('loss (matcher included)', model.loss)(out, batch).values())
                opt.zero_grad()
                t = time.perf_counter()
                loss.backward()
                add('backward (all)', time.perf_counter() - t)
                if 'backbone bw' in start:                               # its input needs no gradient
                    add('backbone backward', time.perf_counter() - start.pop('backbone bw'))
                t = time.perf_counter()
                opt.step()
                add('optimiser step', time.perf_counter() - t)
                add('step (all)', time.perf_counter() - t0)
                rows.append(dict(step))
    finally:
        for h in hooks:
            h.remove()
        model.history_bev = plain_history
    return {k: float(np.median([r.get(k, 0.0) for r in rows[1:]])) for k in rows[-1]}


def frame_costs(presets, threads):
    """Print parameters and multiply-adds of one frame for `presets`."""
    print(f'# params and cost of one frame (batch 1, 6 cameras, eval forward, no history); torch {torch.__version__}, '
          f'{threads} threads')
    print('# GMACs = matmul/conv multiply-adds (FlopCounterMode FLOPs / 2) + deformable-attention MACs counted '
          'by hand;')
    print('# the paper column is the FD3D tables\' GFLOPs (mmcv-style, i.e. multiply-adds): indicative only')
    print('# "w/o DCN" leaves out the DCN layers\' own multiply-adds, which mmcv\'s counter does not see')
    print(f'{"preset":<16} {"input WxH":>10} {"BEV":>8} {"params M":>9} {"GMACs":>9} {"w/o DCN":>9} '
          f'{"MSDA GMACs":>11} {"paper":>8}')
    for name in presets:
        cfg = models.preset_config(name, '--presets')
        torch.manual_seed(0)
        model = models.build_model(cfg)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        cost = count_flops(model, example_batch(cfg, batch_size=1, history=False))
        bev = f'{cfg.bev_h:>4}x{cfg.bev_w:<3}' if cfg.detector == 'bevformer' else f'{"-":>8}'
        print(f'{name:<16} {cfg.image_size[0]:>5}x{cfg.image_size[1]:<4} {bev} {params:>9.2f} '
              f'{cost["gmacs"]:>9.2f} {cost["gmacs"] - cost["dcn_gmacs"]:>9.2f} {cost["msda_gmacs"]:>11.2f} '
              f'{PAPER_GFLOPS.get(name, "-"):>8}', flush=True)
        del model


def bench(presets, step_presets, iters=3, threads=2, before=None, amp=False):
    """Print parameters and multiply-adds of one frame for `presets`, and the CPU training step of
    `step_presets` (names of either detector; with `amp` each also with --amp's bfloat16 image CNN)."""
    torch.set_num_threads(threads)
    if presets:
        frame_costs(presets, threads)
    if not step_presets:
        return
    rows = [('', name, models.preset_config(name, '--steps'), None) for name in step_presets]
    if before:
        lib = import_checkout(before)
        known = [n for n in step_presets if any(n in m.PRESETS for m in lib[0].DETECTORS.values())]
        rows = [('before ', n, lib[0].preset_config(n), lib) for n in known] + rows
    if amp:                                      # this tree's rows once more, the image CNN in bfloat16
        rows += [('bf16 ', name, cfg, None) for tag, name, cfg, lib in rows if lib is None]
    print(f'# CPU training step (batch 1 with its own history frames, forward+loss+backward+AdamW, '
          f'{threads} threads, median of {iters} after 1 warm-up; the rows run in turn step by step)'
          + (f"\n# 'before': the code of {before} (its plain AdamW; the allocator setting is this "
             f'process\'s for both)' if before else ''))
    setups = [step_setup(cfg, lib=lib) for _, _, cfg, lib in rows]
    for (tag, *_), (model, _, _) in zip(rows, setups):
        model.cnn_bf16 = tag == 'bf16 '
    for (tag, name, cfg, _), (wall, cpu) in zip(rows, train_step_times(setups, iters, threads)):
        print(f'{tag + name:<23} queue {cfg.queue_length}: {wall * 1000:6.0f} ms/iter wall, {cpu * 1000:6.0f} ms CPU',
              flush=True)


# FD3D training step, part by part (`python evaluate.py --bench-distill PAIR`): expert -> apprentice presets
DISTILL_PAIRS = {'cpu': ('cpu-base', 'cpu-tiny-single'), 'paper-tiny': ('base-r101', 'fd3d-tiny'),
                 'paper-small': ('base', 'fd3d-small'), 'detr3d-cpu': ('detr3d-cpu-base', 'detr3d-cpu-tiny'),
                 'detr3d-paper': ('detr3d-r101', 'detr3d-r50')}
DISTILL_PARTS = [('inputs', 'inputs (apprentice downscale)'), ('expert_fwd', 'expert forward (no grad)'),
                 ('app_fwd_loss', 'apprentice forward + loss'), ('kd_losses', 'distillation losses + generators'),
                 ('backward', 'backward (apprentice + generators)'), ('step', 'FD3D step total'),
                 ('app_fwd_only', 'apprentice alone: forward + loss'), ('app_bwd_only', 'apprentice alone: backward'),
                 ('app_only', 'apprentice-only step (fwd+loss+bwd)')]


def distill_step_times(d, batch, iters=3, warmup=1):
    """Time one FD3D step of the distill.Distiller `d` on `batch` (at the expert's resolution), part by
    part, and the apprentice's own step on the same inputs. -> (median {part: [wall s, CPU s]} over
    `iters` steps after `warmup`, the first step's detection loss (float) and distillation terms (dict))."""
    expert, apprentice = d.expert, d.apprentice
    dev = next(apprentice.parameters()).device
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == 'cuda' else (lambda: None)

    def clock():  # (wall, CPU seconds of this process): the second is steadier on a shared machine
        sync()
        return torch.tensor([time.perf_counter(), time.process_time()])

    rows, first = [], None
    for it in range(warmup + iters):
        t0 = clock()
        be, ba = distill.model_inputs(batch, expert.cfg, apprentice.cfg)
        t1 = clock()
        with torch.no_grad():
            out_e = expert(be)
        t2 = clock()
        out_a = apprentice(ba)
        det = apprentice.loss(out_a, ba)
        t3 = clock()
        kd = d.distill_losses(out_e, out_a, be, ba)
        t4 = clock()
        (sum(det.values()) + sum(kd.values())).backward()
        t5 = clock()
        d.zero_grad(set_to_none=True)
        # the apprentice alone on the same inputs (mode 'none')
        ba = distill.model_inputs(batch, expert.cfg, apprentice.cfg)[1]
        t6 = clock()
        loss = sum(apprentice.loss(apprentice(ba), ba).values())
        t7 = clock()
        loss.backward()
        t8 = clock()
        d.zero_grad(set_to_none=True)
        if it >= warmup:
            rows.append(dict(inputs=t1 - t0, expert_fwd=t2 - t1, app_fwd_loss=t3 - t2, kd_losses=t4 - t3,
                             backward=t5 - t4, step=t5 - t0, app_fwd_only=t7 - t6, app_bwd_only=t8 - t7,
                             app_only=t8 - t6))
        if it == 0:
            first = (float(sum(det.values()).detach()), {k: float(v.detach()) for k, v in kd.items()})
    med = {k: torch.stack([r[k] for r in rows]).median(0).values.tolist() for k in rows[0]}  # [wall, cpu] each
    return med, first[0], first[1]


def distill_bench(pair='cpu', device='cpu', iters=3, warmup=1):
    """Print the time breakdown of one FD3D training step of DISTILL_PAIRS[pair] (batch 1, random
    weights, query gate off, the longer history of the two models): expert forward, apprentice forward(+loss)/backward,
    distillation losses with generators, and the distillation overhead (everything except the expert's
    forward) relative to the apprentice-only step. Also prints each term's starting magnitude beside the
    detection loss (how the weights were chosen). -> the medians {part: [wall s, CPU s]}."""
    dev = torch.device(device)
    e_name, a_name = DISTILL_PAIRS[pair]
    torch.manual_seed(0)
    expert = models.build_model(models.preset_config(e_name, '--bench-distill')).to(dev)
    apprentice = models.build_model(models.preset_config(a_name, '--bench-distill')).to(dev)
    # gate 0: a random expert's matched queries all fail the query gate and none is confident, which
    # would leave every focal area empty (all terms 0) and time an empty path
    d = distill.Distiller(expert=expert, apprentice=apprentice, mode='fd3d', gate=0.0).to(dev).train()
    queue = max(expert.cfg.queue_length, apprentice.cfg.queue_length)
    batch = data.to_device(example_batch(dataclasses.replace(expert.cfg, queue_length=queue)), dev)
    med, ldet, kd = distill_step_times(d, batch, iters, warmup)
    weight = {'kd_b': d.w['bev'], 'kd_f': d.w['focal'], 'kd_p': d.w['pv']}  # by the terms' prefixes
    raw = {k: v / weight[k[:4]] for k, v in kd.items()}
    # what distillation adds to the apprentice's own step, the expert's forward aside: the input
    # downscale, the losses with their modules, and the extra backward through generators/upsampler
    overhead = [med['inputs'][i] + med['kd_losses'][i] + max(0.0, med['backward'][i] - med['app_bwd_only'][i])
                for i in range(2)]
    print(f'FD3D step {e_name} -> {a_name} on {dev} (batch 1, history {queue - 1} frames, random weights, '
          f'median of {iters} after {warmup} warm-up; {torch.get_num_threads()} threads, '
          f'load average {os.getloadavg()[0]:.1f})')
    print(f'  {"":40s} {"wall s":>8s} {"CPU s":>8s}')
    for k, label in DISTILL_PARTS:
        print(f'  {label:40s} {med[k][0]:8.3f} {med[k][1]:8.3f}')
    print(f'  {"distillation overhead (inputs+losses+extra bwd)":40s} {overhead[0]:8.3f} {overhead[1]:8.3f}'
          f'   = {overhead[0] / med["app_only"][0]:.2f}x wall, {overhead[1] / med["app_only"][1]:.2f}x CPU '
          'of the apprentice-only step (target <= 0.5x)')
    print(f'  starting magnitudes: detection loss {ldet:.2f}; unweighted ' +
          ', '.join(f'{k} {v:.3f}' for k, v in raw.items()) + '; weighted ' +
          ', '.join(f'{k} {v:.3f}' for k, v in kd.items()))
    return med


# ------------------------------------------------------------------------------------------------
# Speed


def speed(model, cfg, device, amp=False, warmup=3, runs=10):
    """Latency of model.predict on one sample (batch 1) with the previous BEV in its state (a BEVFormer
    preset with queue_length > 1), images
    already at the preset's input size on the device: data loading, resizing and the host->device
    copy are excluded. The input is `example_batch` (random pixels, a nuScenes-like rig), so
    no dataset is needed; the cost does not depend on the pixel values. Prints the protocol."""
    batch = example_batch(cfg, batch_size=1, history=False)
    img, l2i = batch['img'][0].to(device), batch['lidar2img'][0].to(device)
    can_bus, img_shape = batch['can_bus'][0].to(device), tuple(batch['img_shape'][0].tolist())
    params = sum(p.numel() for p in model.parameters())
    model.eval()
    dtype = ('fp16 autocast' if device.type == 'cuda' else 'image CNN in bf16') if amp else 'fp32'
    model.cnn_bf16 = amp and device.type == 'cpu'

    def step(state):
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=amp and device.type == 'cuda'):
            return model.predict(img, l2i, can_bus=can_bus, state=state, img_shape=img_shape,
                                 scene_token='speed')['state']

    state = None
    for _ in range(warmup):
        state = step(state)
    times = []
    for _ in range(runs):
        if device.type == 'cuda':
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        state = step(state)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    # FLOPs of one forward without history (`count_flops`: FlopCounterMode for matmuls and
    # convolutions plus the deformable-attention op counted by hand)
    flops = count_flops(model, data.to_device(batch, device))
    latency = float(np.median(times))
    # BEVFormer carries the previous BEV from call to call; DETR3D and single-frame BEVFormer presets do not
    history = ('previous BEV in the state' if state is not None and state.get('bev') is not None
               else 'single frame (no temporal state)')
    where = f'{device} ({torch.get_num_threads()} threads)' if device.type == 'cpu' else \
        f'{device} ({torch.cuda.get_device_name(device)})'
    print(f"protocol: {cfg.name}, model.predict, batch 1, {img.shape[0]} cameras, input tensor "
          f"{img.shape[-1]}x{img.shape[-2]} (content {img_shape[1]}x{img_shape[0]}), {dtype}, {where}, "
          f"{history}, data loading and resizing excluded, median of {runs} runs after "
          f"{warmup} warm-up runs")
    print(f"latency {latency * 1000:.1f} ms  FPS {1 / latency:.2f}  parameters {params / 1e6:.2f} M  "
          f"GFLOPs {flops['gflops']:.2f} (2 per multiply-add; {flops['gmacs']:.2f} G multiply-adds, the unit "
          f"mmcv and the FD3D paper call GFLOPs)")
    return {'latency_s': latency, 'fps': 1 / latency, 'params': params, **flops}


# ------------------------------------------------------------------------------------------------
# Command line


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group('what to evaluate')
    g.add_argument('--ckpt', help='checkpoint written by train.py or `bevformer.py convert` (the model is rebuilt '
                                  'from its config), or an official mmdet3d checkpoint as it is')
    g.add_argument('--trained-weights', action='store_true',
                   help='with a --ckpt of train.py --ema: score the trained weights, not their average')
    g.add_argument('--model', help='preset name (random weights unless --ckpt); for --speed without a checkpoint')
    g.add_argument('--preset', help='with an official mmdet3d --ckpt: its preset (default: inferred from its keys '
                                    'and shapes; tiny, small, base, detr3d-r101, ...)')
    g.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                   help="with --model: override a preset field, as in train.py (e.g. --set queue_length=2)")
    g.add_argument('--oracle', action='store_true',
                   help='score the ground truth sent through the prediction path (checks conventions: NDS ~1)')
    g = p.add_argument_group('data')
    g.add_argument('--dataroot', default='data/synthetic', help='nuScenes-format root')
    g.add_argument('--version', default='auto', help='v1.0-mini, v1.0-trainval or v1.0-test; auto: the one whose '
                   'tables are in --dataroot (v1.0-test for --split test, else trainval first)')
    g.add_argument('--split', default='val', help="'val' or 'train' (scored), 'test' (with --format-only)")
    g.add_argument('--workers', type=int, default=2, help='data-loading processes')
    g = p.add_argument_group('outputs')
    g.add_argument('--out', help='output folder (default: <ckpt folder>/eval_<split>, or runs/oracle)')
    g.add_argument('--format-only', action='store_true', help='write the submission JSON only (test split: no GT)')
    g.add_argument('--vis', type=int, default=0, metavar='K', help='pictures of K samples under OUT/vis/')
    g.add_argument('--vis-attention', type=int, default=0, metavar='K',
                   help='BEVFormer: pictures of what TSA, SCA and the decoder sample for K val samples, under '
                        'OUT/vis_attention/')
    g.add_argument('--vis-focal', type=int, default=0, metavar='K',
                   help="FD3D pictures of K samples under OUT/vis_focal/: the expert's selected queries, focal "
                        "areas and sampling points over both BEV maps (DETR3D: per camera), as distill.py's "
                        "Distiller sees them; needs a distilled --ckpt or --teacher")
    g.add_argument('--teacher', metavar='CKPT',
                   help='expert checkpoint for --vis-focal (default: the one the --ckpt was trained with)')
    g.add_argument('--teacher-preset', help='with an official mmdet3d --teacher: its preset (default: inferred)')
    g.add_argument('--speed', action='store_true', help='latency, FPS, parameters and GFLOPs instead of metrics')
    g.add_argument('--bench', action='store_true', help='parameters and GMACs of --presets, CPU training-step '
                   'time of --steps (no data, no checkpoint)')
    g.add_argument('--presets', default='tiny,small,base,fd3d-tiny,fd3d-small,base-r101,cpu-tiny,cpu-base,'
                   'detr3d-r101,detr3d-r50,detr3d-cpu-tiny,detr3d-cpu-base', help='with --bench: the cost table')
    g.add_argument('--steps', default='cpu-tiny,cpu-tiny-single,cpu-tiny-stream,cpu-base,detr3d-cpu-tiny,'
                   'detr3d-cpu-base', help='with --bench: presets whose CPU training step is timed (the '
                   'temporal cpu-tiny beside its single-frame and streamed twins)')
    g.add_argument('--before', metavar='DIR', help='with --bench: also time the --steps presets of another '
                   'checkout of this project (e.g. `git worktree add /tmp/old HEAD~3`), in turn with ours')
    g.add_argument('--bench-distill', metavar='PAIR', choices=sorted(DISTILL_PAIRS),
                   help='time breakdown of one FD3D training step of an expert -> apprentice pair, random '
                        'weights, batch 1 (no data, no checkpoint; --device, --iters, --threads): ' +
                        ', '.join(f'{k} = {e} -> {a}' for k, (e, a) in DISTILL_PAIRS.items()))
    g.add_argument('--profile-step', metavar='PRESET', help='BEVFormer: forward and backward time of each part of '
                   'one CPU training step of PRESET (with --iters, --threads; --set applies)')
    g.add_argument('--iters', type=int, default=3, help='with --bench or --bench-distill: timed steps per preset '
                   '(after 1 warm-up)')
    g.add_argument('--threads', type=int, default=2, help='with --bench or --bench-distill: torch CPU threads')
    g = p.add_argument_group('system')
    g.add_argument('--device', default='auto', help="'auto' (CUDA if present), 'cpu', 'cuda', 'cuda:1', ...")
    g.add_argument('--amp', action='store_true', help='with --speed: fp16 autocast on CUDA, the image CNN in bfloat16 '
                   'on the CPU; with --bench: each --steps row also with the image CNN in bfloat16')
    return p.parse_args(argv)


def pick_device(name):
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device: '{name}' is not a device (expected auto, cpu, cuda or cuda:K)") from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise InputError(f"--device: '{name}' asked for, but torch sees no CUDA device")
    return device


def print_profile(cfg, iters, threads):
    """`--profile-step`: `profile_step`'s rows with the protocol (machine load stated: shared cores inflate
    every row)."""
    rows = profile_step(cfg, iters, threads)
    print(f'# {cfg.name} (queue {cfg.queue_length}): one training step, batch 1 with its history frames, '
          f'{threads} threads, median of {iters} after 1 warm-up; load average {os.getloadavg()[0]:.1f} on '
          f'{os.cpu_count()} CPUs; torch {torch.__version__}')
    for row, seconds in rows.items():
        print(f'{row:<42} {seconds * 1000:9.1f} ms')
    return rows


def run(args):
    if args.profile_step:
        return print_profile(models.apply_overrides(models.preset_config(args.profile_step, '--profile-step'),
                                                    args.set), args.iters, args.threads)
    if args.bench_distill:
        torch.set_num_threads(args.threads)
        return distill_bench(args.bench_distill, pick_device(args.device), args.iters)
    if args.bench:
        names = [n for n in args.presets.split(',') if n]
        steps = [n for n in args.steps.split(',') if n]
        for n in names:
            models.preset_config(n, '--presets')
        for n in steps:
            models.preset_config(n, '--steps')
        return bench(names, steps, args.iters, args.threads, args.before, args.amp)
    device = pick_device(args.device)
    if args.set and not (args.model and not args.ckpt):
        raise InputError('--set applies to --model only (a checkpoint rebuilds the config it stored)')
    if args.ckpt:
        model, cfg, _ = models.model_from_checkpoint(args.ckpt, preset=args.preset, averaged=not args.trained_weights)
    elif args.model:
        cfg = models.apply_overrides(models.preset_config(args.model), args.set)
        model = models.build_model(cfg)
    elif not args.oracle:
        raise InputError('give --ckpt CKPT (or --model NAME with --speed, or --oracle)')
    out = args.out or (os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), f'eval_{args.split}')
                       if args.ckpt else os.path.join('runs', 'oracle' if args.oracle else f'{args.model}-eval'))
    if args.vis_focal:
        return focal_pictures(model, args.ckpt, args.teacher, args.dataroot, args.version, args.split,
                              args.vis_focal, os.path.join(out, 'vis_focal'), device, args.teacher_preset)
    if args.speed:
        if args.oracle:
            raise InputError('--speed times a model: give --model NAME or --ckpt CKPT, not --oracle')
        return speed(model.to(device), cfg, device, amp=args.amp)
    if args.oracle:
        ds = data.NuScenesDataset(args.dataroot, version=args.version, split=args.split, train=False)
        preds = ground_truth_as_predictions(ds)
    else:
        model.to(device)
        ds = eval_dataset(args.dataroot, args.version, args.split, cfg)
        preds = predict_split(model, ds, device, workers=args.workers)
    result_path = os.path.join(out, 'results_nusc.json')
    write_json(result_path, to_submission(ds.nusc, preds, ds.sample_tokens))
    print(f'wrote {result_path}')
    if args.vis:
        visualise(ds, preds, os.path.join(out, 'vis'), args.vis)
    if args.vis_attention and not args.oracle:
        attention_pictures(model, ds, args.vis_attention, os.path.join(out, 'vis_attention'))
    if args.format_only or args.split == 'test':
        return None
    summary = score(ds.nusc, result_path, eval_set_name(ds.version, args.split), out)
    print_last_line(summary)
    return summary


def one_line(error):
    """The message of an InputError as one line, also when a DataLoader worker raised it (the loader
    re-raises it with the worker's traceback in the message; the original message is its last line)."""
    last = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    for prefix in ('data.InputError: ', 'InputError: '):
        last = last[len(prefix):] if last.startswith(prefix) else last
    return last


def main(argv=None):
    args = get_args(argv)
    keep_freed_memory()                 # as train.py, so that the benchmarks time what a run does
    try:
        run(args)
    except InputError as e:
        print(f'error: {one_line(e)}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    main()
