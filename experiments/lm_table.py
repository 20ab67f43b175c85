r"""Ternary language models (`reproduce.py --table lm`): FP, TTQ and BitNet b1.58 over seeds, TWN and the 8-bit
activation rows on one seed, all from scratch at one budget, and TTQ / BitNet fine-tuned from the FP run of the
same seed; the learning rate of each family chosen first on validation.

    python experiments/reproduce.py --table lm --seeds 0,1,2 [--budget tiny|cpu|gpu] [--only fp,ttq,...]

1. Learning rate: FP, TTQ and BitNet each train at every rate of `LEARNING_RATES` on seed 0 at half the
   budget; the rate with the lowest validation bits per byte (the model chosen on validation) is the family's.
   TWN and TTQ A8 take TTQ's rate, BitNet A8 BitNet's, the fine-tunes their method's. The gpu budget makes no
   choice (its 6 minutes have no room): each family takes configs/lm.py's rate, the CPU table's choice.
2. The table: every row of `ROWS` at the full budget, on `--seeds` (rows marked `first_seed` on the first seed
   only), each in its own workdir ROOT/<budget>/<row>/seed_<s> (re-running resumes an unfinished run and
   re-reads a finished one's result.json). Runs go one after another in this process (`train.train_and_
   evaluate`): no interpreter and JAX start-up per run.
3. Reported (experiments/results/lm.json and lm.md; README "Ternary language models"): test bits per byte of
   the model chosen on validation, mean +- std over seeds; the paired same-seed difference to FP +- its
   standard error; final-model test bits per byte; mean sparsity; TTQ's scale trajectories per layer (seed
   0, from metrics.jsonl); greedy and temperature-0.8 samples (seed 0); the corpus digest and package
   version; each run's wall time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np

from ttq_jax import provenance
from ttq_jax import statistics
from ttq_jax import tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, 'experiments', 'results', 'lm.json')
GPU_RESULTS = os.path.join(ROOT, 'experiments', 'results', 'lm_gpu.json')
# None: no choice, each family's rate of configs/lm.py (the CPU table's choice): the GPU part's 6 minutes have no room
LEARNING_RATES = {'tiny': (3e-3, 1e-2), 'cpu': (1e-3, 3e-3, 1e-2), 'gpu': None}
FAMILIES = ('fp', 'ttq', 'bitnet', 'paretoq')  # the rows whose learning rate is chosen; the others take their family's
# paired a - b beyond each row's minus FP; every comparison of the table is Holm-adjusted together
PAIRS = (('ttq', 'bitnet'), ('ttq_ft', 'bitnet_ft'), ('ttq', 'twn'), ('ttq', 'paretoq'), ('paretoq', 'bitnet'))
README_NAME = 'lm'  # README.md shows markdown(RESULTS) between its markers (ttq_jax.tables)
README_START, README_END = tables.markers(README_NAME)


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  variant: str          # of configs/lm.py
  family: str           # whose learning rate it takes
  first_seed: bool = False
  init_from: str = ''   # a row whose run of the same seed it fine-tunes


ROWS = {
    'fp': Row('FP', 'fp', 'fp'),
    'ttq': Row('TTQ', 'ttq', 'ttq'),
    'bitnet': Row('BitNet b1.58', 'bitnet', 'bitnet'),
    'paretoq': Row('ParetoQ (per-channel learned scale)', 'paretoq', 'paretoq'),
    'twn': Row('TWN', 'twn', 'ttq', first_seed=True),
    'bitnet_a8': Row('BitNet b1.58, 8-bit activations (W1.58A8)', 'bitnet_a8', 'bitnet', first_seed=True),
    'ttq_a8': Row('TTQ, 8-bit activations', 'ttq_a8', 'ttq', first_seed=True),
    'ttq_ft': Row('TTQ fine-tuned from FP', 'ttq', 'ttq', init_from='fp'),
    'bitnet_ft': Row('BitNet b1.58 fine-tuned from FP', 'bitnet', 'bitnet', init_from='fp'),
}


def budget_config(variant: str, budget: str):
  """configs/lm.py:<variant> at `budget`: tiny (the smoke model, a few steps: tests), cpu (the config's own:
  the committed table), gpu (a larger model and budget for one H200, experiments/gpu_check.sh lm)."""
  from configs import lm
  config = lm.get_config(variant)
  if budget == 'tiny':
    smoke = lm.get_config('smoke')
    for key in ('depth', 'width', 'num_heads', 'mlp_width'):
      config.model[key] = smoke.model[key]
    config.data.seq_len, config.batch_size, config.eval_batch_size = smoke.data.seq_len, 8, 64
    config.num_train_steps, config.warmup_steps = 8, 2
    config.eval_every_steps = config.checkpoint_every_steps = config.log_every_steps = 4
    config.mesh_shape = (1, 1)
  elif budget == 'gpu':  # ~10M parameters, 16k bytes a step (not yet measured on a GPU)
    config.model.depth, config.model.width, config.model.num_heads, config.model.mlp_width = 6, 384, 6, 1024
    config.data.seq_len, config.batch_size, config.eval_batch_size = 256, 64, 256
    config.num_train_steps, config.warmup_steps = 600, 60
    config.eval_every_steps = config.checkpoint_every_steps = 300
    config.log_every_steps = 50
  return config


def chosen_bpb(result: dict) -> float:
  """Test bits per byte of the model chosen on validation."""
  return result['best_on_validation']['running']['bits_per_byte']


def validation_bpb(result: dict) -> float:
  return result['best_on_validation']['running']['validation_bits_per_byte']


def _mean_std(values) -> dict:
  """{'mean', 'std', 'n'}: a row's spread over seeds, as the table shows it (`statistics.mean_spread`)."""
  return {k: v for k, v in statistics.mean_se(values).items() if k != 'se'}


def paired_tests(table: dict) -> tuple[dict, list[dict]]:
  """From the rows' per-seed chosen test bits per byte: ({row: its difference to FP}, [the PAIRS]), every test
  Holm-adjusted over all of them (`ttq_jax.statistics`). Only the per-seed values are read, so a table built from
  runs and one re-read from its JSON give the same tests."""
  by_seed = {k: {p['seed']: p['test_bits_per_byte_chosen_on_validation'] for p in r['per_seed']} for k, r in table.items()}
  tests = tables.paired_tests(by_seed, [(k, 'fp') for k in table if k != 'fp'] + list(PAIRS))
  minus_fp = {t['a']: t for t in tests if t['b'] == 'fp' and (t['a'], t['b']) not in PAIRS}
  return minus_fp, [t for t in tests if t['b'] != 'fp']


def scale_trajectories(workdir: str) -> dict[str, dict[str, list]]:
  """{layer: {'step': [...], 'w_p': [...], 'w_n': [...]}} from a TTQ run's metrics.jsonl."""
  from ttq_jax import reports
  out: dict[str, dict[str, list]] = {}
  for row in reports.read_metrics(os.path.join(workdir, 'metrics.jsonl')):
    for key, value in row.items():
      if key.startswith('w_p/') or key.startswith('w_n/'):
        which, layer = key.split('/', 1)
        entry = out.setdefault(layer, {'step': [], 'w_p': [], 'w_n': []})
        if not entry['step'] or entry['step'][-1] != row['step']:
          entry['step'].append(row['step'])
        entry[which].append(value)
  return out


def run_table(*, budget: str, seeds: list[int], only: tuple[str, ...] = (), workdir_root: str = 'workdirs/reproduce',
              results: str = '', log=print) -> dict:
  """Runs (or re-reads) the learning-rate choice and the table; writes the JSON and markdown; returns the JSON."""
  root = os.path.join(workdir_root, 'lm', budget)
  rows = {k: r for k, r in ROWS.items() if not only or k in only}
  path = results or (os.path.join(root, 'lm.json') if budget == 'tiny' else GPU_RESULTS if budget == 'gpu' else RESULTS)

  previous = None
  if only and os.path.exists(path):  # the rows --only leaves out keep their entries (and their runs' figures)
    with open(path) as f:
      previous = json.load(f)
  prov = provenance.record(ROOT)

  def write(runs, final: bool) -> dict:  # after every run: an interrupted table keeps what finished
    out = summarize(runs, lr_choice, budget, seeds, rows, previous)
    out['complete'] = final
    out['commit'], out['clean'], out['command'] = prov['commit'], prov['clean'], prov['command']
    out['invocation_wall_minutes'] = (time.perf_counter() - started) / 60  # this invocation (finished runs re-read)
    # every run's own wall time (elapsed_s), learning rates included; with --only, the earlier figure plus this one's
    out['run_minutes_total'] = sum(run_seconds) / 60 + ((previous or {}).get('run_minutes_total') or 0.0)
    out['wall_minutes'] = out['run_minutes_total']
    out['lr_choice_runs'] = (previous or {}).get('lr_choice_runs', []) + lr_runs
    if previous:
      out['provenance'] = {'earlier_rows_from': previous.get('commit') or 'a file written before provenance was recorded',
                           'rows_run_now': sorted(k for k, rs in runs.items() if rs)}
    tables.write_results(path, out, markdown(out))
    return out

  families = sorted({r.family for r in rows.values()} | {ROWS[r.init_from].family for r in rows.values() if r.init_from})
  lr_choice, started, run_seconds, lr_runs = {}, time.perf_counter(), [], []
  for family in [f for f in FAMILIES if f in families]:
    if LEARNING_RATES[budget] is None:
      lr_choice[family] = {'validation_bits_per_byte': {}, 'chosen': budget_config(family, budget).learning_rate}
      continue
    scores = {}
    for lr in LEARNING_RATES[budget]:
      config = budget_config(family, budget)
      config.learning_rate, config.seed = lr, seeds[0]
      config.num_train_steps = max(2, config.num_train_steps // 2)
      config.warmup_steps = max(1, config.warmup_steps // 2)
      config.eval_every_steps = config.checkpoint_every_steps = config.num_train_steps
      result = tables.run_or_reuse(os.path.join(root, 'lr_choice', family, f'lr_{lr:g}'), config=config, log=log,
                                   label=f'lr choice: {family} at {lr:g}, seed {seeds[0]}, half budget')
      scores[f'{lr:g}'] = validation_bpb(result)
      lr_runs.append({'family': family, 'learning_rate': lr, 'elapsed_s': result['elapsed_s'],
                      **provenance.config_record(config)})
      run_seconds.append(result['elapsed_s'])
    lr_choice[family] = {'validation_bits_per_byte': scores, 'chosen': float(min(scores, key=scores.get))}
  runs: dict[str, list[dict]] = {}
  order = sorted(rows, key=lambda k: bool(rows[k].init_from))  # fine-tunes after the runs they start from
  for key in order:
    row = rows[key]
    runs[key] = []
    for seed in seeds[:1] if row.first_seed else seeds:
      config = budget_config(row.variant, budget)
      config.learning_rate, config.seed = lr_choice[row.family]['chosen'], seed
      if row.init_from:
        config.init_from = os.path.join(root, row.init_from, f'seed_{seed}')
        if not os.path.exists(os.path.join(config.init_from, 'result.json')):
          log(f'[skip] {row.name}, seed {seed}: no {row.init_from} run of this seed to fine-tune')
          continue
      workdir = os.path.join(root, key, f'seed_{seed}')
      result = tables.run_or_reuse(workdir, config=config, log=log,
                                   label=f'{row.name}, seed {seed}, lr {config.learning_rate:g}')
      runs[key].append({'seed': seed, 'workdir': workdir, 'learning_rate': config.learning_rate, 'config': config, **result})
      run_seconds.append(result['elapsed_s'])
      write(runs, final=False)
  out = write(runs, final=True)
  plot(runs, out, path.replace('.json', '.png'))
  log(markdown(out))
  log(f'wrote {path}')
  return out


def summarize(runs: dict[str, list[dict]], lr_choice: dict, budget: str, seeds: list[int], rows: dict,
              previous: dict | None = None) -> dict:
  """The table of `runs`; with `previous` (the results JSON before this invocation), the rows and learning-rate
  choices not run now keep their entries from it, and every paired test is computed from the per-seed values."""
  table = dict((previous or {}).get('rows', {}))
  for key, rs in runs.items():
    if not rs:
      continue
    sparsity = [float(np.mean(list(r['sparsity'].values()))) for r in rs if r.get('sparsity')]
    table[key] = {
        'row': rows[key].name, 'seeds': [r['seed'] for r in rs], 'learning_rate': rs[0]['learning_rate'],
        'test_bits_per_byte_chosen_on_validation': _mean_std([chosen_bpb(r) for r in rs]),
        'test_bits_per_byte_final': _mean_std([r['bits_per_byte'] for r in rs]),
        'validation_bits_per_byte_best': _mean_std([validation_bpb(r) for r in rs]),
        'mean_sparsity': float(np.mean(sparsity)) if sparsity else None,
        'run_minutes': _mean_std([r['elapsed_s'] / 60 for r in rs]),
        'per_seed': [{'seed': r['seed'], 'test_bits_per_byte_chosen_on_validation': chosen_bpb(r),
                      'chosen_step': r['best_on_validation']['running']['step'], 'final': r['bits_per_byte'],
                      'elapsed_s': r['elapsed_s'], 'corpus_sha256': r['dataset']['corpus_sha256'],
                      **provenance.config_record(r['config'])} for r in rs],
        'samples_seed_0': rs[0].get('samples'),
        'scales_seed_0': rs[0].get('scales'),
    }
  table = {k: table[k] for k in ROWS if k in table}  # the table's row order
  minus_fp, pairs = paired_tests(table)
  for key, row in table.items():
    row['minus_fp'] = minus_fp.get(key)
  first = next((rs[0] for rs in runs.values() if rs), {})
  trajectories = dict((previous or {}).get('ttq_scale_trajectories', {}))
  trajectories.update({k: scale_trajectories(runs[k][0]['workdir']) for k in ('ttq', 'ttq_ft') if runs.get(k)})
  return {'budget': budget, 'seeds': seeds, 'lr_choice': {**(previous or {}).get('lr_choice', {}), **lr_choice},
          'rows': table, 'paired': pairs, 'ttq_scale_trajectories': trajectories,
          'dataset': first.get('dataset') or (previous or {}).get('dataset'), 'model': _model_summary(budget),
          'machine': provenance.machine()}


def plot(runs: dict[str, list[dict]], out: dict, path: str) -> None:
  """Training bits per byte of each row (seed 0, from metrics.jsonl) and TTQ's per-layer scales over steps."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from ttq_jax import reports
  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
  for key, rs in runs.items():
    rows = [r for r in reports.read_metrics(os.path.join(rs[0]['workdir'], 'metrics.jsonl')) if 'train_bits_per_byte' in r]
    left.plot([r['step'] for r in rows], [r['train_bits_per_byte'] for r in rows], label=ROWS[key].name)
  left.set(xlabel='step', ylabel='training bits per byte (seed 0)', title='Training curves')
  left.legend(fontsize=7)
  for layer, t in out['ttq_scale_trajectories'].get('ttq', {}).items():
    line, = right.plot(t['step'], t['w_p'], lw=1, label=layer)
    right.plot(t['step'], t['w_n'], lw=1, ls='--', color=line.get_color())
  right.set(xlabel='step', ylabel='scale', title='TTQ from scratch, seed 0: W_p (solid), W_n (dashed) per layer')
  right.legend(fontsize=5, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _model_summary(budget: str) -> dict:
  c = budget_config('ttq', budget)
  return {'depth': c.model.depth, 'width': c.model.width, 'num_heads': c.model.num_heads, 'mlp_width': c.model.mlp_width,
          'seq_len': c.data.seq_len, 'batch_size': c.batch_size, 'num_train_steps': c.num_train_steps}


def _fmt(ms: dict | None, digits: int = 3) -> str:
  return statistics.mean_spread(ms, digits)


def markdown(out: dict) -> str:
  m = out['model']
  lines = [f'Byte-level decoder, depth {m["depth"]}, width {m["width"]}, {m["num_heads"]} heads, MLP {m["mlp_width"]}, '
           f'sequence {m["seq_len"]}, batch {m["batch_size"]}, {m["num_train_steps"]} steps per run (budget '
           f'`{out["budget"]}`), seeds {",".join(map(str, out["seeds"]))}; test bits per byte (lower is better) of the '
           'model chosen on validation.', '',
           '| row | seeds | lr | test bits/byte (chosen on validation, ± std) | minus FP, same seed (± SE) | final test bits/byte | '
           'mean sparsity | minutes a run |', '|---|---|---|---|---|---|---|---|']
  for key, r in out['rows'].items():
    d = r['minus_fp']
    diff = '-' if not d else statistics.mean_spread(d, 3, signed=True) + (
        f' (n={d["n"]}, Holm p={d["p_holm"]:.2g})' if d.get('p_holm') is not None else f' (n={d["n"]})')
    sp = f'{r["mean_sparsity"]:.3f}' if r['mean_sparsity'] is not None else '-'
    lines.append(f'| {r["row"]} | {len(r["seeds"])} | {r["learning_rate"]:g} | '
                 f'{_fmt(r["test_bits_per_byte_chosen_on_validation"])} | {diff} | {_fmt(r["test_bits_per_byte_final"])} | '
                 f'{sp} | {_fmt(r["run_minutes"], 1)} |')
  tests = [r['minus_fp'] for r in out['rows'].values() if r['minus_fp']] + out.get('paired', [])
  lines += ['', f'Paired same-seed differences a - b of test bits/byte (two-sided paired t, df = n - 1, Holm-adjusted over '
            f'the table\'s {len(tests)} comparisons; "resolved" at adjusted p < 0.05): ' + '; '.join(
                f'{out["rows"][t["a"]]["row"]} - {out["rows"][t["b"]]["row"]} {statistics.describe(t)}' for t in tests)]
  lines += ['', 'Learning rate chosen on validation (seed ' + str(out['seeds'][0]) + ', half budget; none listed: '
            "configs/lm.py's): " + '; '.join(
      f'{fam}: ' + ', '.join(f'{lr} -> {v:.3f}' for lr, v in c['validation_bits_per_byte'].items()) + f' (chose {c["chosen"]:g})'
      for fam, c in out['lr_choice'].items())]
  if out.get('dataset'):
    d = out['dataset']
    lines += ['', f'Corpus: {d["name"]} ({d["corpus_dir"]}, package {d["package"]} {d["package_version"]}), sha256 '
              f'{d["corpus_sha256"][:16]}..., {d["train_bytes"]:,} / {d["validation_bytes"]:,} / {d["test_bytes"]:,} bytes '
              'train / validation / test.']
  return '\n'.join(lines)


def readme_block(readme: str) -> str:
  """The generated table as it stands in README.md (between the markers)."""
  return tables.readme_block(readme, README_NAME)


def main(args) -> None:
  seeds = [int(s) for s in args.seeds.split(',')]
  only = tuple(s for s in args.only.split(',') if s) if args.only else ()
  unknown = [s for s in only if s not in ROWS]
  if unknown:
    raise SystemExit(f'--only {unknown[0]!r} is not a row of the lm table: allowed are {", ".join(ROWS)}')
  run_table(budget=args.budget, seeds=seeds, only=only, workdir_root=args.workdir_root, results=args.results)


def recompute_tests(data: dict) -> dict:
  """A results JSON with its paired tests (minus FP and PAIRS) recomputed from the rows' per-seed values."""
  data = dict(data, rows={k: dict(r) for k, r in data['rows'].items()})
  minus_fp, data['paired'] = paired_tests(data['rows'])
  for key, row in data['rows'].items():
    row['minus_fp'] = minus_fp.get(key)
  return data
