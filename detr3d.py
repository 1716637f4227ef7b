"""DETR3D in plain PyTorch: only what differs from BEVFormer.

Paper: Wang et al., "DETR3D: 3D Object Detection from Multi-view Images via 3D-to-2D Queries", CoRL 2021.
Official code: github.com/WangYueFt/detr3d (an mmdet3d plugin). DETR3D has no BEV:
each object query owns a 3D reference point, projects it into every camera and FPN level, samples the
image features there and refines the point layer by layer. This file follows that data path:

  images -> ResNet + FPN                                  (backbone.py, shared)
  -> Detr3DCrossAtten: the reference point projected into all cameras and levels, bilinear samples,
     sigmoid weights x visibility, summed; + a positional encoding of the reference point (every layer)
  -> decoder layers (self-attn, LN, Detr3DCrossAtten, LN, FFN, LN; bevformer.DecoderLayer) with
     iterative refinement of the full 3D reference (bevformer.refine_boxes)
  -> heads, Hungarian matching, focal + L1 losses, NMS-free decoding   (bevformer.py, shared)
  -> presets, the detector, official checkpoints, `python detr3d.py convert`.
FD3D for DETR3D (focal distillation at the expert queries' projected reference points, which reads the
expert's out['dec'] uv/mask/attn through `sample_reference_features`) is in distill.py with the rest of
the method.

What is shared is imported, never copied: the image path (`extract_feats`), the loss and the decoding
are BEVFormer's methods, which read only `cfg`, `backbone`, `neck`, `grid_mask` and `out['dec']` (the
official Detr3DHead has the same branches, Hungarian assigner, focal + L1 losses and NMS-free coder as
BEVFormer's head).

Where we differ from the official code:
* Boxes use the nuScenes-native yaw (README "Conventions"); the official mmdet3d yaw is converted once,
  in `load_official` (the same (sin, cos) row conversion as BEVFormer's).
* The projection is `bevformer.project_points` (fp32, eps 1e-5, strictly inside the padded image): the
  official `feature_sampling` written once for both detectors. lidar2img and the padded size come from
  the batch, per sample (the official code reads them from img_metas).
* `num_points` is fixed at 1 (the official value; its feature_sampling samples one point per camera and
  level whatever num_points says), so the weights are [B, Q, N, L] without a points axis.
* The official FPN receives C2..C5 and starts at C3 (`start_level=1`); we hand it C3..C5 directly
  (`backbone_out=(1, 2, 3)`): the same maps, parameters and keys, one unused C2 output less.
* `detr3d-r50` (the FD3D paper's apprentice) and the CPU presets are ours (no official config exists).

Shape letters: B batch, N cameras, C channels, Q object queries, L FPN levels, K boxes, H/W sizes.
"""
import os
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import bevformer
from bevformer import (BEVFormer, DecoderLayer, DetectorConfig, cls_branch,
                       inverse_sigmoid, object_queries, project_points, reg_branch, refine_boxes)
from backbone import build_image_backbone
from common import InputError, save_checkpoint


# ---------------------------------------------------------------------------------------------
# Configuration (flat fields, so that `train.py --set key=value` can override any of them)
# ---------------------------------------------------------------------------------------------

@dataclass
class DETR3DConfig(DetectorConfig):
    """bevformer.DetectorConfig (input, backbone, width, loss, decoding) with DETR3D's defaults; DETR3D
    adds no field of its own (no BEV, one point per camera and level)."""
    name: str = 'detr3d-cpu-tiny'
    detector: str = 'detr3d'
    queue_length: int = 1          # DETR3D is single-frame (the loader serves no history)
    backbone_out: tuple = (1, 2, 3)
    fpn_levels: int = 4            # L: the decoder samples every level

    def checks(self):
        """-> [(condition, message)]: DetectorConfig's checks plus DETR3D's own."""
        return super().checks() + [
            (self.detector == 'detr3d', f"detector must be 'detr3d', got {self.detector!r}"),
            (self.queue_length == 1, f'queue_length must be 1 (DETR3D is single-frame), got {self.queue_length}'),
        ]


# ---------------------------------------------------------------------------------------------
# Feature sampling at the projected reference points (paper Sec. 3.2, "2D-to-3D transformation"; official
# detr3d_transformer.py::feature_sampling and Detr3DCrossAtten)
# ---------------------------------------------------------------------------------------------

def project_reference_points(ref, lidar2img, pad_hw, pc_range):
    """ref [B, Q, 3] normalised to pc_range; lidar2img [B, N, 4, 4]; pad_hw (H, W) of the padded image.

    Returns uv [B, Q, N, 2]: the metric point's projection in each camera, normalised by the padded
    (W, H) (0..1 inside the image), and mask [B, Q, N] bool: in front of the camera (depth > 1e-5) and
    strictly inside the image (official: -1 < 2 uv - 1 < 1). Differentiable in ref."""
    lo, hi = ref.new_tensor(pc_range[:3]), ref.new_tensor(pc_range[3:])
    pts = ref * (hi - lo) + lo                                                  # [B, Q, 3] metres, LIDAR_TOP
    # bevformer.project_points projects one point set into the cameras of a batch: once per sample
    proj = [project_points(p[None], m[None], pad_hw) for p, m in zip(pts, lidar2img)]   # [N, 1, Q, 1, 2], [N, 1, Q, 1]
    uv = torch.cat([u for u, _ in proj], 1)[:, :, :, 0].permute(1, 2, 0, 3)   # [N, B, Q, 2] -> [B, Q, N, 2]
    mask = torch.cat([m for _, m in proj], 1)[..., 0].permute(1, 2, 0)        # [N, B, Q] -> [B, Q, N]
    return uv, mask


def sample_reference_features(fpn, uv, mask, attn):
    """s_q = sum over cameras n and levels l of attn[q, n, l] * mask[q, n] * bilinear(F_l[n], uv[q, n]).

    fpn: list over L of [B, N, C, h, w]; uv [B, Q, N, 2] normalised; mask [B, Q, N] bool; attn
    [B, Q, N, L] (sigmoid weights). Returns [B, Q, C]. Bilinear with zeros outside and
    align_corners=False, as the official F.grid_sample call (pixel i's centre at (i + 0.5) / w)."""
    B, Q, N, _ = uv.shape
    out = 0
    # at least fp32 even under autocast: a half-precision grid moves the points by ~0.1 pixel on wide
    # maps (float64 stays float64)
    dt = torch.float64 if uv.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=uv.device.type, enabled=False):
        grid = (2 * uv.to(dt) - 1).transpose(1, 2).reshape(B * N, Q, 1, 2)     # [B*N, Q, 1, 2] in [-1, 1]
        w = attn.to(dt) * mask.to(dt)[..., None]                                # [B, Q, N, L]
        for lvl, f in enumerate(fpn):
            f = f.flatten(0, 1).to(dt)                                          # [B*N, C, h, w]
            s = F.grid_sample(f, grid, mode='bilinear', padding_mode='zeros', align_corners=False)  # [B*N, C, Q, 1]
            s = torch.nan_to_num(s[..., 0]).view(B, N, -1, Q)                   # [B, N, C, Q]
            out = out + torch.einsum('bncq,bqn->bqc', s, w[..., lvl])         # [B, Q, C]
    return out


class Detr3DCrossAtten(nn.Module):
    """Object queries read the image features at their projected 3D reference point.

    Weights: a sigmoid (not a softmax) per (camera, level), masked by visibility and summed, not
    averaged. The positional encoding of the reference point is added to the residual stream in
    every layer (official `position_encoder`, Sequential indices 0, 1, 3, 4)."""

    def __init__(self, C, num_cams, levels, dropout):
        super().__init__()
        self.num_cams, self.levels = num_cams, levels
        self.attention_weights = nn.Linear(C, num_cams * levels)   # official view (cams, points=1, levels)
        self.output_proj = nn.Linear(C, C)
        self.dropout = nn.Dropout(dropout)
        self.position_encoder = nn.Sequential(nn.Linear(3, C), nn.LayerNorm(C), nn.ReLU(inplace=True),
                                              nn.Linear(C, C), nn.LayerNorm(C), nn.ReLU(inplace=True))
        nn.init.zeros_(self.attention_weights.weight)              # official init_weight
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, x, pos, fpn, ref, lidar2img, pad_hw, pc_range):
        """x, pos [B, Q, C]; fpn list over L of [B, N, C, h, w]; ref [B, Q, 3] normalised; lidar2img
        [B, N, 4, 4]; pad_hw (H, W). Returns (out [B, Q, C], uv [B, Q, N, 2], mask [B, Q, N],
        attn [B, Q, N, L])."""
        B, Q, C = x.shape
        N = lidar2img.shape[1]
        if N != self.num_cams or len(fpn) != self.levels:
            raise ValueError(f'Detr3DCrossAtten: built for {self.num_cams} cameras and {self.levels} levels, '
                             f'got {N} and {len(fpn)}')
        attn = self.attention_weights(x + pos).view(B, Q, N, self.levels).sigmoid()    # [B, Q, N, L], levels fastest
        uv, mask = project_reference_points(ref, lidar2img, pad_hw, pc_range)
        sampled = sample_reference_features(fpn, uv, mask, attn)                        # [B, Q, C]
        pos_feat = self.position_encoder(inverse_sigmoid(ref))                          # [B, Q, C]
        return self.dropout(self.output_proj(sampled)) + x + pos_feat, uv, mask, attn


# ---------------------------------------------------------------------------------------------
# The detector
# ---------------------------------------------------------------------------------------------

class DETR3D(nn.Module):
    """The DETR3D detector: forward(batch) -> {'fpn', 'dec'} (see forward), loss(out, batch) -> dict of
    scalars, decode(out) -> boxes per sample, predict(...) for one sample from raw images."""
    # Shared with BEVFormer unchanged (they read only cfg, backbone, neck, grid_mask, cnn_bf16 and out['dec']):
    cnn_bf16 = BEVFormer.cnn_bf16               # --amp on the CPU: the image CNN in bfloat16
    extract_feats = BEVFormer.extract_feats     # images [B, N, 3, Hp, Wp] -> list over L of [B, N, C, h, w]
    loss = BEVFormer.loss                       # every decoder layer: loss_{cls,bbox}_i (official Detr3DHead.loss)
    decode = BEVFormer.decode                   # NMS-free top-k of the last layer (official NMSFreeCoder)

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        C = cfg.embed_dims
        self.backbone, self.neck, self.grid_mask = build_image_backbone(cfg)   # shared with BEVFormer
        # object queries: a position half and a content half; reference points (official Detr3DTransformer)
        self.query_embedding = nn.Embedding(cfg.num_query, 2 * C)
        self.reference_points = nn.Linear(C, 3)
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList(
            DecoderLayer(cfg, Detr3DCrossAtten(C, cfg.num_cams, cfg.fpn_levels, cfg.dropout))
            for _ in range(cfg.dec_layers))
        self.cls_branches = nn.ModuleList(cls_branch(C, cfg.num_classes) for _ in range(cfg.dec_layers))
        self.reg_branches = nn.ModuleList(reg_branch(C) for _ in range(cfg.dec_layers))
        nn.init.xavier_uniform_(self.reference_points.weight)       # official xavier_init(uniform, bias 0)
        nn.init.zeros_(self.reference_points.bias)

    def decode_queries(self, fpn, lidar2img, pad_hw):
        """fpn list over L of [B, N, C, h, w]; lidar2img [B, N, 4, 4]; pad_hw (Hp, Wp) of the padded image
        -> list over decoder layers of dicts (see forward)."""
        cfg = self.cfg
        B = lidar2img.shape[0]
        pos, x, ref = object_queries(self.query_embedding, self.reference_points, B)
        outs = []
        for lid, layer in enumerate(self.decoder.layers):
            # the full 3D reference goes to the cross-attention (BEVFormer passes only x, y)
            x, uv, mask, attn = layer(x, pos, fpn, ref, lidar2img, pad_hw, cfg.pc_range)
            box, new_ref = refine_boxes(self.reg_branches[lid](x), ref, cfg.pc_range)
            outs.append({'query': x, 'ref': ref, 'cls': self.cls_branches[lid](x), 'box': box,
                         'uv': uv, 'mask': mask, 'attn': attn})
            ref = new_ref.detach()                                               # iterative refinement
        return outs

    def forward(self, batch):
        """A collated batch (data.collate; history, can_bus ignored: DETR3D is single-frame) -> dict:
          fpn   list over L of [B, N, C, h, w]   FPN features
          dec   list over decoder layers of dicts:
                query [B, Q, C] the layer's output queries;
                ref   [B, Q, 3] the layer's INPUT reference point, normalised to pc_range (x, y, z);
                cls   [B, Q, 10] logits; box [B, Q, 10] regression code (cx, cy, log w, log l, cz,
                      log h, sin yaw, cos yaw, vx, vy; metres, our yaw);
                uv    [B, Q, N, 2] ref projected into each camera, (u, v) normalised by the padded
                      image (W, H): 0..1 inside; the same point on every FPN level;
                mask  [B, Q, N] bool visibility (in front of the camera, strictly inside the image);
                attn  [B, Q, N, L] the sigmoid weights (before the mask; points axis of size 1 dropped).
        The cross-attention's sampled sum is sum_(n, l) attn * mask * bilinear(fpn[l][:, n], uv)."""
        img = batch['img']
        B, dev = img.shape[0], img.device
        fpn = self.extract_feats(img, bevformer._img_shape(batch, B, dev))
        lidar2img = batch['lidar2img'].to(dev, self.query_embedding.weight.dtype)
        return {'fpn': fpn, 'dec': self.decode_queries(fpn, lidar2img, tuple(img.shape[-2:]))}

    @torch.no_grad()
    def predict(self, img, lidar2img, can_bus=None, state=None, img_shape=None, scene_token=None):
        """One sample from raw images: img [N, 3, H, W] RGB 0..255, lidar2img [N, 4, 4] for that image.
        Without img_shape the images are resized to the preset's image_size (lidar2img scaled) and
        zero-padded (bevformer.prepare_images); with img_shape (H, W) they are taken as prepared.
        can_bus, state and scene_token are accepted for the common interface and unused (no temporal
        state). Returns {'boxes' [K, 9], 'scores' [K], 'labels' [K], 'state': None}."""
        cfg = self.cfg
        dev, dtype = self.query_embedding.weight.device, self.query_embedding.weight.dtype
        img, lidar2img = img.to(dev, dtype), lidar2img.to(dev, dtype)
        if img_shape is None:
            img, lidar2img, img_shape = bevformer.prepare_images(img, lidar2img, cfg)
        img_shape = torch.as_tensor(img_shape, device=dev).view(1, 2)       # [1, 2]: a batch of one
        was_training = self.training
        self.eval()
        try:
            out = self({'img': img[None], 'img_shape': img_shape, 'lidar2img': lidar2img[None]})
            dets = self.decode(out)[0]
        finally:
            self.train(was_training)
        dets['state'] = None
        return dets


# ---------------------------------------------------------------------------------------------
# Presets (official config detr3d_res101_gridmask.py; the FD3D paper's apprentice; the CPU pair)
# ---------------------------------------------------------------------------------------------

_OFFICIAL = dict(image_size=(1600, 900), normalisation='caffe', backbone_style='caffe', backbone_out=(1, 2, 3),
                 fpn_levels=4, embed_dims=256, ffn_dims=512, num_heads=8, dec_layers=6, num_query=900,
                 grid_mask=True, **bevformer.OFFICIAL_INPUT)

PRESETS = {
    # official detr3d_res101_gridmask.py: R101-DCN (caffe), FPN C3-C5 + 1 extra (strides 8..64), 1600x900
    'detr3d-r101': DETR3DConfig(name='detr3d-r101', backbone_depth=101, backbone_dcn=True, **_OFFICIAL),
    # the FD3D paper's apprentice (R50, 900x1600; no official config exists, docs/official-differences.md "DETR3D").
    # Inferred: everything else as detr3d-r101 (caffe style and normalisation, the FCOS3D-style init of
    # the expert's family), no DCN. An ImageNet-initialised R50 would rather use style/normalisation
    # 'pytorch'/'rgb': `--set backbone_style=pytorch --set normalisation=rgb`.
    'detr3d-r50': DETR3DConfig(name='detr3d-r50', backbone_depth=50, backbone_dcn=False, **_OFFICIAL),
    # CPU-sized apprentice/expert pair for the synthetic world (ours). The expert keeps the paper's
    # relation to its apprentice (bigger backbone, same width and decoder) and, like BEVFormer's CPU
    # pair, twice the input resolution: its FPN levels (strides 16, 32, 64 at 400x225) have the sizes
    # of the apprentice's (strides 8, 16, 32 at 200x113), so PV distillation pairs them one to one.
    # Both train their ResNet from scratch without dropout, as BEVFormer's CPU presets.
    'detr3d-cpu-tiny': DETR3DConfig(name='detr3d-cpu-tiny', image_size=(200, 113), normalisation='rgb',
                                    backbone_depth=18, backbone_style='pytorch', backbone_width=32,
                                    backbone_out=(1, 2), fpn_levels=3, embed_dims=128, ffn_dims=256,
                                    num_heads=8, dec_layers=3, num_query=300, grid_mask=False, dropout=0.0,
                                    **bevformer.FROM_SCRATCH),
    'detr3d-cpu-base': DETR3DConfig(name='detr3d-cpu-base', image_size=(400, 225), normalisation='rgb',
                                    backbone_depth=34, backbone_style='pytorch', backbone_width=32,
                                    backbone_out=(2, 3), fpn_levels=3, embed_dims=128, ffn_dims=256,
                                    num_heads=8, dec_layers=3, num_query=300, grid_mask=False, dropout=0.0,
                                    **bevformer.FROM_SCRATCH),
}

def get_config(name, **overrides):
    """A copy of preset `name` with field overrides (unknown names are InputErrors)."""
    if name not in PRESETS:
        raise InputError(f'--preset {name}: unknown DETR3D preset (expected one of {", ".join(PRESETS)})')
    bad = sorted(set(overrides) - {f.name for f in fields(DETR3DConfig)})
    if bad:
        raise InputError(f'--set {bad[0]}: not a DETR3DConfig field')
    return replace(PRESETS[name], **overrides)


# ---------------------------------------------------------------------------------------------
# Official checkpoints (docs/official-differences.md): the same strict remap and yaw conversion as BEVFormer
# ---------------------------------------------------------------------------------------------

def load_official(model, path, src=None):
    """Load the official DETR3D checkpoint (`detr3d_resnet101.pth`, path or its state_dict) into `model`
    strictly: every parameter and buffer filled, an unknown, missing or misshaped key is an InputError
    naming it; the final regression rows (sin, cos) are converted to our yaw.

    Our module names map to the official ones with bevformer's rules unchanged (decoder.layers.i.
    cross_attn.position_encoder.0 -> pts_bbox_head.transformer.decoder.layers.i.attentions.1.
    position_encoder.0, self_attn -> attentions.0.attn, ...), so bevformer.load_official does the work."""
    if not isinstance(model, DETR3D):
        raise InputError(f'detr3d.load_official: expected a DETR3D model, got {type(model).__name__}')
    return bevformer.load_official(model, path, src)


def convert(official_path, preset, out_path):
    """Official checkpoint -> our checkpoint format (usable by train.py --teacher/--resume, evaluate.py --ckpt)."""
    cfg = get_config(preset)
    model = load_official(DETR3D(cfg), official_path)
    save_checkpoint({'model': model.state_dict(), 'config': asdict(cfg),
                               'args': {'converted_from': os.path.abspath(official_path), 'preset': preset},
                               'iter': 0}, out_path)
    return model


def main(argv=None):
    """`python detr3d.py convert ...`: bevformer.py's command line with DETR3D's presets."""
    bevformer.cli(argv, 'DETR3D', PRESETS, convert, default_preset='detr3d-r101')


if __name__ == '__main__':
    main()
