"""The project's shape (issue 17): no import cycle between project files (in-function imports count),
the model files import without nuscenes-devkit, and the cost benchmark prints what it measures."""
import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def project_modules():
    """{module name: path} of the project's own Python files (top level and ops/)."""
    mods = {f[:-3]: os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith('.py')}
    mods['ops'] = os.path.join(ROOT, 'ops', '__init__.py')
    for f in os.listdir(os.path.join(ROOT, 'ops')):
        if f.endswith('.py') and f != '__init__.py':
            mods['ops.' + f[:-3]] = os.path.join(ROOT, 'ops', f)
    return mods


def imports_of(path, mods, package=None):
    """Project modules that the file imports anywhere (top level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:                                   # relative import inside ops/
                base = package + ('.' + base if base else '')
            names = [base] + [f'{base}.{a.name}' for a in node.names]
        else:
            continue
        out |= {n for n in names if n in mods}
    return out


def test_no_import_cycle_between_project_files():
    mods = project_modules()
    graph = {m: imports_of(p, mods, 'ops' if m.startswith('ops') else None) - {m} for m, p in mods.items()}
    graph = {m: {d for d in deps if not (m.startswith('ops') and d.startswith('ops'))} for m, deps in graph.items()}
    state, stack = {}, []

    def visit(m):   # depth-first search; a grey node met again closes a cycle
        state[m] = 'grey'
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 'grey':
                raise AssertionError('import cycle: ' + ' -> '.join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 'black'

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert {'bevformer', 'detr3d', 'distill', 'models', 'backbone', 'common'} <= set(graph)


def test_model_files_import_without_the_dataset_code():
    code = ("import sys, bevformer, detr3d, distill, models, backbone, common\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('nuscenes', 'data', 'synthetic', 'evaluate'))\n"
            "print(bad)")
    r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == '[]'


def test_cost_benchmark_prints_params_and_step_time(capsys):
    import evaluate
    import models
    evaluate.bench(['cpu-tiny', 'detr3d-cpu-tiny'], ['cpu-tiny'], iters=1, threads=1)
    out = capsys.readouterr().out
    for name in ('cpu-tiny', 'detr3d-cpu-tiny'):
        params = sum(p.numel() for p in models.build_model(models.preset_config(name)).parameters()) / 1e6
        row = next(line for line in out.splitlines() if line.startswith(name + ' '))
        assert f'{params:.2f}' in row.split()                     # the parameter count it states is right
    step = next(line for line in out.splitlines() if line.startswith('cpu-tiny') and 's/iter' in line)
    assert float(step.split('queue 2:')[1].split()[0]) > 0          # cpu-tiny has one history frame


def test_step_profile_has_every_part_and_they_fit_in_the_step():
    import dataclasses

    import evaluate
    import models
    cfg = dataclasses.replace(models.preset_config('cpu-tiny'), bev_h=20, bev_w=20, num_query=50)  # one history frame
    rows = evaluate.profile_step(cfg, iters=1, threads=1)
    parts = ['backbone', 'FPN', 'encoder 0: TSA', 'encoder 0: SCA', 'encoder 0: FFN', 'decoder 0']
    for p in parts:
        assert rows[f'{p} forward'] > 0 and rows[f'{p} backward'] > 0, p
    for r in ('history frames (no gradient, eval mode)', 'pillar projection', 'per-camera compaction', 'matcher',
              'optimiser step'):
        assert rows[r] > 0, r
    assert sum(rows[f'{p} forward'] for p in parts) < rows['forward (all)']   # the current frame's parts
    assert rows['forward (all)'] + rows['backward (all)'] < rows['step (all)']
