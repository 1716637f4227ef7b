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
