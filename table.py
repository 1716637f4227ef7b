"""The FD3D paper's comparison table in miniature, on the synthetic world (docs/experiments.md, "The paper's
table in miniature"): a CPU-sized expert, then the apprentice alone, with FD3D and with each baseline distiller,
every run a `train.py` subprocess with one fixed schedule.

    python table.py                                # every row (hours on a 2-core CPU), resumable
    python table.py --jobs 2 --threads 1           # two train.py runs at a time, one thread each
    python table.py --only 'fd3d gated'            # some rows now (their expert always comes first)
    python table.py --summary                      # the finished rows as a Markdown table; runs nothing

Every finished run appends its row to OUT/table.csv at once, so the table can run in parts: a row in
the CSV is skipped, an interrupted run continues from its last.pt (`train.py --resume`). Each run's
folder holds its checkpoint, log.jsonl, the evaluation's metrics_summary.json and table_log.txt (its
output). `python distill.py table ...` is the same command.

This file runs train.py as subprocesses and imports no model code (common for InputError; data only
to write the table world when it is missing).
"""
import argparse
import collections
import concurrent.futures
import csv
import json
import os
import statistics
import subprocess
import sys
import time

from common import InputError

# ----------------------------------------------------------------------------------------------------
# The rows, the world and the CSV
# ----------------------------------------------------------------------------------------------------

# The FD3D rows below were run before the query gate existed: they pin `--fd3d-gate 0` so that they stay
# what their results are; 'fd3d gated' is the default FD3D (docs/fd3d.md).
UNGATED = ['--fd3d-gate', '0']
TABLE_RUNS = [  # (row name, --distill mode, extra train.py flags, seeds); the paper's comparison first
    ('none', 'none', [], 3),
    ('fd3d', 'fd3d', UNGATED, 3),
    ('heatmap', 'heatmap', [], 3),  # 3 seeds too: the goal compares FD3D with it, and the gap is small
    ('fitnet', 'fitnet', [], 1),
    ('mgd', 'mgd', [], 1),
    ('fd3d w/o focal', 'fd3d', UNGATED + ['--fd3d-parts', 'pv,bev'], 1),
    ('fd3d w/o generation', 'fd3d', UNGATED + ['--fd3d-parts', 'focal', '--fd3d-mask-ratio', '0'], 1),
    ('fd3d areas from GT', 'fd3d', UNGATED + ['--fd3d-areas', 'gt'], 1),
    ('fd3d gated', 'fd3d', [], 1),
]
# The DETR3D rows (docs/fd3d.md "FD3D for DETR3D"): expert detr3d-cpu-base -> apprentice detr3d-cpu-tiny, same world
# and schedule
DETR3D_RUNS = [('detr3d none', 'none', [], 2), ('detr3d fd3d', 'fd3d', UNGATED, 2)]
# Many short scenes, as data.DEFAULT_WORLD (cpu-tiny overfits a few long ones), at 400x225 for the expert
# cpu-base; 480 validation samples so that the spread between seeds can be measured.
TABLE_WORLD = dict(version='v1.0-trainval', train_scenes=80, val_scenes=40, samples_per_scene=12, image_scale=0.25)
# minutes: wall time of the table invocation that finished the run, evaluation included (a run resumed
# after an interruption counts only its last part; its log.jsonl's 'dt' has every iteration's time)
TABLE_FIELDS = ['run', 'seed', 'mode', 'flags', 'iters', 'NDS', 'mAP', 'minutes']


def run_folder(name, seed):
    """The folder (under the table's OUT) of one row's run: 'expert', 'detr3d-expert', 'fd3d_wo_focal-s1'."""
    experts = {'expert cpu-base': 'expert', 'expert detr3d-cpu-base': 'detr3d-expert'}
    return experts.get(name) or f"{name.replace(' ', '_').replace('/', '')}-s{seed}"


def read_table(csv_path):
    """Finished rows of the table CSV, as dicts of strings (an absent file: none)."""
    if not os.path.exists(csv_path):
        return []
    with open(csv_path, newline='') as f:
        return list(csv.DictReader(f))


def append_row(csv_path, row):
    """Append one finished run to the table CSV (the header first when the file is new)."""
    new = not os.path.exists(csv_path)
    with open(csv_path, 'a', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=TABLE_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


# ----------------------------------------------------------------------------------------------------
# One run: a train.py subprocess
# ----------------------------------------------------------------------------------------------------

def train_command(dataroot, version, out, iters, extra, threads=0):
    """The train.py command of one table run (one fixed schedule for every apprentice run)."""
    return [sys.executable, 'train.py', '--dataroot', dataroot, '--version', version,
            '--iters', str(iters), '--out', out, '--workers', '2', '--log-every', '50',
            '--points-lr-mult', '1.0'] + (   # the recipe the table's rows were run with (before issue 18)
            ['--threads', str(threads)] if threads else []) + extra


def run_subprocess(cmd, log_path):
    """Run one train.py command, its output into log_path; -> (return code, last stdout line)."""
    with open(log_path, 'a') as log:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        log.write(proc.stdout)
    lines = [line for line in proc.stdout.strip().splitlines() if line.strip()]
    return proc.returncode, lines[-1] if lines else ''


def timed(runner, cmd, log_path):
    """runner(cmd, log_path) -> (return code, last stdout line, wall minutes)."""
    t0 = time.time()
    code, last = runner(cmd, log_path)
    return code, last, round((time.time() - t0) / 60, 1)


# ----------------------------------------------------------------------------------------------------
# The table: plan the runs, run them (resumable, `parallel` at a time), summarise
# ----------------------------------------------------------------------------------------------------

# One train.py run of the table: its row name, --distill mode (None for an expert), train.py flags, seed,
# iterations, folder under OUT, and the (row name, seed) of the run it needs first (its expert) or None.
Job = collections.namedtuple('Job', 'name mode flags seed iters folder needs')


def plan_jobs(out, families, iters, expert_iters, only=None):
    """Every run of the table in start order. families: [(expert preset, apprentice preset, rows)]; each
    family's expert comes first, then its rows seed-major (every row's seed 0 before any seed 1, the rows'
    order kept within a seed), so that a table run in parts has every row early. With `only` (row names),
    only those rows and the experts of their families."""
    jobs = []
    for e_name, a_name, rows in families:
        if only and not any(r[0] in only for r in rows):
            continue
        expert_row = (f'expert {e_name}', '0')
        e_folder = run_folder(*expert_row)
        expert = os.path.join(out, e_folder, 'last.pt')
        jobs.append(Job(expert_row[0], None, ['--model', e_name, '--seed', '0'], 0, expert_iters, e_folder, None))
        seeded = sorted(((seed, row) for row in rows for seed in range(row[3])), key=lambda j: j[0])
        for seed, (name, mode, flags, _) in seeded:
            if not only or name in only:
                jobs.append(Job(name, mode, ['--teacher', expert, '--student', a_name, '--distill', mode,
                                             '--seed', str(seed)] + flags, seed, iters, run_folder(name, seed),
                                expert_row))
    return jobs


def run_table(out='runs/table', dataroot='data/table_world', iters=2000, expert_iters=4000, runs=TABLE_RUNS,
              runner=run_subprocess, only=None, version=TABLE_WORLD['version'], detr3d_runs=(), threads=0,
              parallel=1):
    """The paper's table in miniature (expert cpu-base, apprentice cpu-tiny-single; with detr3d_runs also the
    DETR3D family), resumable: a run whose row is in OUT/table.csv is skipped; an interrupted run
    continues from its last.pt (`train.py --resume`); every finished run appends its row at once, so the
    command can run in parts. `parallel` train.py runs go at a time (an apprentice only once its expert's
    row is written); after a failure nothing new starts, the runs still going keep their rows, and a
    RuntimeError names the failed run's log. `runner(cmd, log_path) -> (code, last line)` runs one
    command (tests pass a stand-in). -> the CSV rows (dicts of strings)."""
    families = [('cpu-base', 'cpu-tiny-single', runs)]  # the single-frame apprentice the rows were run with
    if detr3d_runs:  # a second family (detr3d.py) with its own expert, trained first
        families.append(('detr3d-cpu-base', 'detr3d-cpu-tiny', detr3d_runs))
    unknown = sorted(set(only or ()) - {r[0] for family in families for r in family[2]})
    if unknown:
        raise InputError(f'--only {",".join(unknown)}: expected row names among '
                         f'{", ".join(r[0] for family in families for r in family[2])}')
    os.makedirs(out, exist_ok=True)
    if not os.path.isdir(dataroot):
        import data
        print(f'writing the table world to {dataroot}: {TABLE_WORLD}')
        data.write_synthetic_world(dataroot, **TABLE_WORLD)
    csv_path = os.path.join(out, 'table.csv')
    done = {(r['run'], r['seed']) for r in read_table(csv_path)}
    todo = [j for j in plan_jobs(out, families, iters, expert_iters, only) if (j.name, str(j.seed)) not in done]

    def start(job, pool):
        run_dir = os.path.join(out, job.folder)
        ckpt = os.path.join(run_dir, 'last.pt')
        cmd = train_command(dataroot, version, run_dir, job.iters, job.flags, threads)
        if os.path.exists(ckpt):  # interrupted earlier: continue exactly where it stopped
            cmd = cmd + ['--resume', ckpt]
        print(f'[table] {job.name} seed {job.seed}: {" ".join(cmd[1:])}', flush=True)
        os.makedirs(run_dir, exist_ok=True)
        return pool.submit(timed, runner, cmd, os.path.join(run_dir, 'table_log.txt'))

    running, failure = {}, None
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        while True:
            while failure is None and len(running) < max(1, parallel):  # start what may start, in order
                job = next((j for j in todo if j.needs is None or j.needs in done), None)
                if job is None:
                    break
                todo.remove(job)
                running[start(job, pool)] = job
            if not running:  # finished, or nothing may start after a failure
                break
            finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                job = running.pop(future)
                code, last, minutes = future.result()
                parts = last.split()  # train.py's last line: 'NDS 0.1234 mAP 0.0567'
                if code != 0 or len(parts) != 4 or parts[0] != 'NDS':
                    failure = failure or (f'table run {job.name} seed {job.seed} failed (exit {code}); '
                                          f'see {os.path.join(out, job.folder)}/table_log.txt')
                    continue  # the runs still going finish and keep their rows
                row = dict(run=job.name, seed=job.seed, mode=job.mode or 'expert', flags=' '.join(job.flags),
                           iters=job.iters, NDS=float(parts[1]), mAP=float(parts[3]), minutes=minutes)
                append_row(csv_path, row)
                done.add((job.name, str(job.seed)))
                print(f'[table] {job.name} seed {job.seed}: NDS {row["NDS"]:.4f} mAP {row["mAP"]:.4f}', flush=True)
    if failure:
        raise RuntimeError(failure)
    rows = read_table(csv_path)
    print(summarise_table(rows, out))
    return rows


def summarise_table(rows, out=None):
    """Markdown table: NDS and mAP mean +- standard deviation over seeds per run; with `out` (the table's
    folder) also the mean true-positive errors of the paper's table (mATE ... mAAE) from every run's
    metrics_summary.json (a run without one leaves its cells '-')."""
    groups = {}
    for r in rows:
        groups.setdefault(r['run'], []).append(r)
    canonical = (['expert cpu-base'] + [r[0] for r in TABLE_RUNS] + ['expert detr3d-cpu-base'] +
                 [r[0] for r in DETR3D_RUNS])
    order = sorted(groups, key=lambda n: canonical.index(n) if n in canonical else len(canonical))  # paper's order
    tp = [('mATE', 'trans_err'), ('mASE', 'scale_err'), ('mAOE', 'orient_err'), ('mAVE', 'vel_err'),
          ('mAAE', 'attr_err')] if out else []
    lines = ['| run | seeds | NDS | mAP |' + ''.join(f' {name} |' for name, _ in tp),
             '|---|---|---|---|' + '---|' * len(tp)]
    for name in order:
        g = groups[name]
        cell = []
        for key in ('NDS', 'mAP'):
            v = [100 * float(r[key]) for r in g]
            cell.append(f'{statistics.mean(v):.2f}' + (f' +- {statistics.stdev(v):.2f}' if len(v) > 1 else ''))
        errors = []
        for r in g if out else []:  # evaluate.py's summary of each seed's run
            path = os.path.join(out, run_folder(r['run'], r['seed']), 'metrics_summary.json')
            if os.path.exists(path):
                with open(path) as f:
                    errors.append(json.load(f)['tp_errors'])
        for _, key in tp:
            cell.append(f'{statistics.mean(e[key] for e in errors):.3f}' if len(errors) == len(g) else '-')
        lines.append(f'| {name} | {len(g)} | ' + ' | '.join(cell) + ' |')
    return '\n'.join(lines)


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------

def get_args(argv=None, prog=None):
    p = argparse.ArgumentParser(prog=prog, description='The FD3D paper\'s table in miniature on the synthetic '
                                'world (resumable; results accumulate in OUT/table.csv).')
    p.add_argument('--out', default='runs/table', help='runs and table.csv')
    p.add_argument('--dataroot', default='data/table_world', help='the table world (written if missing)')
    p.add_argument('--iters', type=int, default=2000, help='iterations of every apprentice run (one schedule)')
    p.add_argument('--expert-iters', type=int, default=4000, help='iterations of the cpu-base expert')
    p.add_argument('--only', help='comma-separated row names to run now (the expert always comes first)')
    p.add_argument('--summary', action='store_true', help='print the table of the finished rows (mean +- std '
                   'over seeds, with the TP errors) and run nothing')
    p.add_argument('--jobs', type=int, default=1, help='train.py runs at a time (an apprentice starts once its '
                   'expert is trained); on a 2-core CPU --jobs 2 --threads 1')
    p.add_argument('--threads', type=int, default=0, help="torch CPU threads of each train.py run (0: train.py's "
                   'default)')
    return p.parse_args(argv)


def main(argv=None, prog=None):
    args = get_args(argv, prog)
    try:
        if args.summary:
            print(summarise_table(read_table(os.path.join(args.out, 'table.csv')), args.out))
            return
        if args.jobs < 1 or args.threads < 0:
            raise InputError(f'--jobs {args.jobs} --threads {args.threads}: expected --jobs >= 1 and --threads >= 0')
        run_table(args.out, args.dataroot, args.iters, args.expert_iters,
                  only=set(args.only.split(',')) if args.only else None, detr3d_runs=DETR3D_RUNS,
                  threads=args.threads, parallel=args.jobs)
    except (InputError, RuntimeError) as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    main()
