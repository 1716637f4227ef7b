"""Backbone pieces: DCNv2 against an explicit reference, ResNet/FPN names against the official key
manifests, frozen stages, GridMask, and pretrained-weight loading."""
import pytest
import torch
import torch.nn.functional as F

import fixtures
import models
from backbone import FPN, GridMask, ModulatedDeformConv2d, ResNet, load_backbone_weights
from common import InputError

def manifest(name, prefix):
    """{key without prefix: shape} of one official module, from the derived key lists (tests/keys/)."""
    out = {k[len(prefix):]: shape for k, shape in fixtures.manifest(name).items() if k.startswith(prefix)}
    assert out, f'no {prefix} keys in {name}'
    return out


def naive_dcn(x, weight, offset, mask, stride):
    """DCNv2 by explicit bilinear corner gathers (float64 loops), zero outside the map."""
    B, C, H, W = x.shape
    O = weight.shape[0]
    Ho, Wo = offset.shape[-2:]
    out = torch.zeros(B, O, Ho, Wo, dtype=x.dtype)

    def pixel(b, yy, xx):
        if 0 <= yy < H and 0 <= xx < W:
            return x[b, :, yy, xx]
        return torch.zeros(C, dtype=x.dtype)

    for b in range(B):
        for i in range(Ho):
            for j in range(Wo):
                cols = []
                for k in range(9):
                    py = i * stride - 1 + k // 3 + offset[b, 2 * k, i, j].item()
                    px = j * stride - 1 + k % 3 + offset[b, 2 * k + 1, i, j].item()
                    y0, x0 = int(torch.floor(torch.tensor(py))), int(torch.floor(torch.tensor(px)))
                    ly, lx = py - y0, px - x0
                    v = ((1 - ly) * (1 - lx) * pixel(b, y0, x0) + (1 - ly) * lx * pixel(b, y0, x0 + 1)
                         + ly * (1 - lx) * pixel(b, y0 + 1, x0) + ly * lx * pixel(b, y0 + 1, x0 + 1))
                    cols.append(v * mask[b, k, i, j])
                col = torch.stack(cols, 1)                  # [C, 9]
                out[b, :, i, j] = weight.flatten(1) @ col.flatten()
    return out


@pytest.mark.parametrize('stride', [1, 2])
def test_dcn_matches_explicit_bilinear_reference(stride):
    torch.manual_seed(0)
    dcn = ModulatedDeformConv2d(3, 4, stride=stride).double()
    torch.nn.init.normal_(dcn.conv_offset.weight, std=0.5)   # offsets of a few pixels, some outside
    torch.nn.init.normal_(dcn.conv_offset.bias, std=1.0)
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    got = dcn(x)
    raw = dcn.conv_offset(x)
    ref = naive_dcn(x, dcn.weight.detach(), raw[:, :18].detach(), raw[:, 18:].sigmoid().detach(), stride)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() < 1e-10


def test_dcn_with_zero_offsets_is_half_a_plain_convolution():
    torch.manual_seed(1)
    dcn = ModulatedDeformConv2d(5, 6, stride=2)   # zero-initialised offsets, mask sigmoid(0) = 0.5
    x = torch.randn(1, 5, 9, 11)
    ref = 0.5 * F.conv2d(x, dcn.weight, stride=2, padding=1)
    assert torch.allclose(dcn(x), ref, atol=1e-5)


@pytest.mark.parametrize('manifest_file,depth,style,dcn', [
    ('keys_bevformer_tiny.txt', 50, 'pytorch', (False, False, False, False)),
    ('keys_bevformer_base.txt', 101, 'caffe', (False, False, True, True)),
])
def test_resnet_names_and_shapes_match_official_manifest(manifest_file, depth, style, dcn):
    expected = manifest(manifest_file, 'img_backbone.')
    model = ResNet(depth=depth, style=style, dcn_stages=dcn, out_indices=(1, 2, 3))
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == expected


@pytest.mark.parametrize('manifest_file,in_channels,start,num_outs', [
    ('keys_bevformer_tiny.txt', [2048], 0, 1),
    ('keys_bevformer_base.txt', [512, 1024, 2048], 0, 4),
    ('keys_detr3d_r101.txt', [256, 512, 1024, 2048], 1, 4),
])
def test_fpn_names_match_official_manifest(manifest_file, in_channels, start, num_outs):
    expected = {k.replace('.conv.', '.'): v for k, v in manifest(manifest_file, 'img_neck.').items()}
    fpn = FPN(in_channels, 256, num_outs, start_level=start)
    assert {k: list(v.shape) for k, v in fpn.state_dict().items()} == expected


def test_resnet_and_fpn_output_shapes():
    net = ResNet(depth=18, base_width=16, out_indices=(0, 1, 2, 3), frozen_stages=-1)
    feats = net(torch.randn(2, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(2, 16, 16, 24), (2, 32, 8, 12), (2, 64, 4, 6), (2, 128, 2, 3)]
    assert net.out_channels == [16, 32, 64, 128]
    fpn = FPN(net.out_channels, 32, num_outs=5, start_level=1)
    outs = fpn(feats)
    assert [tuple(o.shape) for o in outs] == [(2, 32, 8, 12), (2, 32, 4, 6), (2, 32, 2, 3), (2, 32, 1, 2),
                                              (2, 32, 1, 1)]


def test_caffe_and_pytorch_styles_stride_different_convs():
    caffe = ResNet(depth=50, style='caffe', base_width=8)
    torch_style = ResNet(depth=50, style='pytorch', base_width=8)
    assert caffe.layer2[0].conv1.stride == (2, 2) and caffe.layer2[0].conv2.stride == (1, 1)
    assert torch_style.layer2[0].conv1.stride == (1, 1) and torch_style.layer2[0].conv2.stride == (2, 2)


def test_frozen_stages_and_norm_eval():
    net = ResNet(depth=18, base_width=8, frozen_stages=1, norm_eval=True, bn_frozen=True).train()
    assert not any(p.requires_grad for p in net.conv1.parameters())
    assert not any(p.requires_grad for p in net.layer1.parameters())
    assert net.layer2[0].conv1.weight.requires_grad
    assert not net.layer2[0].bn1.weight.requires_grad           # BN affine frozen
    assert all(not m.training for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    free = ResNet(depth=18, base_width=8, frozen_stages=-1, norm_eval=False, bn_frozen=False).train()
    assert all(p.requires_grad for p in free.parameters())
    assert all(m.training for m in free.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_groupnorm_resnet_computes_the_same_in_training_and_eval_mode():
    """norm='gn' (the from-scratch option): GroupNorm everywhere BatchNorm was, every group >= 4
    channels, and (unlike BatchNorm at batch 2) training and eval mode give the same features."""
    torch.manual_seed(0)
    net = ResNet(depth=18, base_width=16, out_indices=(1, 2), frozen_stages=-1, norm_eval=False,
                 bn_frozen=False, norm='gn')
    norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert len(norms) == 1 + 2 * 8 + 3                  # stem, two per BasicBlock, three downsamples
    assert all(m.num_channels % m.num_groups == 0 and m.num_channels // m.num_groups >= 4 for m in norms)
    assert net.bn1.num_groups == 4 and net.layer4[0].bn1.num_groups == 32
    x = torch.randn(2, 3, 64, 96)
    train_out = net.train()(x)
    eval_out = net.eval()(x)
    for a, b in zip(train_out, eval_out):
        torch.testing.assert_close(a, b)
    bn = ResNet(depth=18, base_width=16, out_indices=(1, 2), frozen_stages=-1, norm_eval=False, bn_frozen=False)
    assert not torch.allclose(bn.train()(x)[0], bn.eval()(x)[0])   # the contrast: BatchNorm differs
    with pytest.raises(InputError, match="backbone_norm='gn'"):          # BN weights would load silently
        load_backbone_weights(net, 'imagenet.pth')
    with pytest.raises(InputError, match="backbone_norm must be 'bn' or 'gn', got 'ln'"):
        models.apply_overrides(models.preset_config('cpu-tiny'), ['backbone_norm=ln'])


def test_gridmask_shared_mask_and_eval_identity():
    gm = GridMask(prob=1.0)
    x = torch.ones(4, 3, 48, 80)
    gm.eval()
    assert torch.equal(gm(x), x)
    gm.train()
    torch.manual_seed(3)
    y = gm(x)
    mask = y[0, 0]
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert 0 < mask.mean() < 1                                   # some squares dropped, stripes kept
    assert torch.equal(y, mask.expand_as(y))                     # one mask for every image and channel
    torch.manual_seed(3)
    assert torch.equal(gm(x), y)                                 # replayed by the torch RNG state


def test_gridmask_structure_matches_formula():
    gm = GridMask(prob=1.0)
    torch.manual_seed(5)
    h, w = 40, 60
    mask = gm.make_mask(h, w)
    # every zero lies in a row and a column that are both off-stripe: zeros form a product set
    zero_rows = (mask == 0).any(1)
    zero_cols = (mask == 0).any(0)
    assert torch.equal(mask == 0, zero_rows[:, None] & zero_cols[None, :])


def test_load_backbone_weights_imagenet_and_detector_layouts(tmp_path):
    torch.manual_seed(0)
    src = ResNet(depth=50, style='caffe', base_width=8, dcn_stages=(False, False, True, True))
    # ImageNet style: bare names, classifier present, no DCN offsets
    imagenet = {k: v for k, v in src.state_dict().items() if 'conv_offset' not in k}
    imagenet['fc.weight'] = torch.zeros(10, 256)
    torch.save(imagenet, tmp_path / 'imagenet.pth')
    dst = ResNet(depth=50, style='caffe', base_width=8, dcn_stages=(False, False, True, True))
    left = load_backbone_weights(dst, str(tmp_path / 'imagenet.pth'))
    assert left and all('conv_offset' in k for k in left)
    assert torch.equal(dst.layer3[0].conv2.weight, src.layer3[0].conv2.weight)
    # FCOS3D / mmdet style: {'state_dict': {'backbone.*': ...}}
    torch.save({'state_dict': {'backbone.' + k: v for k, v in src.state_dict().items()}},
               tmp_path / 'fcos3d.pth')
    dst2 = ResNet(depth=50, style='caffe', base_width=8, dcn_stages=(False, False, True, True))
    assert load_backbone_weights(dst2, str(tmp_path / 'fcos3d.pth')) == []
    for k, v in src.state_dict().items():
        assert torch.equal(dst2.state_dict()[k], v), k


def test_load_backbone_weights_errors(tmp_path):
    from data import InputError
    src = ResNet(depth=18, base_width=8)
    state = src.state_dict()
    del state['layer2.0.conv1.weight']
    torch.save(state, tmp_path / 'missing.pth')
    with pytest.raises(InputError, match='layer2.0.conv1.weight'):
        load_backbone_weights(ResNet(depth=18, base_width=8), str(tmp_path / 'missing.pth'))
    with pytest.raises(InputError, match='shape'):
        load_backbone_weights(ResNet(depth=18, base_width=16), str(tmp_path / 'missing.pth'))
    with pytest.raises(InputError, match='no such file'):
        load_backbone_weights(src, str(tmp_path / 'nope.pth'))
