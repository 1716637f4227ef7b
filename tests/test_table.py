"""Tests of table.py, the miniature table (`python table.py`, also `python distill.py table`): the run
order (each family's expert first, seed-major), resuming, parallel jobs, one-line errors, the summary, and
a slow run with real train.py subprocesses. Stand-in runners replace train.py everywhere else."""
import json
import os
import subprocess
import sys
import threading
import time

import pytest

import distill
import table


def test_table_imports_no_model_code():
    """table.py runs train.py as subprocesses: importing it pulls in neither the models nor the method."""
    code = ('import sys, table; print(sorted(m for m in sys.modules if m in '
            '("bevformer", "detr3d", "distill", "evaluate", "train", "data", "models")))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == '[]'


def test_distill_cli_is_only_the_table_alias(capsys):
    with pytest.raises(SystemExit) as e:
        distill.main(['bench'])
    assert e.value.code == 2 and 'table.py' in capsys.readouterr().err


def test_table_skips_finished_runs_and_resumes_interrupted_ones(tmp_path):
    """`python table.py` logic on a tiny schedule with a stand-in runner (the real runs take hours):
    the expert first, rows accumulate in the CSV, finished runs are skipped, an interrupted run (its
    last.pt exists, no row) is resumed with --resume, a failed run stops the table with its log named."""
    os.makedirs(tmp_path / 'world')
    calls = []

    def runner(cmd, log_path, fail=()):
        calls.append(cmd)
        out = cmd[cmd.index('--out') + 1]
        name = os.path.basename(out)
        if name in fail:
            return 1, 'Traceback'
        open(os.path.join(out, 'last.pt'), 'w').close()
        return 0, f'NDS 0.{len(calls):04d} mAP 0.0100'

    runs = [('none', 'none', [], 2), ('fd3d w/o focal', 'fd3d', ['--fd3d-parts', 'pv,bev'], 1)]
    with pytest.raises(RuntimeError, match='fd3d w/o focal seed 0 failed .*table_log.txt'):
        table.run_table(str(tmp_path / 'out'), str(tmp_path / 'world'), iters=5, expert_iters=7, runs=runs,
                        runner=lambda c, p: runner(c, p, fail={'fd3d_wo_focal-s0'}))
    first = [os.path.basename(c[c.index('--out') + 1]) for c in calls]
    assert first == ['expert', 'none-s0', 'fd3d_wo_focal-s0']  # seed-major: every row's seed 0 first
    assert calls[0][calls[0].index('--iters') + 1] == '7' and calls[1][calls[1].index('--iters') + 1] == '5'
    assert '--teacher' in calls[1] and calls[2][-2:] == ['--fd3d-parts', 'pv,bev'] and '--resume' not in calls[2]
    assert [(r['run'], r['seed']) for r in table.read_table(str(tmp_path / 'out' / 'table.csv'))] == [
        ('expert cpu-base', '0'), ('none', '0')]
    # the failed run left a last.pt (as an interrupted run does): the second call resumes it only
    open(tmp_path / 'out' / 'fd3d_wo_focal-s0' / 'last.pt', 'w').close()
    calls.clear()
    rows = table.run_table(str(tmp_path / 'out'), str(tmp_path / 'world'), iters=5, expert_iters=7, runs=runs,
                           runner=runner)
    assert len(calls) == 2 and calls[0][-2:] == ['--resume', str(tmp_path / 'out' / 'fd3d_wo_focal-s0' / 'last.pt')]
    assert os.path.basename(calls[1][calls[1].index('--out') + 1]) == 'none-s1' and '--resume' not in calls[1]
    assert [(r['run'], r['seed']) for r in rows] == [('expert cpu-base', '0'), ('none', '0'), ('fd3d w/o focal', '0'),
                                                     ('none', '1')]
    calls.clear()
    table.run_table(str(tmp_path / 'out'), str(tmp_path / 'world'), iters=5, expert_iters=7, runs=runs,
                    runner=runner)
    assert calls == []  # everything finished: nothing runs again
    summary = table.summarise_table(rows)
    assert '| none | 2 |' in summary and '+-' in summary.splitlines()[3]


def test_table_runs_jobs_in_parallel_after_their_expert(tmp_path, capsys):
    """`table.py --jobs 2`: two runs at a time, an apprentice never before its expert's row is
    written, the two families' experts side by side; a failed run stops new starts, the run still going
    keeps its row; bad --jobs is one line."""
    lock, state = threading.Lock(), dict(now=0, most=0, log=[])

    def runner(cmd, log_path, fail=()):
        folder = os.path.basename(cmd[cmd.index('--out') + 1])
        with lock:
            state['now'] += 1
            state['most'] = max(state['most'], state['now'])
            state['log'].append(('start', folder))
        time.sleep(0 if folder in fail else 0.3 if 'expert' in folder or folder == 'fd3d-s0' else 0.02)
        with lock:
            state['now'] -= 1
            state['log'].append(('end', folder))
        open(os.path.join(os.path.dirname(log_path), 'last.pt'), 'w').close()
        return (1, 'Traceback') if folder in fail else (0, 'NDS 0.1000 mAP 0.0500')

    world = tmp_path / 'world'
    world.mkdir()
    runs = [('none', 'none', [], 2), ('fd3d', 'fd3d', [], 1)]
    rows = table.run_table(str(tmp_path / 'out'), str(world), iters=5, expert_iters=7, runs=runs,
                           runner=runner, detr3d_runs=[('detr3d fd3d', 'fd3d', [], 1)], parallel=2)
    assert state['most'] == 2 and state['now'] == 0
    log = state['log']
    assert set(log[:2]) == {('start', 'expert'), ('start', 'detr3d-expert')}  # the experts side by side
    for family, expert in (('none-', 'expert'), ('fd3d-', 'expert'), ('detr3d_', 'detr3d-expert')):
        ends = log.index(('end', expert))
        assert all(log.index(e) > ends for e in log if e[0] == 'start' and e[1].startswith(family))
    assert sorted((r['run'], r['seed']) for r in rows) == sorted(
        [('expert cpu-base', '0'), ('none', '0'), ('none', '1'), ('fd3d', '0'), ('expert detr3d-cpu-base', '0'),
         ('detr3d fd3d', '0')])
    # a failure: no new run starts, the one still going writes its row, the error names the failed run
    state.update(now=0, most=0, log=[])
    with pytest.raises(RuntimeError, match='none seed 0 failed'):
        table.run_table(str(tmp_path / 'out2'), str(world), iters=5, expert_iters=7, runs=runs, parallel=2,
                        runner=lambda c, p: runner(c, p, fail={'none-s0'}))
    started = [f for what, f in state['log'] if what == 'start']
    assert started[0] == 'expert' and sorted(started[1:]) == ['fd3d-s0', 'none-s0']  # none-s1 never started
    assert [r['run'] for r in table.read_table(str(tmp_path / 'out2' / 'table.csv'))] == ['expert cpu-base', 'fd3d']
    capsys.readouterr()
    with pytest.raises(SystemExit):
        table.main(['--out', str(tmp_path / 'out3'), '--dataroot', str(world), '--jobs', '0'])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and '--jobs 0' in err[0]
    with pytest.raises(SystemExit):  # a row name that is not in the table
        table.main(['--out', str(tmp_path / 'out3'), '--dataroot', str(world), '--only', 'fd3d,fd4d'])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and '--only fd4d' in err[0] and 'fd3d w/o focal' in err[0]
    assert not os.path.exists(tmp_path / 'out3')  # refused before anything is written


def test_table_summary_orders_rows_and_averages_the_tp_errors(tmp_path, capsys):
    """`table.py --summary` (and `distill.py table --summary`, the same output): rows in the paper's order
    whatever order they finished in, NDS/mAP mean +- std over seeds, TP errors averaged from each run's
    metrics_summary.json ('-' when one is missing)."""
    rows = [dict(run='fd3d', seed='1', NDS='0.30', mAP='0.20'), dict(run='none', seed='0', NDS='0.20', mAP='0.10'),
            dict(run='fd3d', seed='0', NDS='0.26', mAP='0.16'),
            dict(run='expert cpu-base', seed='0', NDS='0.4', mAP='0.3')]
    keys = ['trans_err', 'scale_err', 'orient_err', 'vel_err', 'attr_err']
    for folder, base in (('fd3d-s0', 0.5), ('fd3d-s1', 0.7), ('expert', 0.1)):  # none-s0 has none
        os.makedirs(tmp_path / folder)
        with open(tmp_path / folder / 'metrics_summary.json', 'w') as f:
            json.dump({'tp_errors': {k: base + i / 10 for i, k in enumerate(keys)}}, f)
    with open(tmp_path / 'table.csv', 'w') as f:
        f.write(','.join(table.TABLE_FIELDS) + '\n')
        for r in rows:
            f.write(f"{r['run']},{r['seed']},m,,5,{r['NDS']},{r['mAP']},1.0\n")
    table.main(['--out', str(tmp_path), '--summary'])
    printed = capsys.readouterr().out
    distill.main(['table', '--out', str(tmp_path), '--summary'])  # the alias prints the same
    assert capsys.readouterr().out == printed
    lines = printed.strip().splitlines()
    assert lines[0].split('|')[3:10] == [' NDS ', ' mAP ', ' mATE ', ' mASE ', ' mAOE ', ' mAVE ', ' mAAE ']
    assert [line.split('|')[1].strip() for line in lines[2:]] == ['expert cpu-base', 'none', 'fd3d']
    fd3d = [c.strip() for c in lines[4].split('|')[2:-1]]
    assert fd3d == ['2', '28.00 +- 2.83', '18.00 +- 2.83', '0.600', '0.700', '0.800', '0.900', '1.000']
    assert lines[3].endswith('| 20.00 | 10.00 | - | - | - | - | - |')
    assert not os.path.exists(tmp_path / 'none-s0')  # the summary runs nothing


@pytest.mark.slow
def test_table_for_real_on_a_tiny_schedule(tmp_path_factory, capsys):
    """`table.run_table` with real train.py runs (2 iterations each) on the small world: the expert, the
    apprentice alone and FD3D; then a lost row is re-run from its checkpoint with --resume."""
    from fixtures import small_world
    world = small_world(tmp_path_factory.mktemp('world'))
    out = str(tmp_path_factory.mktemp('table'))
    runs = [('none', 'none', [], 1), ('fd3d', 'fd3d', [], 1)]
    rows = table.run_table(out, world, iters=2, expert_iters=2, runs=runs, version='v1.0-mini')
    assert [r['run'] for r in rows] == ['expert cpu-base', 'none', 'fd3d']
    assert all(0 <= float(r['NDS']) <= 1 for r in rows)
    log = open(os.path.join(out, 'fd3d-s0', 'log.jsonl')).read()
    assert 'kd_focal' in log and 'kd_pv_0' in log
    csv_path = os.path.join(out, 'table.csv')
    lines = open(csv_path).read().splitlines()
    with open(csv_path, 'w') as f:  # as if the fd3d run had been interrupted before its row was written
        f.write('\n'.join(lines[:-1]) + '\n')
    capsys.readouterr()
    rows = table.run_table(out, world, iters=2, expert_iters=2, runs=runs, version='v1.0-mini')
    assert [r['run'] for r in rows] == ['expert cpu-base', 'none', 'fd3d']
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith('[table]')]
    assert len(printed) == 2 and printed[0].startswith('[table] fd3d seed 0:') and '--resume' in printed[0]



def test_miniature_table_has_the_detr3d_rows(tmp_path):
    """`python table.py` (stand-in runner): the DETR3D family trains its own expert first, then the
    apprentice alone and with FD3D, 2 seeds each, taught by that expert; `--only` a DETR3D row skips the
    BEVFormer expert, and the BEVFormer rows never see the DETR3D expert."""
    calls = []

    def runner(cmd, log_path):
        calls.append(cmd)
        return 0, 'NDS 0.1000 mAP 0.0500'

    world = tmp_path / 'world'
    world.mkdir()
    assert [r[:2] for r in table.DETR3D_RUNS] == [('detr3d none', 'none'), ('detr3d fd3d', 'fd3d')]
    rows = table.run_table(str(tmp_path / 'out'), str(world), iters=5, expert_iters=7, runs=[('none', 'none', [], 1)],
                           runner=runner, detr3d_runs=table.DETR3D_RUNS)
    outs = [os.path.basename(c[c.index('--out') + 1]) for c in calls]
    assert outs == ['expert', 'none-s0', 'detr3d-expert', 'detr3d_none-s0', 'detr3d_fd3d-s0', 'detr3d_none-s1',
                    'detr3d_fd3d-s1']
    arg = lambda c, flag: c[c.index(flag) + 1]  # noqa: E731
    assert arg(calls[2], '--model') == 'detr3d-cpu-base' and arg(calls[2], '--iters') == '7'
    for c in calls[3:]:
        assert arg(c, '--student') == 'detr3d-cpu-tiny'
        assert arg(c, '--teacher').endswith(os.path.join('detr3d-expert', 'last.pt'))
    assert arg(calls[1], '--teacher').endswith(os.path.join('out', 'expert', 'last.pt'))
    assert [r['run'] for r in rows][2:] == ['expert detr3d-cpu-base'] + ['detr3d none', 'detr3d fd3d'] * 2
    assert not any('--threads' in c for c in calls)  # by default train.py picks its threads
    calls.clear()
    table.run_table(str(tmp_path / 'out2'), str(world), iters=5, expert_iters=7, runs=[('none', 'none', [], 1)],
                    runner=runner, detr3d_runs=table.DETR3D_RUNS, only={'detr3d fd3d'}, threads=1)
    assert [os.path.basename(c[c.index('--out') + 1]) for c in calls] == ['detr3d-expert', 'detr3d_fd3d-s0',
                                                                          'detr3d_fd3d-s1']
    assert all(arg(c, '--threads') == '1' for c in calls)  # the table's --threads reaches every train.py run
