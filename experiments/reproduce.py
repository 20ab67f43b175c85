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
import sys

import numpy as np

import lm_study  # experiments/*.py: the script's folder is on the path
import lm_table
import protocol
from configs import paper_rows
from ttq_jax import provenance
from ttq_jax import recipes
from ttq_jax import statistics
from ttq_jax import tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def run(r: Run, extra=(), collect_only: bool = False) -> dict | None:
  """Trains (or resumes / re-reads) one run as `python -m ttq_jax.main`; its result.json (`collect_only`: None if
  not finished). The run's output goes to its workdir's run.log."""
  cmd = [sys.executable, '-m', 'ttq_jax.main', '--config', r.config, '--workdir', r.workdir, *extra]
  cmd += [f'--config.init_from={r.init_from}'] if r.init_from else []
  return tables.run_or_reuse(r.workdir, command=cmd, cwd=ROOT, collect_only=collect_only, label=r.row,
                             log=lambda m: print(m, flush=True))


def _scale_range(result: dict) -> str:
  scales = [s for pair in (result.get('scales') or {}).values() for s in pair]
  return f'{min(scales):.2f} - {max(scales):.2f}' if scales else '-'


def _pct(values) -> str:
  return statistics.mean_spread(values, 2, scale=100)


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
    lines.append(f'| {row} | {len(rs)} | {_pct(chosen("running"))} | {_pct(chosen("reestimated"))} | '
                 f'{_pct(final)} | {_pct(val)} | {f"{np.mean(sp):.3f}" if sp else "-"} | '
                 f'{_scale_range(rs[0])} (seed {seeds[0]}) |')
  return '\n'.join(lines)


# paired comparisons of the seeds table: every row against FP, and between methods
SEEDS_PAIRS = (('TTQ, our recipe (quickstart)', 'TWN'), ('TTQ, our recipe (quickstart)', 'BitNet b1.58 weights (absmean)'),
               ('BitNet b1.58 weights (absmean)', 'TWN'), ('TTQ, our recipe (quickstart)', 'TTQ, paper recipe'))


def seeds_tests(results: dict[str, list[dict]], seeds) -> list[dict]:
  """Paired same-seed differences (points of test top-1 chosen on validation, running BN; the runs of a row are in
  `seeds` order) with a two-sided paired t and Holm over all of them (`ttq_jax.statistics`)."""
  top1 = {row: {s: 100 * r['best_on_validation']['running']['top1_accuracy'] for s, r in zip(seeds, rs)}
          for row, rs in results.items() if rs}
  return tables.paired_tests(top1, [(row, 'FP') for row in top1 if row != 'FP'] + list(SEEDS_PAIRS))


def seeds_tests_table(tests: list[dict]) -> str:
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


def fashion_mnist(args) -> None:
  """--table fashion_mnist: every row of FASHION_MNIST_ROWS on --seeds, the table and its paired tests."""
  root = os.path.join(args.workdir_root, args.table)
  wanted = lambda name: not args.only or any(s in name for s in args.only.split(','))
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
      try:
        result = run(Run(f'{row}, seed {seed}', config, r.workdir), (f'--config.seed={seed}',), args.collect_only)
        results[row] += [result] if result else []
      except RuntimeError as e:
        print(f'[fail] {e}', flush=True)
  body = fashion_mnist_table(results, seeds) + '\n\n' + seeds_tests_table(seeds_tests(results, seeds))
  command = f'--table fashion_mnist --seeds {args.seeds}' + (f' --only {args.only}' if args.only else '')
  _write(args, body, out, command, results)


def paper(args) -> None:
  """--table paper: the paper's rows whose data and accelerator this host has; the others say what they need."""
  root = os.path.join(args.workdir_root, args.table)
  wanted = lambda name: not args.only or any(s in name for s in args.only.split(','))
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
      results[row.name] = run(r)
      workdirs[row.name] = r.workdir
    except RuntimeError as e:
      missing[row.name] = str(e)
      print(f'[fail] {e}', flush=True)
  body = paper_table(results, missing)
  out = args.results or os.path.join(ROOT, 'experiments', 'results', 'paper.md')
  command = '--table paper'
  _write(args, body, out, command, results)


def _write(args, body: str, out: str, command: str, results: dict) -> None:
  """The table's markdown (`out`) and the JSON beside it: the runs by row, and how the file was made."""
  import jax
  kept = ' The rows `--only` left out keep their runs from the results JSON (measured earlier by the same command ' \
         'without `--only`).' if args.only and args.table == 'fashion_mnist' else ''
  text = (f'# {args.table} results\n\nMeasured by `python experiments/reproduce.py {command}` on {os.cpu_count()} '
          f'CPU cores ({jax.default_backend()}, jax {jax.__version__}).{kept}\n\n{body}\n')
  tables.write_results(os.path.splitext(out)[0] + '.json', {**results, 'provenance': {**provenance.record(ROOT), 'configs': {
      row: FASHION_MNIST_ROWS[row][1] for row in results if row in FASHION_MNIST_ROWS}}}, text, indent=2)
  print(text)
  print(f'wrote {out}')


# --table -> what makes it
TABLES = {'fashion_mnist': fashion_mnist, 'fashion_mnist_protocol': protocol.main, 'lm': lm_table.main,
          'lm_study': lm_study.main, 'paper': paper}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--table', choices=list(TABLES),
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
  if args.parallel < 0:
    p.error(f'--parallel={args.parallel} must be >= 0 (0: the runs in this process, one after another)')
  TABLES[args.table](args)


if __name__ == '__main__':
  main()
