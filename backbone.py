"""The standard image CNN both detectors share: ResNet (mmdet style, optional DCNv2 in the last stages),
FPN, GridMask, the input normalisation of each official checkpoint, and pretrained backbone weights.

This is not a component of BEVFormer, DETR3D or FD3D: it is the usual detection backbone, written once
here so that bevformer.py and detr3d.py can be read beside their papers from their first component.
The module names (conv1, layer1.0.conv2, conv2.conv_offset, lateral_convs.0, ...) are mmdet's, so that
official checkpoints load with a plain key remap (bevformer.official_key).
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from common import InputError, read_state_dict

# ---------------------------------------------------------------------------------------------
# Image normalisation (a preset owns it: the official checkpoints differ)
# ---------------------------------------------------------------------------------------------

IMAGENET_RGB = ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))   # Tiny: to_rgb=True
CAFFE_BGR = ((103.530, 116.280, 123.675), (1.0, 1.0, 1.0))          # Small/Base: to_rgb=False


def normalize_images(img, img_shape, normalisation):
    """img [B, N, 3, Hp, Wp] RGB 0..255 zero-padded; img_shape [B, 2] content (H, W).

    The official pipeline normalises before padding, so the padding is zero in the normalised
    image: we normalise the padded tensor and re-zero everything outside the content."""
    if normalisation == 'caffe':
        img = img.flip(2)                                    # RGB -> BGR (OpenCV order)
        mean, std = CAFFE_BGR
    else:
        mean, std = IMAGENET_RGB
    mean = img.new_tensor(mean).view(1, 1, 3, 1, 1)                          # [1, 1, 3, 1, 1] per channel
    std = img.new_tensor(std).view(1, 1, 3, 1, 1)
    img = (img - mean) / std
    Hp, Wp = img.shape[-2:]
    rows = torch.arange(Hp, device=img.device)[None] < img_shape[:, 0:1]     # [B, Hp]
    cols = torch.arange(Wp, device=img.device)[None] < img_shape[:, 1:2]     # [B, Wp]
    inside = (rows[:, :, None] & cols[:, None, :]).to(img.dtype)            # [B, Hp, Wp]
    return img * inside[:, None, None]


# ---------------------------------------------------------------------------------------------
# Modulated deformable convolution v2 (Zhu et al. 2019), plain PyTorch
# ---------------------------------------------------------------------------------------------

class ModulatedDeformConv2d(nn.Module):
    """3x3 DCNv2 with the parameter layout of mmcv's `ModulatedDeformConv2dPack` (no bias).

    `conv_offset` predicts 27 channels per output pixel: channels 0-17 are the offsets, interleaved
    (dy_k, dx_k) for the 9 kernel taps k in row-major order, channels 18-26 the mask logits.
    The official kernel bilinearly samples the input at p0 + p_k + offset_k, treating every corner
    outside the map as zero: that is `F.grid_sample(..., padding_mode='zeros', align_corners=False)`
    when pixel coordinates are mapped to [-1, 1] as (2 * x + 1) / W - 1.
    """

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.stride = stride
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
        self.conv_offset = nn.Conv2d(in_channels, 27, 3, stride=stride, padding=1, bias=True)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        # mmcv starts from a plain convolution: zero offsets, mask sigmoid(0) = 0.5 everywhere
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x):
        """x [B, C, H, W] -> [B, out_channels, Ho, Wo] (3x3, padding 1, the layer's stride)."""
        B, C, H, W = x.shape
        out = self.conv_offset(x)                                   # [B, 27, Ho, Wo]
        Ho, Wo = out.shape[-2:]
        offset = out[:, :18].reshape(B, 9, 2, Ho, Wo)               # [B, 9, 2, Ho, Wo] (dy, dx) per tap
        mask = out[:, 18:].sigmoid()                                # [B, 9, Ho, Wo]

        # sampling positions in input pixels: p = p0 + p_k + offset_k, with p0 = out_index * stride - 1
        ys = torch.arange(Ho, device=x.device, dtype=x.dtype) * self.stride - 1
        xs = torch.arange(Wo, device=x.device, dtype=x.dtype) * self.stride - 1
        ky, kx = torch.meshgrid(torch.arange(3, device=x.device, dtype=x.dtype),
                                torch.arange(3, device=x.device, dtype=x.dtype), indexing='ij')
        py = ys.view(1, 1, Ho, 1) + ky.reshape(1, 9, 1, 1) + offset[:, :, 0]   # [B, 9, Ho, Wo]
        px = xs.view(1, 1, 1, Wo) + kx.reshape(1, 9, 1, 1) + offset[:, :, 1]   # [B, 9, Ho, Wo]
        grid = torch.stack([(2 * px + 1) / W - 1, (2 * py + 1) / H - 1], dim=-1)   # [B, 9, Ho, Wo, 2]
        sampled = F.grid_sample(x, grid.view(B, 9 * Ho, Wo, 2), mode='bilinear',   # [B, 9*Ho, Wo, 2]
                                padding_mode='zeros', align_corners=False)      # [B, C, 9*Ho, Wo]
        sampled = sampled.reshape(B, C, 9, Ho, Wo) * mask[:, None]             # [B, C, 9, Ho, Wo] modulated
        # the 3x3 convolution becomes one matmul over (C, tap): weight [O, C*9] @ [B, C*9, Ho*Wo]
        out = self.weight.flatten(1) @ sampled.reshape(B, C * 9, Ho * Wo)       # [B, O, Ho*Wo]
        return out.view(B, -1, Ho, Wo)                                          # [B, O, Ho, Wo]


# ---------------------------------------------------------------------------------------------
# ResNet (He et al. 2016), mmdet flavour: `pytorch` or `caffe` style, frozen stages, BN in eval mode
# ---------------------------------------------------------------------------------------------

def norm2d(kind, channels):
    """The ResNet's normalisation layer: 'bn' BatchNorm (official) or 'gn' GroupNorm (Wu & He 2018), which
    normalises each image on its own, so training (batch 1 x 6 cameras) and eval mode (the history frame,
    test time) compute the same thing. Our choice of groups: 32, or fewer in narrow layers so that every
    group holds >= 4 channels (the CPU presets' 32-wide stem gets 8)."""
    if kind == 'gn':
        return nn.GroupNorm(min(32, channels // 4), channels)
    return nn.BatchNorm2d(channels)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34). No DCN variant, as in mmdet."""
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, style='pytorch', dcn=False,
                 with_cp=False, norm='bn'):
        super().__init__()
        if dcn:
            raise ValueError('DCN is only supported in Bottleneck blocks (ResNet-50/101)')
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm2d(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm2d(norm, planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.with_cp = with_cp

    def _residual(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return out + (x if self.downsample is None else self.downsample(x))

    def forward(self, x):
        """x [B, C_in, H, W] -> [B, planes, H / stride, W / stride]."""
        if self.with_cp and x.requires_grad:
            return self.relu(torch.utils.checkpoint.checkpoint(self._residual, x, use_reentrant=False))
        return self.relu(self._residual(x))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (ResNet-50/101). `caffe` style strides the first 1x1, `pytorch` the 3x3;
    with `dcn` the 3x3 is a modulated deformable convolution (Small/Base stages 3-4)."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, style='pytorch', dcn=False,
                 with_cp=False, norm='bn'):
        super().__init__()
        s1, s2 = (stride, 1) if style == 'caffe' else (1, stride)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, s1, bias=False)
        self.bn1 = norm2d(norm, planes)
        if dcn:
            self.conv2 = ModulatedDeformConv2d(planes, planes, stride=s2)
        else:
            self.conv2 = nn.Conv2d(planes, planes, 3, s2, 1, bias=False)
        self.bn2 = norm2d(norm, planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = norm2d(norm, planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.with_cp = with_cp

    def _residual(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + (x if self.downsample is None else self.downsample(x))

    def forward(self, x):
        """x [B, C_in, H, W] -> [B, 4 * planes, H / stride, W / stride]."""
        if self.with_cp and x.requires_grad:   # gradient checkpointing (official Small: with_cp=True)
            return self.relu(torch.utils.checkpoint.checkpoint(self._residual, x, use_reentrant=False))
        return self.relu(self._residual(x))


RESNET_ARCH = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)),
               50: (Bottleneck, (3, 4, 6, 3)), 101: (Bottleneck, (3, 4, 23, 3))}


class ResNet(nn.Module):
    """mmdet's ResNet. Returns the maps of `out_indices` (0..3 = C2..C5, strides 4..32).

    depth: 18/34/50/101. style: 'pytorch' | 'caffe'. frozen_stages: 1 freezes the stem and layer1
    (-1 freezes nothing). dcn_stages: four booleans, DCNv2 in that stage's 3x3 convs. base_width:
    64 is the standard ResNet; smaller widths scale every stage (CPU presets).
    norm_eval: BatchNorm layers stay in eval mode (running statistics) even in training;
    bn_frozen: BatchNorm affine parameters are not trained (official: both True).
    norm: 'bn' BatchNorm (official) or 'gn' GroupNorm (`norm2d`; norm_eval and bn_frozen concern BatchNorm only).
    """

    def __init__(self, depth=50, style='pytorch', out_indices=(3,), frozen_stages=1,
                 dcn_stages=(False, False, False, False), base_width=64, norm_eval=True,
                 bn_frozen=True, with_cp=False, norm='bn'):
        super().__init__()
        if depth not in RESNET_ARCH:
            raise ValueError(f'ResNet depth must be one of {sorted(RESNET_ARCH)}, got {depth}')
        block, blocks = RESNET_ARCH[depth]
        self.out_indices = tuple(out_indices)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.bn_frozen = bn_frozen

        self.conv1 = nn.Conv2d(3, base_width, 7, 2, 3, bias=False)      # stem
        self.bn1 = norm2d(norm, base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = base_width
        self.out_channels = []
        for i, n in enumerate(blocks):
            planes, stride = base_width * 2 ** i, (1 if i == 0 else 2)
            downsample = None
            if stride != 1 or inplanes != planes * block.expansion:
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False),
                    norm2d(norm, planes * block.expansion))
            layers = [block(inplanes, planes, stride, downsample, style, dcn_stages[i], with_cp, norm)]
            inplanes = planes * block.expansion
            layers += [block(inplanes, planes, 1, None, style, dcn_stages[i], with_cp, norm)
                       for _ in range(n - 1)]
            self.add_module(f'layer{i + 1}', nn.Sequential(*layers))
            self.out_channels.append(inplanes)
        self.out_channels = [self.out_channels[i] for i in self.out_indices]

        for name, m in self.named_modules():   # DCN offset convs keep their zero init
            if isinstance(m, nn.Conv2d) and not name.endswith('conv_offset'):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        self._freeze()

    def _frozen_modules(self):
        if self.frozen_stages >= 0:
            yield from (self.conv1, self.bn1)
        for i in range(1, self.frozen_stages + 1):
            yield getattr(self, f'layer{i}')

    def _freeze(self):
        for m in self._frozen_modules():
            for p in m.parameters():
                p.requires_grad_(False)
        if self.bn_frozen:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    for p in m.parameters():
                        p.requires_grad_(False)

    def train(self, mode=True):
        """Frozen stages and (with norm_eval) every BatchNorm stay in eval mode."""
        super().train(mode)
        if mode:
            for m in self._frozen_modules():
                m.eval()
            if self.norm_eval:
                for m in self.modules():
                    if isinstance(m, nn.BatchNorm2d):
                        m.eval()
        return self

    def forward(self, x):
        """x [B', 3, H, W] -> list of [B', C_i, H / 2^(i+2), W / 2^(i+2)] for i in out_indices."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for i in range(4):
            x = getattr(self, f'layer{i + 1}')(x)
            if i in self.out_indices:
                outs.append(x)
        return outs


# ---------------------------------------------------------------------------------------------
# FPN (Lin et al. 2017), mmdet flavour
# ---------------------------------------------------------------------------------------------

class FPN(nn.Module):
    """Lateral 1x1 convs, top-down nearest upsampling + add, 3x3 output convs, and extra stride-2
    3x3 convs on the last output when num_outs exceeds the inputs used.

    in_channels: channels of the backbone maps it receives; start_level: the first of them used
    (DETR3D receives C2-C5 and starts at C3). With `add_extra_on_output` the first extra conv has no
    ReLU before it (mmdet's `relu_before_extra_convs` only affects the second and later extra convs);
    without it the extra levels are stride-2 max-pools, as mmdet does.
    """

    def __init__(self, in_channels=(2048,), out_channels=256, num_outs=1, start_level=0,
                 add_extra_on_output=True, relu_before_extra_convs=False):
        super().__init__()
        used = list(in_channels)[start_level:]
        self.start_level = start_level
        self.num_outs = num_outs
        self.relu_before_extra_convs = relu_before_extra_convs
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in used)
        n_extra = num_outs - len(used) if add_extra_on_output else 0
        self.fpn_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1)
                                       for _ in used)
        self.fpn_convs.extend(nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
                              for _ in range(max(n_extra, 0)))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):   # mmdet's ConvModule default: xavier uniform, zero bias
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats):
        """feats: list of [B', C_i, h_i, w_i] -> list of num_outs maps [B', out_channels, h, w]."""
        feats = feats[self.start_level:]
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(len(laterals) - 1, 0, -1):          # top-down pathway
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode='nearest')
        outs = [self.fpn_convs[i](lat) for i, lat in enumerate(laterals)]
        for k in range(len(laterals), self.num_outs):      # extra levels
            if k < len(self.fpn_convs):
                x = outs[-1]
                if self.relu_before_extra_convs and k > len(laterals):
                    x = F.relu(x)
                outs.append(self.fpn_convs[k](x))
            else:
                outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return outs


# ---------------------------------------------------------------------------------------------
# GridMask (Chen et al. 2020), the variant used by BEVFormer and DETR3D
# ---------------------------------------------------------------------------------------------

class GridMask(nn.Module):
    """Zero out a grid of squares, shared by every image and channel of the batch (training only).

    As configured officially (use_h, use_w, rotate=1 (never rotates), offset=False, ratio=0.5,
    mode=1, prob=0.7): period d ~ U{2..h-1}, stripe width l = min(max(int(0.5 d + 0.5), 1), d - 1);
    in mode 1 the kept region is the union of the stripes and the (d - l)^2 squares are zeroed.
    The random draws use torch's global generator, so a restored RNG state replays them exactly.
    """

    def __init__(self, prob=0.7, ratio=0.5):
        super().__init__()
        self.prob = prob
        self.ratio = ratio

    def make_mask(self, h, w):
        """A [h, w] float mask (1 = kept) for one draw."""
        hh, ww = int(1.5 * h), int(1.5 * w)
        d = int(torch.randint(2, h, ()).item())
        l = min(max(int(d * self.ratio + 0.5), 1), d - 1)
        st_h = int(torch.randint(d, ()).item())
        st_w = int(torch.randint(d, ()).item())
        stripes = np.zeros((hh, ww), dtype=np.float32)     # 1 on the stripes of width l
        for i in range(hh // d):
            s = d * i + st_h
            stripes[s:min(s + l, hh), :] = 1
        for i in range(ww // d):
            s = d * i + st_w
            stripes[:, s:min(s + l, ww)] = 1
        top, left = (hh - h) // 2, (ww - w) // 2            # centre crop back to h x w
        return torch.from_numpy(stripes[top:top + h, left:left + w].copy())

    def forward(self, x):
        """x [..., H, W] -> x times one shared mask (identity in eval mode or with prob 1 - p)."""
        if not self.training or torch.rand(()).item() > self.prob:
            return x
        mask = self.make_mask(*x.shape[-2:]).to(device=x.device, dtype=x.dtype)
        return x * mask


# ---------------------------------------------------------------------------------------------
# Pretrained backbone weights (--backbone-weights)
# ---------------------------------------------------------------------------------------------

def load_backbone_weights(backbone, path):
    """Load ImageNet-style (torchvision names, `fc.*` ignored) or detector-style ResNet weights
    (mmdet/FCOS3D `backbone.*`, official BEVFormer/DETR3D `img_backbone.*`, ours `backbone.*`).

    Every backbone parameter must be filled except DCN offset convs, which ImageNet weights do not
    have (they keep their zero init, as mmcv does). Returns the list of keys left at init.
    """
    if any(isinstance(m, nn.GroupNorm) for m in backbone.modules()):   # BN's weight/bias names would fit
        raise InputError(f"{path}: pretrained ResNet weights carry BatchNorm statistics; this backbone uses "
                         f"GroupNorm (backbone_norm='gn'), which trains from scratch: use backbone_norm='bn'")
    state = read_state_dict(path, expected='a ResNet checkpoint (.pth/.pt)')
    prefixes = ('img_backbone.', 'backbone.', 'module.backbone.', '')
    own = backbone.state_dict()
    for prefix in prefixes:      # the first prefix that names our stem is the checkpoint's
        if prefix + 'conv1.weight' in state:
            break
    else:
        raise InputError(f'{path}: no ResNet stem found (looked for conv1.weight with prefixes '
                         f'{", ".join(repr(p) for p in prefixes[:-1])} or none)')
    picked, left = {}, []
    for k, v in own.items():
        src = state.get(prefix + k)
        if src is None:
            if '.conv_offset.' in k:
                left.append(k)
                continue
            raise InputError(f'{path}: missing backbone key {prefix + k} (expected shape {list(v.shape)})')
        if src.shape != v.shape:
            raise InputError(f'{path}: {prefix + k} has shape {list(src.shape)}, '
                             f'the model expects {list(v.shape)} (wrong depth or width?)')
        picked[k] = src
    backbone.load_state_dict(picked, strict=False)
    return left


# ---------------------------------------------------------------------------------------------
# The image path of a detector config
# ---------------------------------------------------------------------------------------------

def build_image_backbone(cfg):
    """ResNet, FPN and GridMask of a config (BEVFormer's or DETR3D's: the image path is shared)."""
    dcn = (False, False, cfg.backbone_dcn, cfg.backbone_dcn)
    backbone = ResNet(depth=cfg.backbone_depth, style=cfg.backbone_style, out_indices=cfg.backbone_out,
                      frozen_stages=cfg.frozen_stages, dcn_stages=dcn, base_width=cfg.backbone_width,
                      with_cp=cfg.with_cp, norm_eval=cfg.backbone_norm_eval, bn_frozen=cfg.backbone_bn_frozen,
                      norm=cfg.backbone_norm)
    neck = FPN(backbone.out_channels, cfg.embed_dims, num_outs=cfg.fpn_levels, add_extra_on_output=True)
    if cfg.channels_last:                  # convolution weights in NHWC order too (the input: extract_feats)
        backbone, neck = backbone.to(memory_format=torch.channels_last), neck.to(memory_format=torch.channels_last)
    return backbone, neck, GridMask(prob=cfg.grid_mask_prob)
