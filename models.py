"""Building a detector: from a preset name, from a config dict, or from a checkpoint file (ours, or an
official mmdet3d BEVFormer/DETR3D checkpoint as it is). train.py, evaluate.py and distill.py's callers
all build their models here.

    import models
    cfg = models.preset_config('cpu-tiny')               # a fresh copy of a preset (bevformer.py, detr3d.py)
    cfg = models.apply_overrides(cfg, ['bev_h=100'])     # what `--set KEY=VALUE` does
    model = models.build_model(cfg)
    model, cfg, ckpt = models.model_from_checkpoint('runs/cpu-tiny/last.pt')
    model, cfg, ckpt = models.model_from_checkpoint('bevformer_tiny_epoch_24.pth')   # preset inferred

Reading never runs code from the file (torch.load(weights_only=True)); writing is atomic
(common.save_checkpoint). Nothing here needs nuscenes-devkit.
"""
import dataclasses
import os
import pickle
import typing

import torch

import bevformer
import detr3d
from common import CLASSES, InputError, load_weights_only

# ------------------------------------------------------------------------------------------------
# Presets and configs

DETECTORS = {'bevformer': bevformer, 'detr3d': detr3d}   # config.detector -> its model file


def _model_module(detector):
    if detector not in DETECTORS:
        raise InputError(f"config: unknown detector '{detector}' (expected {' or '.join(map(repr, DETECTORS))})")
    return DETECTORS[detector]


def preset_config(name, flag='--model'):
    """A fresh copy of the preset `name` (preset names are unique across bevformer.py and detr3d.py)."""
    for module in DETECTORS.values():
        if name in module.PRESETS:
            return dataclasses.replace(module.PRESETS[name])
    known = sorted(n for module in DETECTORS.values() for n in module.PRESETS)
    raise InputError(f"{flag}: unknown preset '{name}' (choose from {', '.join(known)})")


def config_from_dict(d, what='checkpoint'):
    """Rebuild the config dataclass a checkpoint stored with dataclasses.asdict."""
    if not isinstance(d, dict) or 'detector' not in d:
        raise InputError(f"{what}: its 'config' is not a model config dict with a 'detector' field")
    module = _model_module(d['detector'])
    cls = type(next(iter(module.PRESETS.values())))
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise InputError(f"{what}: config fields {unknown} are unknown to {module.__name__}.py "
                         f"(written by another version of the code?)")
    return cls(**d)


# Config overrides (train.py and evaluate.py --set): KEY=VALUE converted to the dataclass field's type


def parse_value(text, typ, key):
    """`text` as a value of type `typ` (int, float, bool, str, tuples/lists of those, Optional)."""
    origin, inner = typing.get_origin(typ), typing.get_args(typ)
    if origin is typing.Union:                          # Optional[X]
        if text.lower() == 'none':
            return None
        return parse_value(text, next(t for t in inner if t is not type(None)), key)
    if origin in (tuple, list) or typ in (tuple, list):
        items = [s for s in text.strip('()[] ').split(',') if s.strip()]
        if not inner:                                   # a bare `tuple`: numbers where they parse
            values = [_number_or_text(s.strip()) for s in items]
        else:
            types = inner if origin is tuple and inner[-1] is not Ellipsis else [inner[0]] * len(items)
            if len(types) != len(items):
                raise InputError(f"--set {key}={text}: expected {len(types)} comma-separated values")
            values = [parse_value(s.strip(), t, key) for s, t in zip(items, types)]
        return tuple(values) if (origin or typ) is tuple else values
    if typ is bool:
        if text.lower() in ('1', 'true', 'yes', 'on'):
            return True
        if text.lower() in ('0', 'false', 'no', 'off'):
            return False
        raise InputError(f"--set {key}={text}: expected true or false")
    if typ in (int, float, str):
        try:
            return typ(text)
        except ValueError:
            raise InputError(f"--set {key}={text}: expected {typ.__name__}") from None
    raise InputError(f"--set {key}: fields of type {typ} cannot be set from the command line")


def _number_or_text(text):
    for typ in (int, float):
        try:
            return typ(text)
        except ValueError:
            pass
    return text


def apply_overrides(cfg, pairs):
    """A copy of the config dataclass with each KEY=VALUE applied (unknown key -> one-line error)."""
    hints = typing.get_type_hints(type(cfg))
    changes = {}
    for pair in pairs:
        key, sep, value = pair.partition('=')
        key = key.strip()
        if not sep:
            raise InputError(f"--set {pair}: expected KEY=VALUE")
        if key not in hints or key not in {f.name for f in dataclasses.fields(cfg)}:
            raise InputError(f"--set {key}: unknown config field of preset '{cfg.name}' "
                             f"(fields: {', '.join(f.name for f in dataclasses.fields(cfg))})")
        changes[key] = parse_value(value.strip(), hints[key], key)
    return dataclasses.replace(cfg, **changes)


def build_model(cfg):
    """The detector of a config: bevformer.BEVFormer or detr3d.DETR3D, on the CPU."""
    module = _model_module(cfg.detector)
    return module.BEVFormer(cfg) if cfg.detector == 'bevformer' else module.DETR3D(cfg)


# ------------------------------------------------------------------------------------------------
# Checkpoints


def load_checkpoint(path, flag='--ckpt'):
    """Read a checkpoint with torch.load(weights_only=True): tensors and plain Python values only (and
    numpy scalars, which an mmcv checkpoint's meta may hold: common.load_weights_only).

    A pickle that would construct anything else (and so could run code) is refused before any of
    its code runs; the unpickler of weights_only never imports or calls what the file names.
    Returns our checkpoint dict, or an official mmdet3d one ({'state_dict', 'meta', ...}: `is_official`).
    """
    if not os.path.isfile(path):
        raise InputError(f"{flag}: checkpoint '{path}' not found")
    try:
        ckpt = load_weights_only(path)
    except pickle.UnpicklingError:
        raise InputError(f"{flag}: '{path}' refused: its pickle holds objects other than tensors and plain "
                         f"values (it could run code); only plain-dict checkpoints load") from None
    except Exception as e:  # truncated zip, not a torch file at all, ...
        raise InputError(f"{flag}: '{path}' is not a readable torch checkpoint "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(ckpt, dict) or not (('model' in ckpt and 'config' in ckpt) or is_official(ckpt)):
        raise InputError(f"{flag}: '{path}' is neither a FocalDistiller checkpoint (a dict with 'model' and "
                         f"'config') nor an official mmdet3d BEVFormer/DETR3D one (a 'state_dict' of "
                         f"img_backbone.* and pts_bbox_head.* tensors)")
    return ckpt


def is_official(ckpt):
    """An official mmdet3d BEVFormer/DETR3D checkpoint: {'state_dict': {...}, 'meta': ..., ...}."""
    state = ckpt.get('state_dict') if isinstance(ckpt, dict) else None
    return isinstance(state, dict) and any(k.startswith('pts_bbox_head.') for k in state) and \
        all(torch.is_tensor(v) for v in state.values())


_OFFICIAL_SHAPES = {}


def official_shapes(name):
    """{official key: shape} that preset `name` fills (its model built on the meta device: no memory)."""
    if name not in _OFFICIAL_SHAPES:
        cfg = preset_config(name)
        with torch.device('meta'):
            model = build_model(cfg)
        _OFFICIAL_SHAPES[name] = {bevformer.official_key(k): tuple(v.shape) for k, v in model.state_dict().items()}
    return _OFFICIAL_SHAPES[name]


def official_preset(state, what):
    """The preset whose parameters an official state dict fills exactly (keys and shapes), among the
    presets of its detector (DETR3D has per-layer position encoders, BEVFormer a BEV embedding).
    None or several: one line naming the candidates and asking for the preset."""
    detr = any('.position_encoder.' in k for k in state)
    module = _model_module('detr3d' if detr else 'bevformer')
    got = {k: tuple(v.shape) for k, v in state.items() if k not in bevformer._OFFICIAL_IGNORED}
    names = list(module.PRESETS)
    fits = [n for n in names if official_shapes(n) == got]
    if len(fits) == 1:
        return fits[0]
    if fits:
        raise InputError(f"{what}: the file fits presets {', '.join(fits)} equally; name one "
                         f"(--preset / --teacher-preset)")
    differ = {n: len(set(official_shapes(n).items()) ^ set(got.items())) for n in names}
    near = min(names, key=differ.get)
    raise InputError(f"{what}: an official {module.__name__} checkpoint that fits none of the presets "
                     f"{', '.join(names)} (closest: {near}, {differ[near]} keys or shapes differ); name its preset "
                     f"(--preset / --teacher-preset) to see which")


def model_from_checkpoint(path, flag='--ckpt', preset=None, averaged=True):
    """(model, config, checkpoint): the detector rebuilt from the checkpoint's own config, weights loaded
    (on the CPU): the average of the weights when the checkpoint holds one (train.py --ema: the weights its
    run scored) unless `averaged` is False, else the trained ones. train.py uses it for --teacher too. An
    official mmdet3d checkpoint is taken as it is: its preset is `preset` (--preset, --teacher-preset) or
    inferred from its keys and shapes (`official_preset`); the returned checkpoint is then ours, as
    `python bevformer.py convert` writes it."""
    ckpt = load_checkpoint(path, flag)
    preset_flag = '--preset' if flag == '--ckpt' else f'{flag}-preset'
    if is_official(ckpt):
        state = ckpt['state_dict']
        meta = ckpt.get('meta')
        classes = meta.get('CLASSES') if isinstance(meta, dict) else None
        if classes is not None and tuple(classes) != tuple(CLASSES):
            raise InputError(f"{flag}: '{path}' was trained for the classes {tuple(classes)}, not nuScenes' "
                             f"{', '.join(CLASSES)} in this order")
        name = preset or official_preset(state, f"{flag} '{path}'")
        cfg = preset_config(name, preset_flag)
        model = _model_module(cfg.detector).load_official(build_model(cfg), state, src=f"{flag} '{path}'")
        return model, cfg, {'model': model.state_dict(), 'config': dataclasses.asdict(cfg),
                            'args': {'converted_from': os.path.abspath(path), 'preset': name}, 'iter': 0}
    if preset is not None and preset != ckpt['config'].get('name'):
        raise InputError(f"{preset_flag} {preset}: '{path}' is our checkpoint of preset "
                         f"{ckpt['config'].get('name')!r}, which rebuilds its own config")
    cfg = config_from_dict(ckpt['config'], what=f"{flag} '{path}'")
    model = build_model(cfg)
    try:
        model.load_state_dict(ckpt['ema'] if averaged and 'ema' in ckpt else ckpt['model'])
    except RuntimeError as e:
        raise InputError(f"{flag}: '{path}' weights do not fit its config "
                         f"({str(e).splitlines()[-1].strip()[:160]})") from None
    return model, cfg, ckpt
