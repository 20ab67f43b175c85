r"""The LM fine-tuning study (`reproduce.py --table lm_study`): per seed one full-precision byte-level decoder, then
from its final checkpoint every method fine-tuned on the same data, schedule shape and budget.

    python experiments/reproduce.py --table lm_study --seeds 0,1,2 [--budget tiny|cpu|gpu]

1. Per seed, `configs/lm.py:fp` for N steps (`fp_base`).
2. Learning rate per family (fp continued, ttq, paretoq, bitnet, twn; ttq_channel takes ttq's), chosen for
   fine-tuning on validation: seed 0, fine-tunes of `lr_steps` from seed 0's FP run, grid {1e-3, 3e-3, 1e-2}; a
   best at an edge extends the grid by one step of 1-3-10 that way, at most twice (budget cpu). The gpu budget
   makes no choice (each family takes configs/lm.py's rate); tiny chooses for ttq from two rates.
3. The rows, each for M steps from the FP run of its seed (`init_from`; every run records the SHA-256 of the
   parameters it loaded, and `init_shared` checks that a seed's rows loaded the same): `fp` (continued), `ttq`,
   `paretoq`, `bitnet`, `twn`, each at its paper's granularity (TTQ, TWN, BitNet per tensor; ParetoQ per output
   channel), and `ttq_channel` (TTQ per channel) so that granularity and method are not confounded. Each
   fine-tune's data stream starts at its own step 0 (as `init_from` does); warm-up 10%, cosine, >= 5 validation
   evaluations a run.
4. Reported (experiments/results/lm_study.{json,md,png}; README "Fine-tuning study"): test bits per byte of the model
   chosen on validation per seed and mean +- SE; paired same-seed differences (two-sided paired t, Holm over the
   table's comparisons: every method against fp, and ttq-paretoq, ttq-bitnet, paretoq-bitnet, ttq-ttq_channel);
   flip-rate and near-threshold curves and scale trajectories per row (seed 0, mean over layers); samples.

Runs go one after another in this process (`train.train_and_evaluate`), each in ROOT/lm_study/<budget>/...;
re-running resumes an unfinished run and re-reads finished ones, and the JSON is rewritten after every run
(`complete: false` until the last), so the study may be stopped and continued. Regenerating the table from
finished runs changes no recorded figure (`wall_minutes` is the sum of the runs' own wall times).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np

import lm_table  # experiments/lm_table.py (reproduce.py puts experiments/ on the path)
from ttq_jax import provenance
from ttq_jax import statistics
from ttq_jax import tables

ROOT = lm_table.ROOT
RESULTS = os.path.join(ROOT, 'experiments', 'results', 'lm_study.json')
README_NAME = 'lm_study'  # README.md shows markdown(RESULTS) between its markers (ttq_jax.tables)
README_START, README_END = tables.markers(README_NAME)
LADDER = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # the grid's steps of ~3


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  variant: str          # of configs/lm.py
  family: str           # whose learning rate it takes
  granularity: str      # quant.scale_granularity


ROWS = {
    'fp': Row('FP, continued', 'fp', 'fp', 'tensor'),
    'ttq': Row('TTQ', 'ttq', 'ttq', 'tensor'),
    'paretoq': Row('ParetoQ', 'paretoq', 'paretoq', 'channel'),
    'bitnet': Row('BitNet b1.58', 'bitnet', 'bitnet', 'tensor'),
    'twn': Row('TWN', 'twn', 'twn', 'tensor'),
    'ttq_channel': Row('TTQ, per-channel scales', 'ttq', 'ttq', 'channel'),
}
FAMILIES = ('fp', 'ttq', 'paretoq', 'bitnet', 'twn')
PAIRS = (('ttq', 'paretoq'), ('ttq', 'bitnet'), ('paretoq', 'bitnet'), ('ttq', 'ttq_channel'))


@dataclasses.dataclass(frozen=True)
class Budget:
  fp_steps: int                      # N: the full-precision run of each seed
  finetune_steps: int                # M: every row
  lr_steps: int                      # the learning-rate choice's fine-tunes
  grid: dict                         # family -> starting grid (a family not here takes configs/lm.py's rate)
  extend: int                        # how often a best at an edge may extend the grid
  evals: int = 5                     # validation evaluations a run


GRID = (1e-3, 3e-3, 1e-2)
BUDGETS = {
    # the suite's end-to-end check: the smoke model, a few steps, one family's two-point choice
    'tiny': Budget(fp_steps=6, finetune_steps=4, lr_steps=2, grid={'ttq': (3e-3, 1e-2)}, extend=0, evals=2),
    # 5x the committed FP run (200 steps), 2.5x its fine-tunes
    'cpu': Budget(fp_steps=1000, finetune_steps=500, lr_steps=200, grid={f: GRID for f in FAMILIES}, extend=2),
    # one H200 in 5 minutes (experiments/gpu_check.sh lm_study): lm_table's gpu model; sized by the rule there
    'gpu': Budget(fp_steps=600, finetune_steps=300, lr_steps=0, grid={}, extend=0),
}


def run_config(variant: str, budget: str, steps: int, evals: int, *, seed: int, learning_rate: float | None = None,
               granularity: str = 'tensor', init_from: str = '', data_dir: str = ''):
  """configs/lm.py:<variant> at the budget's model size, for `steps` with `evals` validation evaluations."""
  config = lm_table.budget_config(variant, budget)
  config.seed = seed
  config.num_train_steps, config.warmup_steps = steps, max(1, steps // 10)
  config.eval_every_steps = config.checkpoint_every_steps = max(1, steps // evals)
  config.log_every_steps = max(1, min(config.log_every_steps, steps // (2 * evals) or 1))
  if learning_rate is not None:
    config.learning_rate = learning_rate
  if config.quant.method != 'fp':
    config.quant.scale_granularity = granularity
  config.init_from = init_from
  if data_dir:
    config.data.data_dir = data_dir
  return config


class Study:
  """The runs of one study, run or re-read in order, with what each took."""

  def __init__(self, budget: str, seeds: list[int], workdir_root: str, data_dir: str = '', log=print):
    self.budget, self.seeds, self.spec, self.log, self.data_dir = budget, seeds, BUDGETS[budget], log, data_dir
    self.root = os.path.join(workdir_root, 'lm_study', budget)
    self.records: dict[str, dict] = {}  # run key -> record

  def run(self, key: str, config, workdir: str) -> dict:
    """Trains (or resumes, or re-reads) one run; its record (result.json fields the table reads, config, wall)."""
    result = tables.run_or_reuse(workdir, config=config, log=self.log,
                                 label=f'{key}: lr {config.learning_rate:g}, {config.num_train_steps} steps')
    chosen = result['best_on_validation']['running']
    record = {'key': key, 'seed': config.seed, 'workdir': workdir, 'learning_rate': config.learning_rate,
              'test_bits_per_byte': chosen['bits_per_byte'],
              'validation_bits_per_byte': chosen['validation_bits_per_byte'], 'chosen_step': chosen['step'],
              'final_test_bits_per_byte': result['bits_per_byte'], 'step': result['step'],
              'evaluations': len([r for r in _metrics(workdir) if 'eval_bits_per_byte' in r]),
              'wall_s': result['elapsed_s'], 'corpus_sha256': (result.get('dataset') or {}).get('corpus_sha256'),
              'init_params_sha256': (result.get('init_from') or {}).get('params_sha256'),
              'mean_sparsity': float(np.mean(list(result['sparsity'].values()))) if result.get('sparsity') else None,
              'samples': result.get('samples'), **provenance.config_record(config)}
    self.records[key] = record
    return record

  def fp_base(self, seed: int) -> dict:
    config = run_config('fp', self.budget, self.spec.fp_steps, self.spec.evals, seed=seed, data_dir=self.data_dir)
    return self.run(f'fp_base/seed_{seed}', config, os.path.join(self.root, 'fp_base', f'seed_{seed}'))

  def finetune(self, key: str, row: Row, seed: int, learning_rate: float | None, steps: int) -> dict:
    config = run_config(row.variant, self.budget, steps, self.spec.evals, seed=seed, learning_rate=learning_rate,
                        granularity=row.granularity, init_from=self.fp_base(seed)['workdir'], data_dir=self.data_dir)
    return self.run(key, config, os.path.join(self.root, key))

  def choose_learning_rates(self) -> dict:
    """{family: {'validation_bits_per_byte': {lr: value}, 'chosen': lr}}; families without a grid: configs/lm.py's."""
    choice = {}
    for family in FAMILIES:
      row = next(r for r in ROWS.values() if r.family == family and r.variant == family)
      grid = list(self.spec.grid.get(family, ()))
      if not grid:
        choice[family] = {'validation_bits_per_byte': {}, 'chosen': lm_table.budget_config(row.variant, self.budget).learning_rate}
        continue
      scores, extended = {}, 0
      while True:
        for lr in grid:
          if f'{lr:g}' not in scores:
            record = self.finetune(f'lr_choice/{family}/lr_{lr:g}', row, self.seeds[0], lr, self.spec.lr_steps)
            scores[f'{lr:g}'] = record['validation_bits_per_byte']
        best = min(grid, key=lambda lr: scores[f'{lr:g}'])
        edge = LADDER.index(best) + (1 if best == max(grid) else -1) if best in (min(grid), max(grid)) else None
        if edge is None or extended >= self.spec.extend or not 0 <= edge < len(LADDER):
          break
        grid, extended = sorted(grid + [LADDER[edge]]), extended + 1
        self.log(f'[lr  ] {family}: best {best:g} at the edge of the grid, adding {LADDER[edge]:g}')
      choice[family] = {'validation_bits_per_byte': scores, 'chosen': float(best), 'extended': extended}
    return choice


def run_study(*, budget: str, seeds: list[int], workdir_root: str = 'workdirs/reproduce', results: str = '',
              data_dir: str = '', log=print) -> dict:
  """Runs (or re-reads) the study; writes JSON, markdown and plot after every row; returns the JSON."""
  study = Study(budget, seeds, workdir_root, data_dir, log)
  path = results or (os.path.join(study.root, 'lm_study.json') if budget == 'tiny' else RESULTS)
  started = time.perf_counter()
  prov = provenance.record(ROOT)

  def write(lr_choice, rows, complete: bool) -> dict:
    out = summarize(study, lr_choice, rows, complete, prov)
    out['invocation_wall_minutes'] = (time.perf_counter() - started) / 60  # this invocation only (resumes re-read)
    tables.write_results(path, out, markdown(out))
    return out

  study.fp_base(seeds[0])
  lr_choice = study.choose_learning_rates()
  rows: dict[str, list[dict]] = {k: [] for k in ROWS}
  write(lr_choice, rows, complete=False)  # the choice, before the first row
  for seed in seeds:
    study.fp_base(seed)
    for key, row in ROWS.items():
      rows[key].append(study.finetune(f'{key}/seed_{seed}', row, seed, lr_choice[row.family]['chosen'],
                                      study.spec.finetune_steps))
      write(lr_choice, rows, complete=False)
  out = write(lr_choice, rows, complete=True)
  plot(out, path.replace('.json', '.png'))
  log(markdown(out))
  log(f'wrote {path}')
  return out


def _metrics(workdir: str) -> list[dict]:
  from ttq_jax import reports
  path = os.path.join(workdir, 'metrics.jsonl')
  return reports.read_metrics(path) if os.path.exists(path) else []


def curves(workdir: str) -> dict[str, list]:
  """{'step', 'flip_rate', 'near_threshold', 'w_p', 'w_n'}: the mean over ternary layers on each logged step of a
  run's metrics.jsonl (flip_rate None on a step that has none: the first logged step after a start)."""
  out = {k: [] for k in ('step', 'flip_rate', 'near_threshold', 'w_p', 'w_n')}
  for row in _metrics(workdir):
    near = [v for k, v in row.items() if k.startswith('near_threshold/')]
    if not near:
      continue
    out['step'].append(row['step'])
    out['near_threshold'].append(float(np.mean(near)))
    flips = [v for k, v in row.items() if k.startswith('flip_rate/')]
    out['flip_rate'].append(float(np.mean(flips)) if flips else None)
    for which in ('w_p', 'w_n'):
      out[which].append(float(np.mean([v for k, v in row.items() if k.startswith(which + '/')])))
  return out


def summarize(study: Study, lr_choice: dict, rows: dict[str, list[dict]], complete: bool, prov: dict) -> dict:
  strip = lambda r: {k: v for k, v in r.items() if k not in ('samples', 'config')}
  table = {}
  for key, rs in rows.items():
    if not rs:
      continue
    row = ROWS[key]
    table[key] = {'name': row.name, 'method': lm_table.budget_config(row.variant, study.budget).quant.method,
                  'granularity': row.granularity if row.variant != 'fp' else None, 'family': row.family,
                  'learning_rate': rs[0]['learning_rate'],
                  'test_bits_per_byte': statistics.mean_se([r['test_bits_per_byte'] for r in rs]),
                  'mean_sparsity': rs[0]['mean_sparsity'], 'per_seed': [strip(r) for r in rs]}
  by_seed = {k: {r['seed']: r['test_bits_per_byte'] for r in rs} for k, rs in rows.items()}
  paired = tables.paired_tests(by_seed, [(k, 'fp') for k in ROWS if k != 'fp'] + list(PAIRS))
  init_shared = {}
  for seed in study.seeds:
    digests = {r['init_params_sha256'] for rs in rows.values() for r in rs if r['seed'] == seed}
    if digests:
      init_shared[str(seed)] = len(digests) == 1 and None not in digests
  runs = list(study.records.values())
  first = {k: rs[0] for k, rs in rows.items() if rs}
  return {
      'table': 'lm_study', 'budget': study.budget, 'complete': complete, 'seeds': study.seeds,
      'steps': {'fp': study.spec.fp_steps, 'finetune': study.spec.finetune_steps, 'lr_choice': study.spec.lr_steps},
      'commit': prov['commit'], 'clean': prov['clean'], 'command': prov['command'], 'machine': prov['machine'],
      'wall_minutes': sum(r['wall_s'] for r in runs) / 60,  # every run's own wall time: FP, choice, rows
      'lr_choice': lr_choice, 'fp_base': [strip(r) for k, r in study.records.items() if k.startswith('fp_base/')],
      'rows': table, 'paired': paired, 'init_shared': init_shared,
      'corpus_sha256': sorted({r['corpus_sha256'] for r in runs if r['corpus_sha256']}),
      'dynamics_seed_0': {k: curves(r['workdir']) for k, r in first.items() if k != 'fp'},
      'samples_seed_0': {k: r['samples'] for k, r in first.items()},
      'configs': {r['key']: r['config'] for r in runs},
      'lr_choice_runs': [strip(r) for k, r in study.records.items() if k.startswith('lr_choice/')],
  }


def markdown(out: dict) -> str:
  steps = out['steps']
  lines = [f'Budget `{out["budget"]}`: per seed a full-precision decoder trained {steps["fp"]} steps, then every row '
           f'fine-tuned {steps["finetune"]} steps from it; seeds {",".join(map(str, out["seeds"]))}; test bits per byte '
           '(lower is better) of the model chosen on validation, mean ± SE over seeds.'
           + ('' if out['complete'] else ' **Incomplete: the runs that finished so far.**'), '',
           '| row | scales | seeds | lr | test bits/byte | per seed | mean sparsity (seed 0) |', '|---|---|---|---|---|---|---|']
  for key, r in out['rows'].items():
    value = statistics.mean_spread(r['test_bits_per_byte'], 3)
    per_seed = ', '.join(f'{p["test_bits_per_byte"]:.3f}' for p in r['per_seed'])
    sparsity = f'{r["mean_sparsity"]:.3f}' if r['mean_sparsity'] is not None else '-'
    lines.append(f'| {r["name"]} | {r["granularity"] or "-"} | {len(r["per_seed"])} | {r["learning_rate"]:g} | {value} | '
                 f'{per_seed} | {sparsity} |')
  if out['paired']:
    lines += ['', 'Paired same-seed differences a - b of test bits/byte (two-sided paired t, Holm-adjusted over these '
              f'{len(out["paired"])} comparisons; "resolved" at adjusted p < 0.05):', '',
              '| a - b | difference ± SE | n | t | p | Holm p | verdict |', '|---|---|---|---|---|---|---|']
    for p in out['paired']:
      fmt = lambda x, spec: '-' if x is None else format(x, spec)
      lines.append(f'| {p["a"]} - {p["b"]} | {statistics.mean_spread(p, 3, signed=True)} | {p["n"]} | {fmt(p["t"], ".2f")} | {fmt(p["p"], ".3g")} | {fmt(p.get("p_holm"), ".3g")} | '
                   f'{statistics.verdict(p)} |')
  if out['lr_choice']:
    lines += ['', f'Learning rate chosen for fine-tuning on validation (seed {out["seeds"][0]}, {steps["lr_choice"]}-step '
              "fine-tunes; a family without values takes configs/lm.py's rate): " + '; '.join(
                  f'{fam}: ' + (', '.join(f'{lr} -> {v:.3f}' for lr, v in c['validation_bits_per_byte'].items()) or 'none')
                  + f' (chose {c["chosen"]:g})' for fam, c in out['lr_choice'].items())]
  shared = out['init_shared']
  same = 'no fine-tune yet' if not shared else 'yes' if all(shared.values()) else 'NO: ' + json.dumps(shared)
  lines += ['', f'Every row of a seed started from the same parameters (SHA-256 of what init_from loaded): '
            f'{same}; every run read the corpus with '
            f'sha256 {", ".join(s[:16] + "..." for s in out["corpus_sha256"])}. Runs\' own wall times summed: '
            f'{out["wall_minutes"]:.0f} minutes.']
  return '\n'.join(lines)


def plot(out: dict, path: str) -> None:
  """Flip rate, near-threshold share and scales per row (seed 0, mean over layers) against the fine-tune's step."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  for key, c in out['dynamics_seed_0'].items():
    name = out['rows'][key]['name']
    steps = [s for s, f in zip(c['step'], c['flip_rate']) if f is not None]
    axes[0].plot(steps, [f for f in c['flip_rate'] if f is not None], label=name)
    axes[1].plot(c['step'], c['near_threshold'], label=name)
    line, = axes[2].plot(c['step'], c['w_p'], label=name)
    axes[2].plot(c['step'], c['w_n'], ls='--', color=line.get_color())
  axes[0].set(xlabel='fine-tune step', ylabel='codes changed since the previous log', title='Flip rate', yscale='log')
  axes[1].set(xlabel='fine-tune step', ylabel='share of weights within 10% of delta', title='Near the threshold')
  axes[2].set(xlabel='fine-tune step', ylabel='scale (mean over layers)', title='W_p (solid), W_n (dashed)')
  for ax in axes:
    ax.legend(fontsize=7)
  fig.suptitle(f'LM fine-tuning study, seed 0, budget {out["budget"]}')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def readme_block(readme: str) -> str:
  """The generated table as it stands in README.md (between the markers)."""
  return tables.readme_block(readme, README_NAME)


def main(args) -> None:
  seeds = [int(s) for s in args.seeds.split(',')]
  run_study(budget=args.budget, seeds=seeds, workdir_root=args.workdir_root, results=args.results)
