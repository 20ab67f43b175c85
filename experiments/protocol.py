r"""The paper's protocol on Fashion-MNIST (`reproduce.py --table fashion_mnist_protocol`): per seed one
full-precision checkpoint, then every row of `configs/fashion_mnist_protocol.py` fine-tunes it; the
results JSON (fields pinned: other tools read them) and its markdown table.

    python experiments/reproduce.py --table fashion_mnist_protocol --seeds 0,1,2 [--budget tiny|cpu|gpu] [--parallel N]

Each run is `python -m ttq_jax.main` in its own workdir, ROOT/<budget>/seed_<s>/<row> (re-running resumes
an unfinished run and re-reads a finished one's result.json). `--parallel N` runs up to N of them at once
(a seed's fine-tunes start when its FP checkpoint is written); this module never initialises a JAX
backend itself, so on a GPU the processes share the device. `--parallel 0` runs them one after another in
this process instead (`train.train_and_evaluate` on the same config the command line would build: no
interpreter start or import per run, and programs compiled for one run are reused by the next through
the persistent compilation cache; what the tiny budget's test runs).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import platform
import subprocess
import sys
import threading
import time

import numpy as np

from ttq_jax import statistics
from ttq_jax import tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = 'configs/fashion_mnist_protocol.py'
RESULTS = os.path.join(ROOT, 'experiments', 'results', 'fashion_mnist_protocol.json')
GPU_RESULTS = os.path.join(ROOT, 'experiments', 'results', 'fashion_mnist_protocol_gpu.json')
README_NAME = 'fashion_mnist_protocol'  # README.md shows markdown(RESULTS) between its markers
README_START, README_END = tables.markers(README_NAME)
# (a, b): each claim is the paired, same-seed difference a - b
PAIRS = (('ttq_max', 'fp'), ('ttq_mean', 'fp'), ('twn_max', 'fp'), ('twn_mean', 'fp'),
         ('ttq_max', 'twn_max'), ('ttq_mean', 'twn_mean'),
         ('ttq_max', 'ttq_mean'), ('twn_max', 'twn_mean'))
PAPER_TTQ_MINUS_FP = (-0.64, 0.36)  # CIFAR-10 ResNet-20/32/44/56, points of top-1 (paper Table 1)


def _protocol_config():
  from configs import fashion_mnist_protocol
  return fashion_mnist_protocol


@dataclasses.dataclass(frozen=True)
class Job:
  row: str           # fp_init or a row of ROWS
  seed: int
  budget: str
  workdir: str
  init_from: str = ''

  def command(self) -> list[str]:
    cmd = [sys.executable, '-m', 'ttq_jax.main', '--config', f'{CONFIG}:{self.row},{self.budget}',
           '--workdir', self.workdir, f'--config.seed={self.seed}']
    return cmd + ([f'--config.init_from={self.init_from}'] if self.init_from else [])

  def config(self):
    """The config `command()` gives the command line (for runs in this process)."""
    config = _protocol_config().get_config(f'{self.row},{self.budget}')
    config.seed = self.seed
    config.init_from = self.init_from
    return config


class Runner:
  """Runs jobs as subprocesses, at most `parallel` at once, or (parallel 0) one at a time in this process;
  logs each run's output to its workdir's run.log."""

  def __init__(self, parallel: int, log=print):
    self.in_process = parallel == 0
    self.pool = concurrent.futures.ThreadPoolExecutor(max(1, parallel))
    self.log, self.lock = log, threading.Lock()

  def _log(self, message: str) -> None:
    with self.lock:
      self.log(message)

  def _run(self, job: Job) -> dict:
    log = self._log
    label = f'{job.row} seed {job.seed}'
    if self.in_process:  # the run's console (progress, logging, final table) goes to its run.log
      return tables.run_or_reuse(job.workdir, config=job.config(), quiet=True, label=label, log=log)
    return tables.run_or_reuse(job.workdir, command=job.command(), cwd=ROOT, label=label, log=log)

  def submit(self, job: Job) -> concurrent.futures.Future:
    if not self.in_process:
      return self.pool.submit(self._run, job)
    # in this (the main) thread, at once: training owns SIGTERM / SIGINT, which only the main thread may handle
    future = concurrent.futures.Future()
    try:
      future.set_result(self._run(job))
    except Exception as e:  # noqa: BLE001 - re-raised by future.result(), as from the pool
      future.set_exception(e)
    return future


def run_all(seeds, budget: str, root: str, parallel: int, log=print) -> tuple[dict, dict]:
  """Trains (or re-reads) every run: ({seed: FP result}, {(row, seed): fine-tune result})."""
  rows = list(_protocol_config().ROWS)
  runner = Runner(parallel, log)
  workdir = lambda seed, row: os.path.join(root, budget, f'seed_{seed}', row)
  fp_futures = {runner.submit(Job('fp_init', s, budget, workdir(s, 'fp_init'))): s for s in seeds}
  fp_results, futures = {}, {}
  for future in concurrent.futures.as_completed(fp_futures):
    seed = fp_futures[future]
    fp_results[seed] = future.result()
    for row in rows:
      futures[(row, seed)] = runner.submit(Job(row, seed, budget, workdir(seed, row), workdir(seed, 'fp_init')))
  results = {key: f.result() for key, f in futures.items()}
  runner.pool.shutdown()
  return dict(sorted(fp_results.items())), results


# --------------------------------------------------------------------------- the results JSON


def _pct(x) -> float:
  return round(100.0 * float(x), 4)


def _chosen(result: dict, column: str) -> float:
  """Test top-1 (%) of the model chosen on validation, `column` BN statistics."""
  return _pct(result['best_on_validation'][column]['top1_accuracy'])


def _scale_range(result: dict):
  scales = [s for pair in (result.get('scales') or {}).values() for s in pair]
  return [round(min(scales), 6), round(max(scales), 6)] if scales else None


def with_holm(data: dict) -> dict:
  """`paired` (re-estimated BN, the headline) and `paired_running`: the PAIRS' same-seed differences
  (`tables.paired_tests`: two-sided paired t, df = n - 1, Holm over its column's comparisons; `stderr` is `se`
  rounded, as the file always held) with `resolved` = Holm-adjusted p < 0.05; recomputed from the rows' per-seed
  values alone."""
  rows = {r['name']: r for r in data['rows']}
  out = dict(data)
  for key, metric in (('paired', 'test_top1_reestimated'), ('paired_running', 'test_top1_running')):
    tests = tables.paired_tests({k: dict(zip(r['seeds'], r[metric])) for k, r in rows.items()}, PAIRS)
    out[key] = [{**t, 'metric': metric, 'mean': round(t['mean'], 4), 'stderr': None if t['se'] is None else round(t['se'], 4),
                 'per_seed': [round(float(x), 4) for x in t['per_seed'].values()],
                 'resolved': statistics.verdict(t) == 'resolved'} for t in tests]
  return out


def build_results(fp_results: dict, results: dict, *, budget: str, seeds, machine: str, commit: str) -> dict:
  """The pinned JSON (accuracies in percent)."""
  cfg = _protocol_config()
  fp_steps, finetune_steps, batch_size, _ = cfg.BUDGETS[budget]
  rows = {}
  for row, (method, threshold) in cfg.ROWS.items():
    rs = [results[(row, s)] for s in seeds]
    rows[row] = {
        'name': row, 'method': method, 'threshold': threshold,
        't': cfg.T if threshold == 'max' else None, 'k': cfg.K if threshold == 'mean' else None,
        'seeds': list(seeds),
        'init_from': [{'fp_steps': r['init_from']['step'], 'params_sha256': r['init_from']['params_sha256']} for r in rs],
        'test_top1_running': [_chosen(r, 'running') for r in rs],
        'test_top1_reestimated': [_chosen(r, 'reestimated') for r in rs],
        'val_top1_best': [_pct(r['best_on_validation']['reestimated']['validation_top1_accuracy']) for r in rs],
        'val_top1_best_running': [_pct(r['best_on_validation']['running']['validation_top1_accuracy']) for r in rs],
        'chosen_step': [r['best_on_validation']['reestimated']['step'] for r in rs],
        'mean_sparsity': [round(float(np.mean(list(r['sparsity'].values()))), 4) if r.get('sparsity') else None
                          for r in rs],
        'scale_range': [_scale_range(r) for r in rs],
        'ternary_parameters': [r['param_counts']['ternary'] if method != 'fp' else 0 for r in rs],
        'elapsed_s': [round(r['elapsed_s'], 1) for r in rs],
    }
  return with_holm({
      'budget': {'name': budget, 'fp_steps': fp_steps, 'finetune_steps': finetune_steps, 'batch_size': batch_size},
      'machine': machine, 'commit': commit,
      'rows': list(rows.values()),
      'fp_init_test_top1': [_pct(fp_results[s]['top1_accuracy']) for s in seeds],
      'fp_init_test_top1_running': [_pct(fp_results[s]['test']['running']['top1_accuracy']) for s in seeds],
      'paper_ttq_minus_fp_cifar': list(PAPER_TTQ_MINUS_FP),
  })


def check_same_init(data: dict) -> list[str]:
  """Problems with the design: a seed whose fine-tunes did not all start from one FP checkpoint."""
  problems = []
  for i, seed in enumerate(data['rows'][0]['seeds']):
    digests = {r['name']: r['init_from'][i]['params_sha256'] for r in data['rows']}
    if len(set(digests.values())) != 1:
      problems.append(f'seed {seed}: fine-tunes started from different checkpoints: {digests}')
  return problems


# --------------------------------------------------------------------------- the table


def _claim(p: dict) -> str:
  if p['stderr'] is None:
    return f'{p["mean"]:+.2f} (one seed)'
  return f'{p["mean"]:+.2f} ± {p["stderr"]:.2f} (p = {p["p"]:.2g}, Holm p = {p["p_holm"]:.2g}: {statistics.verdict(p)})'


LABELS = {'fp': 'FP fine-tune', 'ttq_max': 'TTQ, max (t = 0.05)', 'ttq_mean': 'TTQ, mean (k = 0.7)',
          'twn_max': 'TWN, max (t = 0.05)', 'twn_mean': 'TWN, mean (k = 0.7)'}


def markdown(data: dict) -> str:
  """The README table: per row mean ± std over seeds, then the paired claims."""
  b = data['budget']
  n = len(data['rows'][0]['seeds'])
  lines = [f'Budget `{b["name"]}`: FP checkpoint {b["fp_steps"]} steps, each fine-tune {b["finetune_steps"]} steps, '
           f'batch {b["batch_size"]}; {n} seeds ({", ".join(map(str, data["rows"][0]["seeds"]))}); {data["machine"]}. '
           f'The FP checkpoints themselves: test top-1 {statistics.mean_spread(data["fp_init_test_top1"])} % (re-estimated BN), '
           f'{statistics.mean_spread(data["fp_init_test_top1_running"])} % (running BN).', '',
           '| row | test top-1 (%), chosen on validation, re-estimated BN | per seed | same, running BN | '
           'best validation top-1 (%) | mean sparsity | scale range (W_p / W_n or alpha) |',
           '|---|---|---|---|---|---|---|']
  for r in data['rows']:
    sp = [s for s in r['mean_sparsity'] if s is not None]
    ranges = [x for x in r['scale_range'] if x]
    scale = f'{min(x[0] for x in ranges):.3f} to {max(x[1] for x in ranges):.3f}' if ranges else '-'
    per_seed = ' / '.join(f'{x:.2f}' for x in r['test_top1_reestimated'])
    lines.append(f'| {LABELS.get(r["name"], r["name"])} | {statistics.mean_spread(r["test_top1_reestimated"])} | {per_seed} | '
                 f'{statistics.mean_spread(r["test_top1_running"])} | {statistics.mean_spread(r["val_top1_best"])} | '
                 f'{f"{np.mean(sp):.3f}" if sp else "-"} | {scale} |')
  lines += ['', '| claim (paired, same seed; points of test top-1 +- SE; two-sided paired t, Holm over the '
            f'{len(data["paired"])} tests of a column) | re-estimated BN | running BN |', '|---|---|---|']
  running = {(p['a'], p['b']): p for p in data['paired_running']}
  for p in data['paired']:
    lines.append(f'| {p["a"]} − {p["b"]} | {_claim(p)} | {_claim(running[(p["a"], p["b"])])} |')
  lo, hi = data['paper_ttq_minus_fp_cifar']
  lines.append(f'| paper, TTQ − FP on CIFAR-10 (ResNet-20 to 56, 400 + 400 epochs) | {lo:+.2f} to {hi:+.2f} | |')
  return '\n'.join(lines)


def readme_block(readme: str) -> str:
  """The generated table as it stands in README.md (between the markers)."""
  return tables.readme_block(readme, README_NAME)


def machine_description() -> str:
  """The accelerator (nvidia-smi) or the CPU model and core count; no JAX backend is started."""
  try:
    gpus = subprocess.run(['nvidia-smi', '--query-gpu=name', '--format=csv,noheader'], capture_output=True,
                          text=True, timeout=30).stdout.strip().splitlines()
    if gpus:
      return f'{len(gpus)} x {gpus[0]} (GPU), {os.cpu_count()} CPU cores'
  except (OSError, subprocess.SubprocessError):
    pass
  model = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      model = next((l.split(':', 1)[1].strip() for l in f if l.startswith('model name')), model)
  except OSError:
    pass
  return f'{os.cpu_count()} CPU cores ({model})'


def commit_description() -> str:
  try:
    sha = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return sha + ('+uncommitted changes' if dirty else '') if sha else 'unknown'
  except OSError:
    return 'unknown'


def main(args) -> dict:
  seeds = [int(s) for s in args.seeds.split(',')]
  root = os.path.join(args.workdir_root, 'fashion_mnist_protocol')
  started = time.perf_counter()
  fp_results, results = run_all(seeds, args.budget, root, args.parallel, log=lambda m: print(m, flush=True))
  data = build_results(fp_results, results, budget=args.budget, seeds=seeds, machine=machine_description(),
                       commit=commit_description())
  data['wall_s'] = round(time.perf_counter() - started, 1)
  from ttq_jax import provenance
  data['provenance'] = {**provenance.record(ROOT), 'configs': {  # each run: its config file and variant, with its seed
      row: f'configs/fashion_mnist_protocol.py:{row},{args.budget}' for row in ['fp_init', *_protocol_config().ROWS]}}
  problems = check_same_init(data)
  if problems:
    raise SystemExit('; '.join(problems))
  out = args.results or (GPU_RESULTS if args.budget == 'gpu' else RESULTS if args.budget == 'cpu'
                         else os.path.join(root, args.budget, 'results.json'))
  tables.write_results(out, data)
  print(markdown(data))
  print(f'wrote {out} ({data["wall_s"] / 60:.1f} min)')
  return data
