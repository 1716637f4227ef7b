"""Train a camera-only 3D detector (BEVFormer or DETR3D), plainly or distilled (FD3D), on one CPU,
one GPU or many (torchrun), then evaluate it with the official nuScenes metrics.

    python train.py                                   # synthetic world (written if missing), cpu-tiny, evaluate
    python train.py --model cpu-base --out runs/expert
    python train.py --teacher runs/expert/last.pt --student cpu-tiny             # FD3D by default
    python train.py --model tiny --dataroot /data/nuscenes --version v1.0-trainval --epochs 24 \\
                    --lr 2e-4 --backbone-weights resnet50.pth
    torchrun --nproc_per_node=8 train.py ...          # DDP; --batch-size is per process

Where to read: the loop is `train()`, the last function before the command line; one screen:
get_lr -> `train_step` (forward, NaN guard, backward, clip, step) -> log -> periodic evaluation and
best.pt -> last.pt -> Ctrl-C -> final evaluation. What it runs on is made by `setup_run`, one small
helper per step in the order things happen: processes and device -> arguments (merged with the
checkpoint's on --resume) -> config (preset + --set) -> model and distiller -> data in a resumable
order -> AdamW (backbone at its own lr multiple) -> log. Above them: the flags, the schedule, the data
order and the RNG states; `save_state`/`restore_state` are the checkpoint, `keep_if_best` the only
writer of best.pt.

Defaults of the schedule are tuned for the synthetic default run; the official nuScenes recipe is
`--epochs 24 --lr 2e-4` on 8 GPUs x 1 sample (the official BEVFormer configs: AdamW, weight decay
0.01, backbone lr x0.1, cosine with a 500-iteration linear warm-up from 1/3).

Exact resume (CPU): the data order depends only on (seed, iteration) (a DistributedSampler
permutation per epoch; for a streamed model, history_draw 'stream', StreamOrder's lanes of whole scenes,
whose last BEVs the checkpoint keeps), every loaded item draws its randomness (history frames, photometric
distortion) from a seed fixed by (seed, iteration, slot), the model's own randomness (GridMask)
draws from torch's global generator, whose state the checkpoint stores with numpy's and Python's,
and lr is a pure function of the iteration. So an interrupted and resumed run ends with
bit-identical weights to an uninterrupted one.
"""
import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import random
import resource
import signal
import sys
import time

# torch's idle CPU threads (libgomp) spin 300000 rounds waiting for the next parallel region before they
# sleep, and the regions come often. Beside the deformable attention's head threads (ops/msda.py), the
# data-loader workers or a second run on the same cores, the spinning takes the cores the work needs: two
# 2-thread runs side by side took 6-7 s an iteration instead of 0.6 (docs/benchmarks.md, "The levers").
# PASSIVE lets idle threads sleep at once. libgomp reads it once, when torch loads, hence before the import;
# a policy already in the environment is kept.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

import backbone
import data
import distill
import evaluate
import models
from common import InputError, cpu_has_bf16, keep_freed_memory, save_checkpoint, streams

DEFAULT_DATAROOT = 'data/synthetic'
# the value that reproduces the behaviour before each flag existed (resuming an older checkpoint)
FLAG_BEFORE_IT_EXISTED = {'fd3d_gate': 0.0, 'points_lr_mult': 1.0, 'ema': 0.0}

# ------------------------------------------------------------------------------------------------
# Arguments (grouped by topic; read only by main)


def make_parser():
    p = argparse.ArgumentParser(description='Train a BEVFormer/DETR3D detector (optionally distilled with FD3D).',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group('model')
    g.add_argument('--model', '--student', dest='model', default=None,
                   help='preset to train (bevformer.PRESETS / detr3d.PRESETS); default cpu-tiny')
    g.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                   help='override a config field of the preset, e.g. --set bev_h=100 (repeatable)')
    g.add_argument('--backbone-weights', metavar='PATH',
                   help='pretrained ResNet weights (ImageNet torchvision names or FCOS3D/mmdet backbone.*)')
    g = p.add_argument_group('distillation (distill.py)')
    g.add_argument('--teacher', metavar='CKPT', help='expert checkpoint (ours, or an official mmdet3d BEVFormer/'
                                                     'DETR3D .pth as it is); turns distillation on')
    g.add_argument('--teacher-preset', help='preset of an official --teacher checkpoint (default: inferred from '
                                            'its keys and shapes)')
    g.add_argument('--distill', default='fd3d', help='fd3d, heatmap, fitnet, mgd or none (with --teacher)')
    # every choice the FD3D paper leaves open, with the reason for each default: docs/fd3d.md "Every flag"
    # (which expert queries teach: docs/fd3d.md)
    g.add_argument('--fd3d-parts', default=None,
                   help='FD3D terms: a subset of pv,bev,focal (ablations); default all of the detector\'s '
                        '(DETR3D: pv,focal)')
    g.add_argument('--fd3d-select', default='matched+confident',
                   help='expert queries that teach: matched (to GT), confident, or matched+confident')
    g.add_argument('--fd3d-score', type=float, default=0.3, help='max class probability of a confident query')
    g.add_argument('--fd3d-gate', type=float, default=distill.GATE_METRES,
                   help='a matched query teaches only if its top class is its GT\'s and its centre is within this '
                        'many metres (nuScenes\' TP threshold; 0: every matched query)')
    g.add_argument('--fd3d-box-scale', type=float, default=1.2, help='enlargement of the boxes that make focal areas')
    g.add_argument('--fd3d-mask-ratio', type=float, default=0.65, help='random mask ratio inside the focal areas')
    g.add_argument('--fd3d-areas', default='pred', help="focal areas from the expert's predictions (pred) or GT (gt)")
    g.add_argument('--fd3d-bg-weight', type=float, default=0.0, help='weight of cells outside the focal areas')
    g.add_argument('--fd3d-pv-norm', default='bn',
                   help="standardise the expert's FPN maps per channel (bn) or not (none)")
    g.add_argument('--fd3d-w-pv', type=float, default=distill.W_PV, help='weight of each FPN level\'s generation term')
    g.add_argument('--fd3d-w-bev', type=float, default=distill.W_BEV, help='weight of the BEV generation term')
    g.add_argument('--fd3d-w-focal', type=float, default=distill.W_FOCAL, help='weight of the focal term')
    g.add_argument('--kd-w-fitnet', type=float, default=distill.W_FITNET, help='weight of the fitnet baseline')
    g.add_argument('--kd-w-heatmap', type=float, default=distill.W_HEATMAP, help='heatmap baseline: BEV weight')
    g.add_argument('--kd-w-cwd', type=float, default=distill.W_CWD, help='heatmap baseline: CWD weight per level')
    g.add_argument('--kd-expert-input', default='native',
                   help="expert images: native (the loader's full resolution) or upsampled (as the released code)")
    g.add_argument('--init-head-from-expert', action='store_true',
                   help="start the apprentice's decoder and heads from the expert's (any --distill mode)")
    g = p.add_argument_group('data')
    g.add_argument('--dataroot', default=DEFAULT_DATAROOT,
                   help=f'nuScenes-format root ({DEFAULT_DATAROOT} is written by the synthetic generator if missing)')
    g.add_argument('--version', default='auto', help='v1.0-mini or v1.0-trainval (train on train, evaluate on val); '
                   'auto: the one whose tables are in --dataroot (trainval first)')
    g.add_argument('--workers', type=int, default=2, help='data-loading processes per training process')
    g.add_argument('--photometric', action=argparse.BooleanOptionalAction, default=None,
                   help="photometric distortion of the training images (default: the preset's choice: on for "
                        "the official and paper presets, as in the official recipes; off for the CPU presets)")
    g = p.add_argument_group('schedule and optimiser')
    g.add_argument('--iters', type=int, default=3600,
                   help='training iterations (ignored when --epochs is given); 3600 x batch 1 = the default CPU run')
    g.add_argument('--epochs', type=int, help='train for this many passes over the train split instead of --iters')
    g.add_argument('--batch-size', type=int, default=1,
                   help='samples per iteration PER PROCESS (x GPUs under torchrun)')
    g.add_argument('--lr', type=float, default=1e-3,
                   help='peak AdamW learning rate, the backbone gets 0.1x (official: 2e-4 for 8 GPUs x 1 sample)')
    g.add_argument('--warmup', type=int, default=400, help='linear warm-up iterations, from lr/3 (official: 500)')
    g.add_argument('--min-lr-ratio', type=float, default=1e-3, help='cosine floor as a fraction of --lr')
    g.add_argument('--backbone-lr-mult', type=float, default=None,
                   help='lr multiplier of the backbone; default 0.1 with --backbone-weights (official, for a '
                        'pretrained ResNet), 1.0 without (a ResNet trained from scratch)')
    g.add_argument('--points-lr-mult', type=float, default=0.1,
                   help='lr multiple of the reference-point and sampling-offset layers (Deformable DETR\'s 0.1; '
                        'docs/experiments.md "A steadier recipe")')
    g.add_argument('--weight-decay', type=float, default=0.01, help='AdamW weight decay')
    g.add_argument('--grad-clip', type=float, default=35.0, help='max L2 norm of all gradients')
    g.add_argument('--ema', type=float, default=0.0, metavar='DECAY',
                   help='keep an exponential moving average of the weights with this decay (e.g. 0.998) and '
                        'evaluate it; the checkpoint holds it beside the trained weights (0: off)')
    g.add_argument('--seed', type=int, default=0, help='seeds the weights, the data order and every augmentation')
    g = p.add_argument_group('output, logging and evaluation')
    g.add_argument('--out', help='output folder (default runs/<model>, or runs/<student>-<distill>)')
    g.add_argument('--resume', metavar='CKPT', help='continue a run exactly from its checkpoint (e.g. OUT/last.pt)')
    g.add_argument('--overwrite', action='store_true',
                   help='start a new run into an --out that holds one (its last.pt, best.pt and log are replaced); '
                        'without it such a start is refused')
    g.add_argument('--log-every', type=int, default=10, help='iterations between log.jsonl lines')
    g.add_argument('--ckpt-every', type=int, default=500, help='iterations between last.pt writes (and at the end)')
    g.add_argument('--eval-every', type=int, default=0,
                   help='evaluate on val every N iterations, keeping best.pt (0: off)')
    g.add_argument('--no-eval', action='store_true', help='skip the final evaluation')
    g = p.add_argument_group('system')
    g.add_argument('--device', default='auto', help="'auto' (CUDA if present), 'cpu', 'cuda'")
    g.add_argument('--amp', action='store_true', help='mixed precision: fp16 autocast and loss scaling on CUDA; on '
                   'the CPU the image CNN alone in bfloat16 (faster only with bfloat16 units: AVX512-BF16, AMX)')
    g.add_argument('--threads', type=int, default=0,
                   help='torch CPU threads per process (0: torch\'s default, or CPUs / processes under torchrun; '
                        '1 is faster on a machine shared with other jobs)')
    return p


def get_args(argv=None):
    """(args, explicit): explicit holds the flags given on the command line (they win over a
    resumed checkpoint's arguments)."""
    args = make_parser().parse_args(argv)
    bare = make_parser()
    for action in bare._actions:       # a parser without defaults tells which flags were typed
        action.default = argparse.SUPPRESS
    return args, set(vars(bare.parse_args(argv)))


# ------------------------------------------------------------------------------------------------
# Schedule: a pure function of the iteration


def get_lr(it, lr, total, warmup, min_ratio):
    """Cosine from lr to min_ratio*lr over the whole run, times a linear warm-up that starts at 1/3
    (mmcv's CosineAnnealing with warmup='linear', warmup_ratio=1/3, as in the official configs)."""
    min_lr = lr * min_ratio
    cosine = min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * it / max(1, total)))
    if it < warmup:
        return cosine * (1 - (1 - it / warmup) * (1 - 1 / 3))
    return cosine


# ------------------------------------------------------------------------------------------------
# Data in a resumable order


def item_seed(seed, it, rank, slot):
    """The seed of one loaded item: fixed by (run seed, iteration, rank, slot in the batch)."""
    return int(np.random.SeedSequence([seed, it, rank, slot]).generate_state(1)[0])


class TrainOrder(torch.utils.data.Sampler):
    """Batches of (index, item_seed) for iterations start..total-1.

    Epoch e is DistributedSampler's permutation after set_epoch(e) (seeded by --seed, sharded by
    rank, the tail dropped so every rank runs the same number of iterations), so what iteration
    `it` sees depends on nothing but (seed, it): a resumed run starts at `start` and sees the rest.
    """

    def __init__(self, dataset, batch_size, rank, world, seed, start, total):
        self.sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                          drop_last=True)
        self.batch_size, self.rank, self.seed, self.start, self.total = batch_size, rank, seed, start, total
        self.iters_per_epoch = len(self.sampler) // batch_size

    def __len__(self):
        return self.total - self.start

    def __iter__(self):
        epoch, order = None, None
        for it in range(self.start, self.total):
            e, k = divmod(it, self.iters_per_epoch)
            if e != epoch:
                epoch = e
                self.sampler.set_epoch(e)
                order = list(self.sampler)
            picks = order[k * self.batch_size:(k + 1) * self.batch_size]
            yield [(i, item_seed(self.seed, it, self.rank, j)) for j, i in enumerate(picks)]


class StreamOrder(torch.utils.data.Sampler):
    """history_draw 'stream': batches of (index, item_seed) for iterations start..total-1 that walk whole
    scenes frame by frame, so that each frame's previous BEV is the one its scene's previous frame got.

    Each batch slot of each process owns `lanes` lanes and visits them in turn (iteration it uses lane
    it % lanes), so consecutive iterations come from different scenes while a lane's next frame comes
    `lanes` iterations after its last one. The scenes of every epoch, in a permutation seeded by
    (seed, epoch), are dealt to all lanes of all processes in turn; a lane runs its scenes one after the
    other. With `warmup` > 0 (stream_warmup) the first `warmup` iterations are TrainOrder's shuffled ones,
    which BEVStream hands no previous BEV, and the stream starts after them. As TrainOrder, what
    iteration `it` sees depends on nothing but (seed, it)."""

    def __init__(self, dataset, batch_size, rank, world, seed, start, total, lanes, warmup=0):
        self.warmup = warmup                # iterations 0..warmup-1: TrainOrder's shuffled batches, no stream
        self.shuffled = TrainOrder(dataset, batch_size, rank, world, seed, start, min(warmup, total))
        first = dataset.scene_start + [len(dataset)]
        self.scenes = [list(range(a, b)) for a, b in zip(first[:-1], first[1:]) if b > a]
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.seed, self.start, self.total, self.lanes = seed, start, total, lanes
        self.n_lanes = world * batch_size * lanes

    def __len__(self):
        return self.total - self.start

    def lane_of(self, it, slot):
        """The global lane of batch slot `slot` at iteration `it` on this process (None in the warm-up)."""
        if it < self.warmup:
            return None
        return (self.rank * self.batch_size + slot) * self.lanes + (it - self.warmup) % self.lanes

    def lane_frames(self, lane, length):
        """The first `length` dataset indices lane `lane` visits."""
        frames, k = [], lane                        # k: position in the stream of scenes of all epochs
        while len(frames) < length:
            e, j = divmod(k, len(self.scenes))
            perm = np.random.default_rng([self.seed, e]).permutation(len(self.scenes))
            frames += self.scenes[perm[j]]
            k += self.n_lanes
        return frames[:length]

    def __iter__(self):
        yield from self.shuffled
        steps = max(self.total - self.warmup - 1, 0) // self.lanes + 1   # visits of each lane over the run
        mine = {self.lane_of(self.warmup + s, j) for s in range(self.lanes) for j in range(self.batch_size)}
        frames = {lane: self.lane_frames(lane, steps) for lane in mine}
        for it in range(max(self.start, self.warmup), self.total):
            visit = (it - self.warmup) // self.lanes
            yield [(frames[self.lane_of(it, j)][visit], item_seed(self.seed, it, self.rank, j))
                   for j in range(self.batch_size)]


class BEVStream:
    """history_draw 'stream': each lane's last BEV (no gradient), handed to the lane's next frame.

    `attach` puts prev_bev [B, Q, C], prev_can_bus [B, 18] and has_prev [B] into the batch (into the
    apprentice's view when distilling), has_prev being True where the lane's last frame is the frame just
    before this one in the same scene; a forward hook on the model keeps the BEV of each training forward,
    and `keep` files it under the batch's lanes. Its state goes into the checkpoint (exact resume)."""

    def __init__(self, model, order):
        self.order, self.memory, self.latest = order, {}, None
        model.register_forward_hook(self._hook)

    def _hook(self, module, inputs, out):
        if module.training:
            self.latest = out['bev_seq'].detach()                           # [B, Q, C]

    def attach(self, batch, it):
        view = batch.get('apprentice', batch)
        B = batch['img'].shape[0]
        # no lane (shuffled warm-up): no memory, every frame is predicted as a scene's first
        mems = [self.memory.get(self.order.lane_of(it, b)) for b in range(B)]
        has = [m is not None and m['index'] == int(batch['index'][b]) - 1 and m['scene'] == batch['scene_token'][b]
               for b, m in enumerate(mems)]
        view['has_prev'] = torch.tensor(has, dtype=torch.bool)                  # [B]
        view['prev_can_bus'] = torch.stack([m['can_bus'] if ok else torch.zeros(18) for m, ok in zip(mems, has)])
        like = next((m['bev'] for m in mems if m is not None), None)
        view['prev_bev'] = None if like is None else torch.stack(                # [B, Q, C]
            [m['bev'] if ok else torch.zeros_like(like) for m, ok in zip(mems, has)])
        return batch

    def keep(self, batch, it):
        """After the step: the BEV just made becomes each lane's memory."""
        view = batch.get('apprentice', batch)
        for b in range(self.latest.shape[0]):
            lane = self.order.lane_of(it, b)
            if lane is None:                        # shuffled warm-up: nothing to hand on
                continue
            self.memory[lane] = {
                'bev': self.latest[b], 'can_bus': view['can_bus'][b].detach().cpu().float(),
                'index': int(batch['index'][b]), 'scene': batch['scene_token'][b]}
        self.latest = None

    def state_dict(self):
        return {lane: {**m, 'bev': m['bev'].cpu()} for lane, m in self.memory.items()}

    def load_state_dict(self, state, device):
        self.memory = {int(lane): {**m, 'bev': m['bev'].to(device)} for lane, m in state.items()}


def ignore_sigint(worker_id):
    """Data workers leave Ctrl-C to the main process, which finishes the iteration and saves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Seeded(torch.utils.data.Dataset):
    """ds[(index, seed)]: the item drawn with Python's, numpy's and torch's generators seeded by `seed`
    (the dataset's random history frames and photometric distortion), identical in the main process
    and in any worker; the caller's generator states are restored afterwards."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        saved = rng_state()
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            set_rng_state(saved)


# ------------------------------------------------------------------------------------------------
# RNG states and checkpoints (plain dicts of builtins and tensors: torch.load(weights_only=True) reads them)


def rng_state():
    """torch, numpy and Python generator states as tensors and builtins."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, _ = random.getstate()
    state = {'torch': torch.get_rng_state(), 'numpy': torch.from_numpy(keys.astype(np.int64)),
             'numpy_pos': int(pos), 'numpy_gauss': (int(has_gauss), float(gauss)),
             'python': torch.tensor(py_state, dtype=torch.int64), 'python_version': version}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    np.random.set_state(('MT19937', state['numpy'].numpy().astype(np.uint32), state['numpy_pos'],
                         *state['numpy_gauss']))
    random.setstate((state['python_version'], tuple(int(v) for v in state['python'].tolist()), None))
    if 'cuda' in state and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])


# ------------------------------------------------------------------------------------------------
# Log and learning curve


def read_log(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curve(log_path, png_path):
    """Training loss (raw and smoothed) and lr against the iteration; val NDS/mAP when evaluated."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = read_log(log_path)
    train = [r for r in rows if 'loss' in r]
    evals = [r for r in rows if 'NDS' in r]
    if not train:
        return
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(11 if evals else 6, 4), squeeze=False)
    ax = axes[0, 0]
    its, loss = np.array([r['iter'] for r in train]), np.array([r['loss'] for r in train])
    ax.plot(its, loss, color='tab:blue', alpha=0.3, lw=1, label='loss (per log step)')
    k = min(9, len(loss))                              # centred moving average over k log steps
    smooth = np.convolve(loss, np.ones(k) / k, mode='valid')
    ax.plot(its[(k - 1) // 2:(k - 1) // 2 + len(smooth)], smooth, color='tab:blue', lw=2, label=f'mean of {k}')
    ax.set_xlabel('iteration')
    ax.set_ylabel('training loss (sum over decoder layers)')
    ax.legend(loc='upper right')
    lr_ax = ax.twinx()
    lr_ax.plot(its, [r['lr'] for r in train], color='tab:gray', lw=1, ls='--')
    lr_ax.set_ylabel('lr', color='tab:gray')
    if evals:
        ax = axes[0, 1]
        ax.plot([r['iter'] for r in evals], [r['NDS'] for r in evals], 'o-', label='val NDS')
        ax.plot([r['iter'] for r in evals], [r['mAP'] for r in evals], 's-', label='val mAP')
        ax.set_xlabel('iteration')
        ax.set_xlim(0, max(its.max(), max(r['iter'] for r in evals)) * 1.02)
        ax.set_ylim(0, max(0.3, max(r['NDS'] for r in evals) + 0.05))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = png_path + '.tmp.png'
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)


def peak_memory_mb(device):
    """Peak resident memory of this process and of its (data-loading) children, MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    out = {'peak_rss_mb': round(own, 1), 'peak_rss_workers_mb': round(children, 1)}
    if device.type == 'cuda':
        out['peak_cuda_mb'] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    return out


# ------------------------------------------------------------------------------------------------
# Setup: one helper per step, called in this order by setup_run. The order is part of the behaviour:
# a new run's weights, its distiller's own parts and its first GridMask all draw from the generators
# seeded in setup_run, so moving a step that draws would change every loss after it.


def setup_processes(device_flag):
    """(rank, world, device) of this process: the only one, or one of torchrun's (read from the
    variables torchrun sets), each on its own GPU and all joined in one process group."""
    world = int(os.environ.get('WORLD_SIZE', 1))
    rank, local_rank = int(os.environ.get('RANK', 0)), int(os.environ.get('LOCAL_RANK', 0))
    device = evaluate.pick_device(device_flag)
    if device.type == 'cuda' and world > 1:
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return rank, world, device


def resolve_args(args, explicit):
    """(args, ckpt). A new run: (args, None). --resume: the checkpoint's arguments except the flags typed
    now (`explicit`), --out defaulting to the checkpoint's folder, and the loaded checkpoint."""
    if not args.resume:
        return args, None
    ckpt = models.load_checkpoint(args.resume, '--resume')
    # flags added after a checkpoint was written keep the behaviour it was trained with
    older = {k: v for k, v in FLAG_BEFORE_IT_EXISTED.items() if k not in ckpt['args']}
    kept = {k: v for k, v in {**older, **ckpt['args']}.items() if k not in explicit and k != 'resume'}
    args = argparse.Namespace(**{**vars(args), **kept})
    args.out = args.out if 'out' in explicit else os.path.dirname(os.path.abspath(args.resume))
    return args, ckpt


def refuse_to_overwrite(args, ckpt):
    """A second run never destroys the first: a new run (or a resumed one sent to another folder) into an
    --out that holds a checkpoint stops with one line, unless --overwrite; nothing is written before."""
    resumed_here = ckpt is not None and os.path.abspath(args.out) == os.path.dirname(os.path.abspath(args.resume))
    held = [f for f in ('last.pt', 'best.pt') if os.path.exists(os.path.join(args.out, f))]
    if held and not resumed_here and not args.overwrite:
        last = os.path.join(args.out, held[0])
        raise InputError(f'--out {args.out} holds a run ({", ".join(held)}): continue it with --resume {last}, '
                         f'pick another --out, or pass --overwrite to replace it')


def set_threads(threads, world):
    """torch's CPU threads: --threads, else CPUs / processes under torchrun, else torch's default.
    Called after the resume merge: a resumed run uses its checkpoint's count, since the summation order
    of CPU kernels depends on it and exact resume needs the same order."""
    if threads or world > 1:
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // world))
    keep_freed_memory()                 # large CPU temporaries reused, not faulted in afresh (~9 % a step)


def run_config(args, ckpt):
    """The trained model's config: the checkpoint's on resume (--set is not applied again), else the
    preset with --set applied."""
    if ckpt is not None:
        return models.config_from_dict(ckpt['config'], what=f"--resume '{args.resume}'")
    return models.apply_overrides(models.preset_config(args.model or 'cpu-tiny', '--model'), args.set)


def seed_generators(seed):
    """Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_model(args, cfg, ckpt, device, say):
    """The detector being trained, on `device`: new weights from the seeded generators (the backbone's
    from --backbone-weights when given), or the checkpoint's on resume."""
    model = models.build_model(cfg)
    if args.backbone_weights and ckpt is None:
        left = backbone.load_backbone_weights(model.backbone, args.backbone_weights)
        left_note = f' ({len(left)} DCN offset tensors left at init)' if left else ''
        say(f'backbone weights from {args.backbone_weights}{left_note}')
    if ckpt is not None:
        model.load_state_dict(ckpt['model'])
    return model.to(device)


def make_distiller(args, cfg, model, ckpt, device):
    """(distiller, load_view, apprentice_view); distiller is None without --teacher.

    The distiller (distill.py: FD3D and the baselines) is one explicit wrapper: it holds the frozen
    expert and the apprentice (`model`) and its forward returns the loss dict. Its own trainable parts
    (generators, adapters) are trained with the apprentice and stored under the checkpoint's 'distiller'
    key. The loader reads every sample as the expert sees it (load_view) and, unless --kd-expert-input
    upsampled, also as the apprentice does (apprentice_view: its own size, history and CAN bus), so that
    the apprentice trains on the pixels its evaluation loads (distill.loader_views)."""
    if not args.teacher:
        return None, data.view_of(cfg), None
    expert, _, _ = models.model_from_checkpoint(args.teacher, '--teacher', args.teacher_preset)
    if streams(expert.cfg):
        raise InputError(f"--teacher '{args.teacher}': an expert trained with history_draw 'stream' cannot "
                         f"teach yet (it would see no previous BEV); use a queue-trained expert")
    distiller = distill.Distiller(
        expert=expert.to(device), apprentice=model, mode=args.distill, parts=args.fd3d_parts,
        select=args.fd3d_select, score=args.fd3d_score, gate=args.fd3d_gate, box_scale=args.fd3d_box_scale,
        mask_ratio=args.fd3d_mask_ratio, areas=args.fd3d_areas, bg_weight=args.fd3d_bg_weight,
        pv_norm=args.fd3d_pv_norm, w_pv=args.fd3d_w_pv, w_bev=args.fd3d_w_bev, w_focal=args.fd3d_w_focal,
        w_fitnet=args.kd_w_fitnet, w_heatmap=args.kd_w_heatmap, w_cwd=args.kd_w_cwd,
        expert_input=args.kd_expert_input, init_head=args.init_head_from_expert and ckpt is None).to(device)
    load_view, apprentice_view = distill.loader_views(expert.cfg, cfg, args.kd_expert_input)
    if ckpt is not None and 'distiller' in ckpt:
        distiller.kd.load_state_dict(ckpt['distiller'])
    return distiller, load_view, apprentice_view


def wrap_for_ddp(trained, world, device):
    """Under torchrun, DDP averages the gradients over the processes (and copies rank 0's initial
    weights to the others); not every parameter gets a gradient in every iteration, hence
    find_unused_parameters."""
    if world == 1:
        return trained
    return DDP(trained, device_ids=[device.index] if device.type == 'cuda' else None, find_unused_parameters=True)


def prepare_dataroot(args, rank, world, say):
    """The version of --dataroot ('auto' resolved to the one whose tables are there). The default
    synthetic world is written first when missing, by rank 0 while the others wait."""
    if args.dataroot == DEFAULT_DATAROOT and not os.path.isdir(args.dataroot):
        if rank == 0:
            say(f'writing the synthetic world to {args.dataroot} (once)')
            data.write_synthetic_world(args.dataroot, **data.DEFAULT_WORLD)
        if world > 1:
            dist.barrier()
    return data.resolve_version(args.dataroot, args.version)


def make_datasets(args, cfg, load_view, apprentice_view):
    """(train_set, val_set); val_set is None when nothing will be evaluated."""
    # photometric distortion: the trained model's preset decides unless --photometric/--no-photometric
    photometric = getattr(cfg, 'photometric', False) if args.photometric is None else args.photometric
    train_set = data.NuScenesDataset(args.dataroot, version=args.version, split='train', train=True,
                                     photometric=photometric, view=load_view, apprentice=apprentice_view)
    if args.no_eval and not args.eval_every:
        return train_set, None
    val_set = evaluate.eval_dataset(args.dataroot, args.version, 'val', cfg)
    return train_set, val_set


def count_iterations(args, n_train, world):
    """(per_epoch, total): iterations per pass over the train split (every process runs the same
    number) and in the whole run (--epochs passes, else --iters)."""
    per_epoch = n_train // world // args.batch_size
    if per_epoch == 0:
        raise InputError(f'--batch-size {args.batch_size}: the train split has only {n_train} samples '
                         f'for {world} process(es)')
    return per_epoch, (args.epochs * per_epoch if args.epochs else args.iters)


def make_loader(train_set, args, cfg, rank, world, start, total):
    """Batches for iterations start..total-1, in the order TrainOrder (or, for a streamed model,
    StreamOrder) fixes and with each item's randomness seeded by Seeded, so that where a run starts does
    not change what it sees."""
    if streams(cfg):
        order = StreamOrder(train_set, args.batch_size, rank, world, args.seed, start, total, cfg.stream_lanes,
                            warmup=round(cfg.stream_warmup * total))
    else:
        order = TrainOrder(train_set, args.batch_size, rank, world, args.seed, start, total)
    # The loader gets its own generator so that creating it never advances torch's global one.
    return DataLoader(Seeded(train_set), batch_sampler=order, collate_fn=data.collate, num_workers=args.workers,
                      generator=torch.Generator(), worker_init_fn=ignore_sigint)


def make_optimizer(args, model, trained, use_amp):
    """(optimizer, scaler, params). AdamW over the trainable parameters of `trained` (the model, or the
    distiller: the apprentice plus the distiller's own parts) in two groups, the backbone's at
    --backbone-lr-mult times the lr (the official configs: paramwise_cfg img_backbone lr_mult=0.1);
    the loss scaler of --amp (a no-op without it)."""
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    backbone_lr_mult = args.backbone_lr_mult
    if backbone_lr_mult is None:   # a pretrained ResNet is fine-tuned gently; one from scratch is not
        backbone_lr_mult = 0.1 if args.backbone_weights else 1.0
    # Deformable DETR's rule: the layers that place sampling points (reference points, sampling offsets)
    # learn at --points-lr-mult times the lr
    point_ids = {id(p) for n, p in model.named_parameters()
                 if n.split('.')[0] == 'reference_points' or '.sampling_offsets.' in n} - backbone_ids
    params = [p for p in trained.parameters() if p.requires_grad]
    rest = [p for p in params if id(p) not in backbone_ids]
    groups = [{'params': [p for p in params if id(p) in backbone_ids], 'lr_mult': backbone_lr_mult}]
    if args.points_lr_mult == 1.0 or not point_ids:   # two groups, as before the flag (resume keeps the order)
        groups.append({'params': rest, 'lr_mult': 1.0})
    else:
        groups += [{'params': [p for p in rest if id(p) not in point_ids], 'lr_mult': 1.0},
                   {'params': [p for p in rest if id(p) in point_ids], 'lr_mult': args.points_lr_mult}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay,
                                  fused=True)   # one fused kernel: ~10 ms less a CPU step
    return optimizer, torch.amp.GradScaler('cuda', enabled=use_amp), params


def make_ema(decay, model):
    """--ema: an exponential moving average of the model's weights and buffers (BatchNorm's running
    statistics too), updated after every optimiser step and scored instead of the trained weights; None
    when decay is 0. After n updates it is the average of the n weights seen, the k-th weighted by
    decay ** (n - k) (the moving average with Adam's bias correction, so the random initial weights are not
    in it): each update moves it toward the model by (1 - decay) / (1 - decay ** n), all the way at n = 1."""
    if not decay:
        return None
    if not 0.0 < decay < 1.0:
        raise InputError(f'--ema {decay}: the decay must be in (0, 1), e.g. 0.998 (or 0 for no average)')

    @torch.no_grad()
    def update(averaged, current, n_before):      # n_before: the updates before this one (>= 1)
        rate = (1.0 - decay) / (1.0 - decay ** (float(n_before) + 1.0))
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, rate)
        else:                       # integer buffers (BatchNorm's num_batches_tracked): the current value
            torch._foreach_copy_(averaged, current)

    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=update, use_buffers=True)


def start_log(log_path, resumed, start):
    """log.jsonl of this run (rank 0): a new run starts it empty; a resumed one keeps the lines up to its
    checkpoint's iteration and drops those after it (the resumed run writes them again)."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    rows = [r for r in read_log(log_path) if r['iter'] <= start] if resumed else []
    with open(log_path + '.tmp', 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in rows)
    os.replace(log_path + '.tmp', log_path)


@dataclasses.dataclass
class Run:
    """What the loop and its helpers share, made once by setup_run. Plain data (only `best` changes
    during the run)."""
    args: argparse.Namespace   # after the resume merge, with --model, --out and --version filled in
    cfg: object                # the trained model's config
    rank: int
    world: int
    device: torch.device
    use_amp: bool
    say: object                # print on rank 0, silent elsewhere
    model: torch.nn.Module     # the detector being trained (the apprentice when distilling)
    distiller: object          # distill.Distiller holding the expert and `model`, or None
    net: torch.nn.Module       # what the loop calls: the distiller, else the model; DDP-wrapped under torchrun
    params: list               # the trainable parameters (gradient clipping)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    val_set: object            # None when nothing is evaluated
    per_epoch: int             # iterations per pass over the train split
    start: int                 # first iteration (the checkpoint's on resume)
    total: int                 # iterations of the whole run
    log_path: str
    curve_path: str
    stream: object = None      # BEVStream for a streamed model (history_draw 'stream'), else None
    ema: object = None         # --ema: torch.optim.swa_utils.AveragedModel of `model`, else None
    best: float = -1.0         # best val NDS so far (-1: none yet); stored in every checkpoint

    @property
    def master(self):
        return self.rank == 0

    @property
    def scored(self):
        """The detector that evaluation scores: the EMA of the weights under --ema, else the model."""
        return self.ema.module if self.ema is not None else self.model


def setup_run(args, explicit):
    """(run, loader): everything before the first iteration, in the order it happens."""
    rank, world, device = setup_processes(args.device)
    say = print if rank == 0 else (lambda *a, **k: None)      # the other ranks stay silent
    args, ckpt = resolve_args(args, explicit)
    set_threads(args.threads, world)
    use_amp = args.amp and device.type == 'cuda'       # fp16 autocast and the loss scaler
    cfg = run_config(args, ckpt)
    args.model = cfg.name
    if not args.out:
        args.out = os.path.join('runs', f'{cfg.name}-{args.distill}' if args.teacher else cfg.name)
    refuse_to_overwrite(args, ckpt)      # before anything is written
    # every rank its own augmentation randomness (DDP copies rank 0's initial weights to the others)
    seed_generators(args.seed + rank)
    model = make_model(args, cfg, ckpt, device, say)
    distiller, load_view, apprentice_view = make_distiller(args, cfg, model, ckpt, device)
    if args.amp and device.type == 'cpu':      # the image CNNs in bfloat16, the rest float32
        for m in [model] + ([distiller.expert] if distiller is not None else []):
            m.cnn_bf16 = True
        if not cpu_has_bf16():
            say('note: --amp on this CPU runs the image CNN in bfloat16 without native bfloat16 support: expect '
                'it slower than float32')
    trained = distiller if distiller is not None else model
    net = wrap_for_ddp(trained, world, device)
    args.version = prepare_dataroot(args, rank, world, say)    # stored resolved in the checkpoint's args
    train_set, val_set = make_datasets(args, cfg, load_view, apprentice_view)
    per_epoch, total = count_iterations(args, len(train_set), world)
    start = ckpt['iter'] if ckpt is not None else 0
    loader = make_loader(train_set, args, cfg, rank, world, start, total)
    optimizer, scaler, params = make_optimizer(args, model, trained, use_amp)
    stream = BEVStream(model, loader.batch_sampler) if streams(cfg) else None
    ema = make_ema(args.ema, model)
    run = Run(args=args, cfg=cfg, rank=rank, world=world, device=device, use_amp=use_amp, say=say, model=model,
              distiller=distiller, net=net, params=params, optimizer=optimizer, scaler=scaler, val_set=val_set,
              per_epoch=per_epoch, start=start, total=total, log_path=os.path.join(args.out, 'log.jsonl'),
              curve_path=os.path.join(args.out, 'learning_curve.png'), stream=stream, ema=ema)
    if ckpt is not None:
        restore_state(run, ckpt)
    if run.master:
        start_log(run.log_path, ckpt is not None, start)
    n_params = sum(p.numel() for p in model.parameters())
    precision = ('fp16 autocast' if use_amp else 'the image CNN in bfloat16' if args.amp else 'float32')
    say(f'{cfg.name}: {n_params / 1e6:.2f} M parameters on {device}'
        + (f' x {world} processes' if world > 1 else '') + f' ({precision}); train {len(train_set)} samples, '
        f'{total} iterations of {args.batch_size} per process ({per_epoch} per epoch); out {args.out}'
        + (f'; resumed at iteration {start}' if ckpt is not None else ''))
    return run, loader


# ------------------------------------------------------------------------------------------------
# Checkpoints: save_state and restore_state are each other's inverse (the model's and the
# distiller's weights are restored where they are made, in make_model and make_distiller)


def save_state(run, it, path):
    """Every rank calls it (the RNG states of all ranks are gathered); rank 0 writes, atomically."""
    mine = {'rng': rng_state(), 'stream': run.stream.state_dict() if run.stream is not None else None}
    states = [None] * run.world
    if run.world > 1:
        dist.all_gather_object(states, mine)
    else:
        states = [mine]
    if not run.master:
        return
    state = {'model': run.model.state_dict(), 'config': dataclasses.asdict(run.cfg), 'args': vars(run.args),
             'optimizer': run.optimizer.state_dict(), 'scaler': run.scaler.state_dict(), 'iter': it,
             'rng': [m['rng'] for m in states], 'best': run.best}
    if run.stream is not None:   # each process's lanes: their last BEVs
        state['stream'] = [m['stream'] for m in states]
    if run.distiller is not None:   # its trainable parts only: the expert has its own checkpoint
        state['distiller'] = run.distiller.kd.state_dict()
    if run.ema is not None:   # the averaged weights (the model's keys) and how many steps they average
        state['ema'] = run.ema.module.state_dict()
        state['ema_steps'] = int(run.ema.n_averaged)
    save_checkpoint(state, path)


def restore_state(run, ckpt):
    """The optimiser, loss scaler, best NDS and generator states of a checkpoint. Called once the run
    is built: nothing after it draws from the generators before the first iteration."""
    run.optimizer.load_state_dict(ckpt['optimizer'])
    run.scaler.load_state_dict(ckpt['scaler'])
    run.best = ckpt.get('best', -1.0)
    # a checkpoint of another number of processes: every rank continues from rank 0's states
    set_rng_state(ckpt['rng'][run.rank] if len(ckpt['rng']) == run.world else ckpt['rng'][0])
    # the lanes' last BEVs; with another number of processes the lanes are others: they start afresh
    if run.stream is not None and len(ckpt.get('stream') or []) == run.world:
        run.stream.load_state_dict(ckpt['stream'][run.rank], run.device)
    if run.ema is not None:
        if 'ema' not in ckpt:
            raise InputError(f"--ema {run.args.ema}: '{run.args.resume}' was trained without an average of its "
                             f"weights; resume it without --ema")
        run.ema.module.load_state_dict(ckpt['ema'])
        run.ema.n_averaged.fill_(ckpt['ema_steps'])


def keep_if_best(run, it, summary):
    """The one writer of best.pt: the full state (as last.pt) whenever val NDS beats the best so far.
    Rank 0 decides (it holds the metrics); every rank takes part in the save."""
    improved = None
    if run.master:
        improved = summary['nd_score'] > run.best
        run.best = max(run.best, summary['nd_score'])
    if run.world > 1:
        improved = broadcast(improved)
    if improved:
        save_state(run, it, os.path.join(run.args.out, 'best.pt'))


def broadcast(value):
    """Rank 0's value, on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ------------------------------------------------------------------------------------------------
# The pieces of one iteration, and what happens around the loop


class CtrlC:
    """While installed, the first Ctrl-C only sets `pressed`: the loop finishes the iteration, saves
    last.pt and returns. A second one stops at once."""

    def __init__(self):
        self.pressed = False
        self.previous = signal.signal(signal.SIGINT, self.on_sigint)

    def on_sigint(self, signum, frame):
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True

    def uninstall(self):
        signal.signal(signal.SIGINT, self.previous)


def clock():
    """(wall seconds, CPU seconds of this process, all threads)."""
    return time.perf_counter(), time.process_time()


def train_step(run, batch, it, lr, ctrl_c):
    """One optimiser step at learning rate lr (the backbone's group at its multiple); returns
    (loss, losses, grad_norm, stop). All ranks decide alike: a non-finite loss on any of them raises
    before any weight changes, and a Ctrl-C on any of them stops all after this step."""
    for group in run.optimizer.param_groups:
        group['lr'] = lr * group['lr_mult']
    with torch.autocast(run.device.type, dtype=torch.float16, enabled=run.use_amp):
        if run.distiller is not None:
            losses = run.net(batch)              # the distiller's forward returns the loss dict
        else:
            losses = run.model.loss(run.net(batch), batch)
    loss = sum(losses.values())
    # read after the forward, so that a Ctrl-C during it stops the run after this iteration
    flags = torch.tensor([float(not torch.isfinite(loss)), float(ctrl_c.pressed)], device=run.device)
    if run.world > 1:
        dist.all_reduce(flags)
    if flags[0] > 0:
        values = {k: round(v.item(), 4) for k, v in losses.items()}
        raise FloatingPointError(f'non-finite loss at iteration {it} (lr {lr:.3g}): {values}')
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.unscale_(run.optimizer)        # clip the true gradients, not the scaled ones
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, run.args.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return loss, losses, grad_norm, bool(flags[1] > 0)


def diagnostics(model):
    """Per-part gradient norms and BatchNorm statistics for log.jsonl: where a rising loss or a gradient
    spike comes from (docs/experiments.md, "A steadier recipe"). gn_<part>: L2 norm of the gradients (after
    clipping; grad_norm is the total before) of each top-level part of the detector (backbone, neck,
    encoder, decoder, cls_branches, reg_branches, reference_points, query_embedding, ...);
    bn_mean_max / bn_var_max: the largest |running mean| and running variance over the backbone's
    BatchNorm layers."""
    row, parts = {}, dict(model.named_children())
    parts.update({n: p for n, p in model.named_parameters(recurse=False)})     # level_embeds, cams_embeds
    for name, part in parts.items():
        params = [part] if isinstance(part, torch.nn.Parameter) else list(part.parameters())
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            row[f'gn_{name}'] = round(float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))), 4)
    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
           and m.running_mean is not None]
    if bns:
        row['bn_mean_max'] = max(float(m.running_mean.abs().max()) for m in bns)
        row['bn_var_max'] = max(float(m.running_var.max()) for m in bns)
    return row


def append_log(path, row):
    with open(path, 'a') as f:
        f.write(json.dumps(row) + '\n')


def log_means(run, window, it, lr):
    """One log.jsonl line at iteration it + 1: the means of the iterations since the last line, over
    the ranks too."""
    mean = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
    if run.world > 1:
        vec = torch.tensor(list(mean.values()), device=run.device)
        dist.all_reduce(vec)
        mean = dict(zip(mean, (vec / run.world).tolist()))
    if run.master:
        append_log(run.log_path, {'iter': it + 1, 'epoch': it // run.per_epoch, 'lr': lr,
                                  **{k: round(v, 5) for k, v in mean.items()}})


def evaluate_now(run, out_dir, quiet):
    """Metrics of the current weights on val (all ranks share the work); training RNG states are left
    untouched, so evaluating does not change the run. In float32 even under --amp on the CPU, so that
    `evaluate.py --ckpt` gives the same numbers."""
    model = run.scored
    saved, cnn_bf16 = rng_state(), getattr(model, 'cnn_bf16', False)   # (a stand-in model has none)
    model.cnn_bf16 = False
    try:
        with open(os.devnull, 'w') as devnull, \
                (contextlib.redirect_stdout(devnull) if quiet else contextlib.nullcontext()):
            summary = evaluate.evaluate_split(model, run.val_set, out_dir, run.device,
                                              evaluate.eval_set_name(run.args.version, 'val'), run.rank, run.world,
                                              workers=min(run.args.workers, 1), progress=not quiet)
    finally:
        model.cnn_bf16 = cnn_bf16
    set_rng_state(saved)
    return summary


def periodic_eval(run, done, bar):
    """--eval-every: evaluate quietly into OUT/eval, log the metrics, keep best.pt."""
    summary = evaluate_now(run, os.path.join(run.args.out, 'eval'), quiet=True)
    if run.master:
        append_log(run.log_path, {'iter': done, 'NDS': summary['nd_score'], 'mAP': summary['mean_ap']})
        bar.write(f"iteration {done}: val NDS {summary['nd_score']:.4f} mAP {summary['mean_ap']:.4f}")
        plot_curve(run.log_path, run.curve_path)
    keep_if_best(run, done, summary)


def log_speed(run):
    """After the loop (rank 0): median time per iteration and peak memory, printed and logged."""
    rows = read_log(run.log_path)
    times, cpu = [r['dt'] for r in rows if 'dt' in r], [r['cpu'] for r in rows if 'cpu' in r]
    if not times:
        return
    memory = peak_memory_mb(run.device)
    load = os.getloadavg()[0]
    run.say(f'time per iteration {np.median(times):.3f} s wall, {np.median(cpu):.3f} s CPU (medians of the '
            f'logged steps; load average {load:.1f} on {os.cpu_count()} CPUs); peak memory {memory}')
    append_log(run.log_path, {'iter': run.total, 'time_per_iter_s': float(np.median(times)),
                              'cpu_per_iter_s': float(np.median(cpu)), 'load_average': load, **memory})
    plot_curve(run.log_path, run.curve_path)


def final_eval(run, t_start):
    """The final evaluation into --out (the submission and the devkit's files), logged; best.pt is
    updated when periodic evaluation keeps one; the last stdout line is `NDS x mAP y`."""
    summary = evaluate_now(run, run.args.out, quiet=False)
    if run.master:
        append_log(run.log_path, {'iter': run.total, 'NDS': summary['nd_score'], 'mAP': summary['mean_ap'],
                                  'final': True})
        plot_curve(run.log_path, run.curve_path)
    if run.args.eval_every:
        keep_if_best(run, run.total, summary)
    if run.master:
        run.say(f'total wall time {(time.perf_counter() - t_start) / 60:.1f} min')
        evaluate.print_last_line(summary)
    return summary


# ------------------------------------------------------------------------------------------------
# Training: the loop


def train(args, explicit=()):
    """Run the whole job; returns {'iter', 'interrupted', 'summary'} (summary: final metrics on rank 0)."""
    t_start = time.perf_counter()
    run, loader = setup_run(args, explicit)
    args, last_pt = run.args, os.path.join(run.args.out, 'last.pt')
    run.net.train()
    from tqdm import tqdm
    bar = tqdm(total=run.total, initial=run.start, disable=not run.master, dynamic_ncols=True, desc='train')
    window, last = [], clock()
    ctrl_c = CtrlC()
    try:
        for it, batch in enumerate(loader, run.start):
            lr = get_lr(it, args.lr, run.total, args.warmup, args.min_lr_ratio)
            if run.stream is not None:
                run.stream.attach(batch, it)        # the lanes' previous BEVs
            loss, losses, grad_norm, stop = train_step(run, data.to_device(batch, run.device), it, lr, ctrl_c)
            if run.ema is not None:
                run.ema.update_parameters(run.model)
            if run.stream is not None:
                run.stream.keep(batch, it)
            now = clock()
            # dt: wall seconds of the iteration (data wait included); cpu: CPU seconds this process
            # used for it (all threads), a figure that other jobs on a shared machine do not inflate
            window.append({'loss': loss.item(), **{k: v.item() for k, v in losses.items()},
                           'grad_norm': float(grad_norm), **diagnostics(run.model),
                           'dt': now[0] - last[0], 'cpu': now[1] - last[1]})
            last = now
            bar.update(1)
            bar.set_postfix(loss=f"{window[-1]['loss']:.3f}", lr=f'{lr:.2e}')
            done = it + 1
            if done % args.log_every == 0 or done == run.total:
                log_means(run, window, it, lr)
                window = []
            if args.eval_every and done % args.eval_every == 0 and done < run.total:
                periodic_eval(run, done, bar)
                run.net.train()             # evaluation left it in eval mode
                last = clock()              # the evaluation's time belongs to no iteration
            if done % args.ckpt_every == 0 or done == run.total or stop:
                save_state(run, done, last_pt)
                last = clock()              # nor the checkpoint's
            if stop:
                bar.close()
                run.say(f'interrupted: saved {last_pt} at iteration {done}; continue with '
                        f'`python train.py --resume {last_pt}`')
                return {'iter': done, 'interrupted': True, 'summary': None}
    finally:
        ctrl_c.uninstall()
        bar.close()
    if run.start >= run.total:
        run.say(f'nothing to train: the checkpoint is at iteration {run.start} of {run.total}')
    if run.master:
        log_speed(run)
    summary = None if args.no_eval else final_eval(run, t_start)
    return {'iter': run.total, 'interrupted': False, 'summary': summary}


# ------------------------------------------------------------------------------------------------
# Command line


def main(argv=None):
    args, explicit = get_args(argv)
    try:
        result = train(args, explicit)
    except InputError as e:
        print(f'error: {evaluate.one_line(e)}', file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(3)
    finally:
        if dist.is_initialized():
            # The DDP wrapper sits in reference cycles, so only the garbage collector frees it; left to
            # interpreter exit, its gloo group's teardown aborted a rank in 1 of 54 looped torchrun tests
            # (SIGABRT after the final line). Collect first, then destroy the group (the suspected
            # cause; the rate is too low to confirm a fix quickly).
            gc.collect()
            dist.destroy_process_group()
    if result['interrupted']:
        sys.exit(130)


if __name__ == '__main__':
    main()
