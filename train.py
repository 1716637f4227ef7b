"""Train a camera-only 3D detector (BEVFormer or DETR3D), plainly or distilled (FD3D), on one CPU,
one GPU or many (torchrun), then evaluate it with the official nuScenes metrics.

    python train.py                                   # synthetic world (written if missing), cpu-tiny, evaluate
    python train.py --model cpu-base --out runs/expert
    python train.py --teacher runs/expert/last.pt --student cpu-tiny             # FD3D by default
    python train.py --model tiny --dataroot /data/nuscenes --version v1.0-trainval --epochs 24 \\
                    --lr 2e-4 --backbone-weights resnet50.pth
    torchrun --nproc_per_node=8 train.py ...          # DDP; --batch-size is per process

One flat loop, in the order things happen: arguments -> config (preset + --set) -> model (and
distiller) -> data in a resumable order -> AdamW (backbone 0.1x lr) -> the loop (get_lr, forward,
NaN guard, backward, clip, step, log, evaluate, checkpoint, Ctrl-C) -> final evaluation.
Defaults of the schedule are tuned for the synthetic default run; the official nuScenes recipe is
`--epochs 24 --lr 2e-4` on 8 GPUs x 1 sample (architecture.md section 1).

Exact resume (CPU): the data order depends only on (seed, iteration) (a DistributedSampler
permutation per epoch), every loaded item draws its randomness (history frames, photometric
distortion) from a seed fixed by (seed, iteration, slot), the model's own randomness (GridMask)
draws from torch's global generator, whose state the checkpoint stores with numpy's and Python's,
and lr is a pure function of the iteration. So an interrupted and resumed run ends with
bit-identical weights to an uninterrupted one.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import resource
import signal
import sys
import time

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
from common import InputError, save_checkpoint

DEFAULT_DATAROOT = 'data/synthetic'
# the value that reproduces the behaviour before each flag existed (resuming an older checkpoint)
FLAG_BEFORE_IT_EXISTED = {'fd3d_gate': 0.0}

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
    # every choice the FD3D paper leaves open (README "Paper notes"; defaults from specs/fd3d.md)
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
    g.add_argument('--weight-decay', type=float, default=0.01, help='AdamW weight decay')
    g.add_argument('--grad-clip', type=float, default=35.0, help='max L2 norm of all gradients')
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
    g.add_argument('--amp', action='store_true', help='fp16 autocast and loss scaling (CUDA only; ignored on CPU)')
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
# Training


def train(args, explicit=()):
    """Run the whole job; returns {'iter', 'interrupted', 'summary'} (summary: final metrics on rank 0)."""
    t_start = time.perf_counter()
    # -- processes and device ------------------------------------------------------------------
    world = int(os.environ.get('WORLD_SIZE', 1))
    rank, local_rank = int(os.environ.get('RANK', 0)), int(os.environ.get('LOCAL_RANK', 0))
    device = evaluate.pick_device(args.device)
    if device.type == 'cuda' and world > 1:
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    # -- resume: the checkpoint's arguments, except flags typed now ------------------------------
    ckpt = None
    if args.resume:
        ckpt = models.load_checkpoint(args.resume, '--resume')
        # flags added after a checkpoint was written keep the behaviour it was trained with
        older = {k: v for k, v in FLAG_BEFORE_IT_EXISTED.items() if k not in ckpt['args']}
        kept = {k: v for k, v in {**older, **ckpt['args']}.items() if k not in explicit and k != 'resume'}
        args = argparse.Namespace(**{**vars(args), **kept})
        args.out = args.out if 'out' in explicit else os.path.dirname(os.path.abspath(args.resume))
    # after the resume merge: a resumed run uses the checkpoint's thread count, since the summation
    # order of CPU kernels depends on it and exact resume needs the same order
    if args.threads or world > 1:
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    use_amp = args.amp and device.type == 'cuda'
    if args.amp and not use_amp:
        say('note: --amp is ignored on the CPU (autocast only pays off on CUDA)')

    # -- config and model -------------------------------------------------------------------------
    if ckpt is not None:
        cfg = models.config_from_dict(ckpt['config'], what=f"--resume '{args.resume}'")
    else:
        cfg = models.apply_overrides(models.preset_config(args.model or 'cpu-tiny', '--model'), args.set)
    args.model = cfg.name
    if not args.out:
        args.out = os.path.join('runs', f'{cfg.name}-{args.distill}' if args.teacher else cfg.name)
    refuse_to_overwrite(args, ckpt)
    # every rank its own augmentation randomness (DDP copies rank 0's initial weights to the others)
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)
    model = models.build_model(cfg)
    if args.backbone_weights and ckpt is None:
        left = backbone.load_backbone_weights(model.backbone, args.backbone_weights)
        left_note = f' ({len(left)} DCN offset tensors left at init)' if left else ''
        say(f'backbone weights from {args.backbone_weights}{left_note}')
    if ckpt is not None:
        model.load_state_dict(ckpt['model'])
    model.to(device)

    # ---- distillation (FD3D and baselines; owned by distill.py) ---------------------------------
    # The distiller is one explicit wrapper: it holds the frozen expert and the apprentice (`model`)
    # and its forward returns the loss dict. Its own trainable parts (generators, adapters) are
    # trained with the apprentice and stored under the checkpoint's 'distiller' key.
    # The loader reads at the expert's resolution and serves the longer history of the two models.
    distiller, load_view, apprentice_view = None, data.view_of(cfg), None
    if args.teacher:
        expert, _, _ = models.model_from_checkpoint(args.teacher, '--teacher', args.teacher_preset)
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
    # ---------------------------------------------------------------------------------------------
    trained = distiller if distiller is not None else model
    net = DDP(trained, device_ids=[device.index] if device.type == 'cuda' else None,
              find_unused_parameters=True) if world > 1 else trained

    # -- data ---------------------------------------------------------------------------------------
    if args.dataroot == DEFAULT_DATAROOT and not os.path.isdir(args.dataroot):
        if master:
            say(f'writing the synthetic world to {args.dataroot} (once)')
            data.write_synthetic_world(args.dataroot, **data.DEFAULT_WORLD)
        if world > 1:
            dist.barrier()
    args.version = data.resolve_version(args.dataroot, args.version)     # 'auto' -> the folder's version
    # photometric distortion: the trained model's preset decides unless --photometric/--no-photometric
    photometric = getattr(cfg, 'photometric', False) if args.photometric is None else args.photometric
    train_set = data.NuScenesDataset(args.dataroot, version=args.version, split='train', train=True,
                                     photometric=photometric, view=load_view, apprentice=apprentice_view)
    val_set = None if args.no_eval and not args.eval_every else data.NuScenesDataset(
        args.dataroot, version=args.version, split='val', train=False, view=data.view_of(cfg, queue_length=1))
    per_epoch = len(train_set) // world // args.batch_size
    if per_epoch == 0:
        raise InputError(f'--batch-size {args.batch_size}: the train split has only {len(train_set)} samples '
                         f'for {world} process(es)')
    total = args.epochs * per_epoch if args.epochs else args.iters
    start = ckpt['iter'] if ckpt is not None else 0
    order = TrainOrder(train_set, args.batch_size, rank, world, args.seed, start, total)
    # The loader gets its own generator so that creating it never advances torch's global one.
    loader = DataLoader(Seeded(train_set), batch_sampler=order, collate_fn=data.collate, num_workers=args.workers,
                        generator=torch.Generator(), worker_init_fn=ignore_sigint)

    # -- optimiser: AdamW, backbone at 0.1x lr (architecture.md section 1) -------------------------
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    backbone_lr_mult = args.backbone_lr_mult
    if backbone_lr_mult is None:   # a pretrained ResNet is fine-tuned gently; one from scratch is not
        backbone_lr_mult = 0.1 if args.backbone_weights else 1.0
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([
        {'params': [p for p in params if id(p) in backbone_ids], 'lr_mult': backbone_lr_mult},
        {'params': [p for p in params if id(p) not in backbone_ids], 'lr_mult': 1.0},
    ], lr=args.lr, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler('cuda', enabled=use_amp)
    best = -1.0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt['optimizer'])
        scaler.load_state_dict(ckpt['scaler'])
        best = ckpt.get('best', -1.0)

    # -- output folder, log ---------------------------------------------------------------------------
    log_path, curve_path = os.path.join(args.out, 'log.jsonl'), os.path.join(args.out, 'learning_curve.png')
    if master:
        os.makedirs(args.out, exist_ok=True)
        rows = [r for r in read_log(log_path) if r['iter'] <= start] if ckpt is not None else []
        with open(log_path + '.tmp', 'w') as f:      # a resumed run drops what came after its checkpoint
            f.writelines(json.dumps(r) + '\n' for r in rows)
        os.replace(log_path + '.tmp', log_path)
    n_params = sum(p.numel() for p in model.parameters())
    say(f'{cfg.name}: {n_params / 1e6:.2f} M parameters on {device}'
        + (f' x {world} processes' if world > 1 else '') + f'; train {len(train_set)} samples, '
        f'{total} iterations of {args.batch_size} per process ({per_epoch} per epoch); out {args.out}'
        + (f'; resumed at iteration {start}' if ckpt is not None else ''))

    def checkpoint(it, path):
        """Every rank calls it (the RNG states of all ranks are gathered); rank 0 writes."""
        states = [None] * world
        if world > 1:
            dist.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        if not master:
            return
        state = {'model': model.state_dict(), 'config': dataclasses.asdict(cfg), 'args': vars(args),
                 'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(), 'iter': it,
                 'rng': states, 'best': best}
        if distiller is not None:   # its trainable parts only: the expert has its own checkpoint
            state['distiller'] = distiller.kd.state_dict()
        save_checkpoint(state, path)

    def run_eval(out_dir, quiet):
        """Evaluate the current weights on val; training RNG states are left untouched."""
        saved = rng_state()
        with open(os.devnull, 'w') as devnull, \
                (contextlib.redirect_stdout(devnull) if quiet else contextlib.nullcontext()):
            summary = evaluate.evaluate_split(model, val_set, out_dir, device,
                                              evaluate.eval_set_name(args.version, 'val'), rank, world,
                                              workers=min(args.workers, 1), progress=not quiet)
        set_rng_state(saved)
        return summary

    # -- Ctrl-C: finish the iteration, save, exit cleanly ---------------------------------------------
    interrupted = {'flag': False}

    def on_sigint(signum, frame):
        if interrupted['flag']:            # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        interrupted['flag'] = True

    previous_handler = signal.signal(signal.SIGINT, on_sigint)

    # -- the loop ------------------------------------------------------------------------------------
    if ckpt is not None:
        set_rng_state(ckpt['rng'][rank] if len(ckpt['rng']) == world else ckpt['rng'][0])
    net.train()
    from tqdm import tqdm
    bar = tqdm(total=total, initial=start, disable=not master, dynamic_ncols=True, desc='train')
    window, t_last, cpu_last, it = [], time.perf_counter(), time.process_time(), start
    try:
        for it, batch in enumerate(loader, start):
            batch = data.to_device(batch, device)
            lr = get_lr(it, args.lr, total, args.warmup, args.min_lr_ratio)
            for group in optimizer.param_groups:
                group['lr'] = lr * group['lr_mult']
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                if distiller is not None:
                    losses = net(batch)
                else:
                    losses = model.loss(net(batch), batch)
            loss = sum(losses.values())
            # NaN/Inf guard (all ranks agree) and Ctrl-C (all ranks stop at the same iteration)
            flags = torch.tensor([float(not torch.isfinite(loss)), float(interrupted['flag'])], device=device)
            if world > 1:
                dist.all_reduce(flags)
            if flags[0] > 0:
                values = {k: round(v.item(), 4) for k, v in losses.items()}
                raise FloatingPointError(f'non-finite loss at iteration {it} (lr {lr:.3g}): {values}')
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            scaler.step(optimizer)
            scaler.update()

            now, cpu_now = time.perf_counter(), time.process_time()
            # dt: wall seconds of the iteration (data wait included); cpu: CPU seconds this process
            # used for it (all threads), a figure that other jobs on a shared machine do not inflate
            window.append({'loss': loss.item(), **{k: v.item() for k, v in losses.items()},
                           'grad_norm': float(grad_norm), 'dt': now - t_last, 'cpu': cpu_now - cpu_last})
            t_last, cpu_last = now, cpu_now
            bar.update(1)
            bar.set_postfix(loss=f"{window[-1]['loss']:.3f}", lr=f'{lr:.2e}')
            done = it + 1
            if done % args.log_every == 0 or done == total:
                mean = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
                if world > 1:
                    vec = torch.tensor(list(mean.values()), device=device)
                    dist.all_reduce(vec)
                    mean = dict(zip(mean, (vec / world).tolist()))
                if master:
                    with open(log_path, 'a') as f:
                        f.write(json.dumps({'iter': done, 'epoch': it // per_epoch, 'lr': lr,
                                            **{k: round(v, 5) for k, v in mean.items()}}) + '\n')
                window = []
            if args.eval_every and done % args.eval_every == 0 and done < total:
                summary = run_eval(os.path.join(args.out, 'eval'), quiet=True)
                if master:
                    with open(log_path, 'a') as f:
                        row = {'iter': done, 'NDS': summary['nd_score'], 'mAP': summary['mean_ap']}
                        f.write(json.dumps(row) + '\n')
                    bar.write(f"iteration {done}: val NDS {summary['nd_score']:.4f} mAP {summary['mean_ap']:.4f}")
                    improved = summary['nd_score'] > best
                    best = max(best, summary['nd_score'])
                    plot_curve(log_path, curve_path)
                if world > 1:
                    improved = broadcast(improved if master else None)
                if improved:
                    checkpoint(done, os.path.join(args.out, 'best.pt'))
                net.train()
                t_last, cpu_last = time.perf_counter(), time.process_time()
            if done % args.ckpt_every == 0 or done == total or flags[1] > 0:
                checkpoint(done, os.path.join(args.out, 'last.pt'))
                t_last, cpu_last = time.perf_counter(), time.process_time()
            if flags[1] > 0:
                bar.close()
                say(f'interrupted: saved {os.path.join(args.out, "last.pt")} at iteration {done}; continue with '
                    f'`python train.py --resume {os.path.join(args.out, "last.pt")}`')
                return {'iter': done, 'interrupted': True, 'summary': None}
        it = total
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        bar.close()
    if start >= total:
        say(f'nothing to train: the checkpoint is at iteration {start} of {total}')
    rows = read_log(log_path) if master else []
    times, cpu = [r['dt'] for r in rows if 'dt' in r], [r['cpu'] for r in rows if 'cpu' in r]
    memory = peak_memory_mb(device)
    if master and times:
        load = os.getloadavg()[0]
        say(f'time per iteration {np.median(times):.3f} s wall, {np.median(cpu):.3f} s CPU (medians of the '
            f'logged steps; load average {load:.1f} on {os.cpu_count()} CPUs); peak memory {memory}')
        with open(log_path, 'a') as f:
            f.write(json.dumps({'iter': total, 'time_per_iter_s': float(np.median(times)),
                                'cpu_per_iter_s': float(np.median(cpu)), 'load_average': load, **memory}) + '\n')
        plot_curve(log_path, curve_path)

    # -- final evaluation ----------------------------------------------------------------------------------
    summary = None
    if not args.no_eval:
        summary = run_eval(args.out, quiet=False)
        if master:
            with open(log_path, 'a') as f:
                f.write(json.dumps({'iter': total, 'NDS': summary['nd_score'], 'mAP': summary['mean_ap'],
                                    'final': True}) + '\n')
            plot_curve(log_path, curve_path)
            if args.eval_every and summary['nd_score'] > best:
                best = summary['nd_score']
                save_checkpoint({**torch.load(os.path.join(args.out, 'last.pt'), weights_only=True),
                                 'best': best}, os.path.join(args.out, 'best.pt'))
            say(f'total wall time {(time.perf_counter() - t_start) / 60:.1f} min')
            evaluate.print_last_line(summary)
    return {'iter': total, 'interrupted': False, 'summary': summary}


def refuse_to_overwrite(args, ckpt):
    """A second run never destroys the first: a new run (or a resumed one sent to another folder) into an
    --out that holds a checkpoint stops with one line, unless --overwrite; nothing is written before."""
    resumed_here = ckpt is not None and os.path.abspath(args.out) == os.path.dirname(os.path.abspath(args.resume))
    held = [f for f in ('last.pt', 'best.pt') if os.path.exists(os.path.join(args.out, f))]
    if held and not resumed_here and not args.overwrite:
        last = os.path.join(args.out, held[0])
        raise InputError(f'--out {args.out} holds a run ({", ".join(held)}): continue it with --resume {last}, '
                         f'pick another --out, or pass --overwrite to replace it')


def broadcast(value):
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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
            dist.destroy_process_group()
    if result['interrupted']:
        sys.exit(130)


if __name__ == '__main__':
    main()
