r"""Reproduction harness: the paper's rows (and their recipes), and our Fashion-MNIST table over seeds.

    python experiments/reproduce.py --table fashion_mnist [--seeds 0,1,2]   # CPU, offline (~8 min a run)
    python experiments/reproduce.py --table fashion_mnist_protocol [--seeds 0,1,2] [--budget tiny|cpu|gpu] [--parallel N]
    python experiments/reproduce.py --table lm --seeds 0,1,2 [--budget tiny|cpu|gpu] [--only fp,ttq,...]  # ternary LMs
    python experiments/reproduce.py --table lm_study --seeds 0,1,2 [--budget tiny|cpu|gpu]  # LM fine-tuning study
    python experiments/reproduce.py --table paper                           # the paper's rows + FP twins
    python experiments/reproduce.py --table paper --describe [--json OUT] [--markdown docs/recipes.md]

Each run is `python -m ttq_jax.main` in its own workdir (re-running resumes, or re-reads a finished run's
result.json). The reporting protocol: for CIFAR / ImageNet (no validation split here, as in the paper)
the final, best and mean-of-last-5 test errors over evaluations of the trained (ternary) model, with the
running BN statistics and, separately, with re-estimated ones; for Fashion-MNIST, the model chosen on the
validation split, reported on test, mean +- std over seeds. `--describe` prints the effective recipe of
every paper row, computed from its config (`ttq_jax.recipes`), next to the official values.
`--table fashion_mnist_protocol` is the paper's protocol (one FP checkpoint per seed, every method
fine-tunes it): `experiments/protocol.py`. `--table lm` (byte-level decoders on the Python documentation: FP,
TTQ, BitNet b1.58, ParetoQ, TWN, 8-bit activations, fine-tunes from FP): `experiments/lm_table.py`. `--table lm_study`
(every method fine-tuned from one FP decoder per seed, paired tests, ternary dynamics): `experiments/lm_study.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from configs import paper_rows  # noqa: E402
from ttq_jax import recipes  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Run:
  row: str
  config: str
  workdir: str
  init_from: str = ''


FASHION_MNIST_ROWS = {  # row -> (slug, config)
    'FP': ('fp', 'configs/fashion_mnist.py:fp'),
    'TTQ, paper recipe': ('ttq_paper', 'configs/fashion_mnist.py:paper'),
    'TTQ, our recipe (quickstart)': ('ttq_ours', 'configs/fashion_mnist.py'),
    'TWN': ('twn', 'configs/fashion_mnist.py:twn'),
    'BitNet b1.58 weights (absmean)': ('bitnet', 'configs/fashion_mnist.py:bitnet'),
    'TTQ, paper recipe with its step schedule compressed': ('ttq_paper_steps', 'configs/fashion_mnist.py:paper_steps'),
}


def _slug(name: str) -> str:
  return ''.join(c if c.isalnum() else '_' for c in name.lower()).strip('_')


def missing_requirements(row: paper_rows.PaperRow, allow_cpu: bool) -> str:
  needs = []
  try:
    import tensorflow_datasets as tfds
    tfds.data_source(row.needs_data, split='train')
  except Exception:  # noqa: BLE001 - any failure means the data is not prepared
    needs.append(f'{row.needs_data} as ArrayRecord (README, "Datasets")')
  import jax
  if jax.default_backend() == 'cpu' and not allow_cpu:
    needs.append('an accelerator (hundreds of thousands of steps; --allow-cpu forces a CPU run)')
  return ('needs ' + ' and '.join(needs)) if needs else ''


def run(r: Run, log, extra=(), collect_only: bool = False) -> dict | None:
  """Trains (or resumes / re-reads) one run; returns its result.json (`collect_only`: None if not finished)."""
  path = os.path.join(r.workdir, 'result.json')
  if not os.path.exists(path) and collect_only:
    return None
  if not os.path.exists(path):
    cmd = [sys.executable, '-m', 'ttq_jax.main', '--config', r.config, '--workdir', r.workdir, *extra]
    if r.init_from:
      cmd.append(f'--config.init_from={r.init_from}')
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    log.write(p.stdout + p.stderr)
    if p.returncode:
      raise RuntimeError(f'{r.row}: training failed: {(p.stderr.strip().splitlines() or ["?"])[-1]}')
  with open(path) as f:
    return json.load(f)


def _mean_std(values) -> str:
  v = 100 * np.asarray(values, np.float64)
  return f'{v.mean():.2f} +- {v.std(ddof=1):.2f}' if len(v) > 1 else f'{v.mean():.2f}'


def _scale_range(result: dict) -> str:
  scales = [s for pair in (result.get('scales') or {}).values() for s in pair]
  return f'{min(scales):.2f} - {max(scales):.2f}' if scales else '-'


def fashion_mnist_table(results: dict[str, list[dict]], seeds) -> str:
  lines = ['| row | seeds | test top-1 (%), chosen on validation, running BN | same, re-estimated BN | '
           'final test top-1 (%), re-estimated BN | validation top-1 (%), best, running BN | mean sparsity | '
           'w_p / w_n range |', '|---|---|---|---|---|---|---|---|']
  for row, rs in results.items():
    if not rs:
      lines.append(f'| {row} | 0 | not run | - | - | - | - | - |')
      continue
    chosen = lambda col: [r['best_on_validation'][col]['top1_accuracy'] for r in rs if col in r.get('best_on_validation', {})]
    final = [r['test'].get('reestimated', r['test']['running'])['top1_accuracy'] for r in rs]
    val = [r['protocol']['running']['best'] for r in rs]
    sp = [np.mean(list(r['sparsity'].values())) for r in rs if r.get('sparsity')]
    lines.append(f'| {row} | {len(rs)} | {_mean_std(chosen("running"))} | {_mean_std(chosen("reestimated"))} | '
                 f'{_mean_std(final)} | {_mean_std(val)} | {f"{np.mean(sp):.3f}" if sp else "-"} | '
                 f'{_scale_range(rs[0])} (seed {seeds[0]}) |')
  return '\n'.join(lines)


# paired comparisons of the seeds table: every row against FP, and between methods
SEEDS_PAIRS = (('TTQ, our recipe (quickstart)', 'TWN'), ('TTQ, our recipe (quickstart)', 'BitNet b1.58 weights (absmean)'),
               ('BitNet b1.58 weights (absmean)', 'TWN'), ('TTQ, our recipe (quickstart)', 'TTQ, paper recipe'))


def seeds_tests(results: dict[str, list[dict]], seeds) -> list[dict]:
  """Paired same-seed differences (points of test top-1 chosen on validation, running BN; the runs of a row are in
  `seeds` order) with a two-sided paired t and Holm over all of them (`ttq_jax.statistics`)."""
  from ttq_jax import statistics
  top1 = {row: {s: 100 * r['best_on_validation']['running']['top1_accuracy'] for s, r in zip(seeds, rs)}
          for row, rs in results.items() if rs}
  pairs = [(row, 'FP') for row in top1 if row != 'FP' and 'FP' in top1] + [p for p in SEEDS_PAIRS if p[0] in top1 and p[1] in top1]
  return statistics.holm_adjusted([statistics.paired(top1[a], top1[b], a, b) for a, b in pairs])


def seeds_tests_table(tests: list[dict]) -> str:
  from ttq_jax import statistics
  lines = [f'Paired same-seed differences a - b (points of test top-1, running BN; two-sided paired t, Holm over these '
           f'{len(tests)} tests; "resolved" at adjusted p < 0.05):', '', '| a - b | difference | verdict |', '|---|---|---|']
  for t in tests:
    lines.append(f'| {t["a"]} - {t["b"]} | {statistics.describe(t, 2)} | {statistics.verdict(t)} |')
  return '\n'.join(lines)


def paper_table(results: dict[str, dict], missing: dict[str, str]) -> str:
  lines = ['| row | final / best / mean of last 5 test error (%), running BN | same, re-estimated BN | '
           'paper error (%) |', '|---|---|---|---|']
  for row in paper_rows.PAPER_ROWS:
    if row.name not in results:
      lines.append(f'| {row.name} | not run: {missing.get(row.name, "?")} | - | {row.paper_error} |')
      continue
    cells = []
    for col in ('running', 'reestimated'):
      p = results[row.name].get('protocol', {}).get(col)
      cells.append(f'{100 * (1 - p["final"]):.2f} / {100 * (1 - p["best"]):.2f} / {100 * (1 - p["mean_last5"]):.2f}'
                   if p else '-')
    lines.append(f'| {row.name} | {cells[0]} | {cells[1]} | {row.paper_error} |')
  return '\n'.join(lines)


def describe(args) -> None:
  described = [paper_rows.describe_row(row) for row in paper_rows.PAPER_ROWS]
  for d in described:
    print(f'{d["name"]} ({d["config"]}): batch {d["global_batch_size"]}, {d["total_steps"]:,} steps, lr '
          f'{d["base_learning_rate"]:g} -> {d["lr_values"]} at {d["lr_boundaries_steps"]}, '
          f'{d["weight_optimizer"]["name"]}, {len(d["ternary_layers"])} ternary kernels, warm start {d["warm_start"]}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'rows': described}, f, indent=2)
    print(f'wrote {args.json}')
  if args.markdown:
    with open(args.markdown, 'w') as f:
      f.write(recipes.markdown(described, paper_rows.PAPER_ROWS) + '\n')
    print(f'wrote {args.markdown}')


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--table', choices=['fashion_mnist', 'fashion_mnist_protocol', 'lm', 'lm_study', 'paper'],
                 default='fashion_mnist')
  p.add_argument('--budget', choices=['tiny', 'cpu', 'gpu'], default='cpu',
                 help='fashion_mnist_protocol: steps of the FP checkpoint and of the fine-tunes (configs/fashion_mnist_protocol.py); '
                 'lm, lm_study: model size and steps (experiments/lm_table.py, experiments/lm_study.py)')
  p.add_argument('--parallel', type=int, default=1, help='fashion_mnist_protocol: runs at once (processes); 0: one after another in '
                 'this process')
  p.add_argument('--seeds', default='0,1,2', help='fashion_mnist: comma-separated config.seed values')
  p.add_argument('--describe', action='store_true', help='paper: print each row\'s effective recipe, run nothing')
  p.add_argument('--json', default='', help='--describe: write {"rows": [...]} here')
  p.add_argument('--markdown', default='', help='--describe: write the side-by-side recipes (docs/recipes.md)')
  p.add_argument('--workdir_root', default='workdirs/reproduce')
  p.add_argument('--results', default='', help='markdown output (default experiments/results/<table>_seeds.md|paper.md); '
                 'fashion_mnist_protocol: the JSON (default experiments/results/fashion_mnist_protocol[_gpu].json for '
                 'the cpu [gpu] budget, the workdir for tiny)')
  p.add_argument('--allow-cpu', action='store_true')
  p.add_argument('--only', default='', help='comma-separated substrings: run only matching rows (fashion_mnist: the '
                 'other rows keep their runs from the results JSON; lm: row keys of experiments/lm_table.py ROWS)')
  p.add_argument('--collect-only', action='store_true', help='fashion_mnist: table of the finished runs, train nothing')
  args = p.parse_args()
  if args.describe:
    return describe(args)
  if args.table == 'fashion_mnist_protocol':
    if args.parallel < 0:
      p.error(f'--parallel={args.parallel} must be >= 0 (0: the runs in this process, one after another)')
    import protocol  # experiments/protocol.py
    protocol.main(args)
    return
  if args.table == 'lm_study':
    import lm_study  # experiments/lm_study.py
    lm_study.main(args)
    return
  if args.table == 'lm':
    import lm_table  # experiments/lm_table.py
    lm_table.main(args)
    return
  root = os.path.join(args.workdir_root, args.table)
  os.makedirs(root, exist_ok=True)
  wanted = lambda name: not args.only or any(s in name for s in args.only.split(','))
  import jax
  with open(os.path.join(root, 'reproduce.log'), 'a') as log:
    if args.table == 'fashion_mnist':
      seeds = [int(s) for s in args.seeds.split(',')]
      out = args.results or os.path.join(ROOT, 'experiments', 'results', 'fashion_mnist_seeds.md')
      # rows left out by --only keep their runs from the results file (each run's result.json is kept whole)
      previous = {}
      if args.only and os.path.exists(out.replace('.md', '.json')):
        with open(out.replace('.md', '.json')) as f:
          previous = json.load(f)
      results = {}
      for row, (slug, config) in FASHION_MNIST_ROWS.items():
        results[row] = [] if wanted(row) else previous.get(row, [])
        for seed in seeds if wanted(row) else []:
          r = Run(row, config, os.path.join(root, slug, f'seed_{seed}'))
          if not args.collect_only:
            print(f'[run ] {row}, seed {seed}, in {r.workdir}', flush=True)
          try:
            result = run(r, log, (f'--config.seed={seed}',), args.collect_only)
            results[row] += [result] if result else []
          except RuntimeError as e:
            print(f'[fail] {e}', flush=True)
      body = fashion_mnist_table(results, seeds) + '\n\n' + seeds_tests_table(seeds_tests(results, seeds))
      command = f'--table fashion_mnist --seeds {args.seeds}' + (f' --only {args.only}' if args.only else '')
    else:
      results, missing, workdirs = {}, {}, {}
      for row in paper_rows.PAPER_ROWS:
        need = 'skipped (--only)' if not wanted(row.name) else missing_requirements(row, args.allow_cpu)
        init_from = workdirs.get(row.init_from_row, '')
        if not need and row.init_from_row and not init_from:
          need = f'needs the row "{row.init_from_row}" first'
        if need:
          missing[row.name] = need
          print(f'[skip] {row.name}: {need}', flush=True)
          continue
        r = Run(row.name, row.config, os.path.join(root, _slug(row.name)), init_from)
        try:
          results[row.name] = run(r, log)
          workdirs[row.name] = r.workdir
        except RuntimeError as e:
          missing[row.name] = str(e)
          print(f'[fail] {e}', flush=True)
      body = paper_table(results, missing)
      out = args.results or os.path.join(ROOT, 'experiments', 'results', 'paper.md')
      command = '--table paper'
  kept = ' The rows `--only` left out keep their runs from the results JSON (measured earlier by the same command ' \
         'without `--only`).' if args.only and args.table == 'fashion_mnist' else ''
  text = (f'# {args.table} results\n\nMeasured by `python experiments/reproduce.py {command}` on {os.cpu_count()} '
          f'CPU cores ({jax.default_backend()}, jax {jax.__version__}).{kept}\n\n{body}\n')
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, 'w') as f:
    f.write(text)
  with open(out.replace('.md', '.json'), 'w') as f:  # the runs by row, and how the file was made
    from ttq_jax import provenance
    json.dump({**results, 'provenance': {**provenance.record(ROOT), 'configs': {
        row: FASHION_MNIST_ROWS[row][1] for row in results if row in FASHION_MNIST_ROWS}}}, f, indent=2)
  print(text)
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
