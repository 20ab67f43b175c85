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
import math
import os
import platform
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, 'experiments', 'results', 'lm.json')
GPU_RESULTS = os.path.join(ROOT, 'experiments', 'results', 'lm_gpu.json')
# None: no choice, each family's rate of configs/lm.py (the CPU table's choice): the GPU part's 6 minutes have no room
LEARNING_RATES = {'tiny': (3e-3, 1e-2), 'cpu': (1e-3, 3e-3, 1e-2), 'gpu': None}
FAMILIES = ('fp', 'ttq', 'bitnet')  # the rows whose learning rate is chosen; the others take their family's
PAIRS = (('ttq', 'bitnet'), ('ttq_ft', 'bitnet_ft'), ('ttq', 'twn'))  # paired a - b beyond each row's minus FP
README_START, README_END = '<!-- lm:start -->', '<!-- lm:end -->'  # README.md shows markdown(RESULTS) between them


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
    'twn': Row('TWN', 'twn', 'ttq', first_seed=True),
    'bitnet_a8': Row('BitNet b1.58, 8-bit activations (W1.58A8)', 'bitnet_a8', 'bitnet', first_seed=True),
    'ttq_a8': Row('TTQ, 8-bit activations', 'ttq_a8', 'ttq', first_seed=True),
    'ttq_ft': Row('TTQ fine-tuned from FP', 'ttq', 'ttq', init_from='fp'),
    'bitnet_ft': Row('BitNet b1.58 fine-tuned from FP', 'bitnet', 'bitnet', init_from='fp'),
}


def budget_config(variant: str, budget: str):
  """configs/lm.py:<variant> at `budget`: tiny (the smoke model, a few steps: tests), cpu (the config's own:
  the committed table), gpu (a larger model and budget for one H200, experiments/gpu_check.sh lm)."""
  sys.path.insert(0, ROOT)
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


def _run(config, workdir: str, log) -> dict:
  """Trains (or resumes, or re-reads) one run in this process; its result.json."""
  path = os.path.join(workdir, 'result.json')
  if not os.path.exists(path):
    from ttq_jax import train
    t0 = time.perf_counter()
    train.train_and_evaluate(config, workdir)
    log(f'       {time.perf_counter() - t0:.0f} s')
  with open(path) as f:
    return json.load(f)


def chosen_bpb(result: dict) -> float:
  """Test bits per byte of the model chosen on validation."""
  return result['best_on_validation']['running']['bits_per_byte']


def validation_bpb(result: dict) -> float:
  return result['best_on_validation']['running']['validation_bits_per_byte']


def _mean_std(values) -> dict:
  v = np.asarray(values, np.float64)
  return {'mean': float(v.mean()), 'std': float(v.std(ddof=1)) if len(v) > 1 else None, 'n': len(v)}


def paired(a: list[dict], b: list[dict]) -> dict | None:
  """Same-seed differences a - b of the chosen test bits per byte: mean, its standard error, per seed."""
  by_seed = {r['seed']: chosen_bpb(r) for r in b}
  diffs = {r['seed']: chosen_bpb(r) - by_seed[r['seed']] for r in a if r['seed'] in by_seed}
  if not diffs:
    return None
  d = np.asarray(list(diffs.values()))
  se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else None
  return {'mean': float(d.mean()), 'se': se, 'n': len(d), 'per_seed': diffs}


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

  def write(runs, final: bool) -> dict:  # after every run: an interrupted table keeps what finished
    out = summarize(runs, lr_choice, budget, seeds, rows)
    out['wall_minutes'], out['complete'] = (time.perf_counter() - started) / 60, final  # of this invocation
    out['run_minutes_total'] = sum(run_seconds) / 60  # every run's own wall time (elapsed_s), learning rates included
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
      json.dump(out, f, indent=1)
    with open(path.replace('.json', '.md'), 'w') as f:
      f.write(markdown(out) + '\n')
    return out

  families = sorted({r.family for r in rows.values()} | {ROWS[r.init_from].family for r in rows.values() if r.init_from})
  lr_choice, started, run_seconds = {}, time.perf_counter(), []
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
      log(f'[lr  ] {family} at {lr:g}, seed {seeds[0]}, half budget')
      result = _run(config, os.path.join(root, 'lr_choice', family, f'lr_{lr:g}'), log)
      scores[f'{lr:g}'] = validation_bpb(result)
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
      log(f'[run ] {row.name}, seed {seed}, lr {config.learning_rate:g}, in {workdir}')
      result = _run(config, workdir, log)
      runs[key].append({'seed': seed, 'workdir': workdir, 'learning_rate': config.learning_rate, **result})
      run_seconds.append(result['elapsed_s'])
      write(runs, final=False)
  out = write(runs, final=True)
  plot(runs, out, path.replace('.json', '.png'))
  log(markdown(out))
  log(f'wrote {path}')
  return out


def summarize(runs: dict[str, list[dict]], lr_choice: dict, budget: str, seeds: list[int], rows: dict) -> dict:
  import jax
  table = {}
  for key, rs in runs.items():
    if not rs:
      continue
    sparsity = [float(np.mean(list(r['sparsity'].values()))) for r in rs if r.get('sparsity')]
    table[key] = {
        'row': rows[key].name, 'seeds': [r['seed'] for r in rs], 'learning_rate': rs[0]['learning_rate'],
        'test_bits_per_byte_chosen_on_validation': _mean_std([chosen_bpb(r) for r in rs]),
        'test_bits_per_byte_final': _mean_std([r['bits_per_byte'] for r in rs]),
        'validation_bits_per_byte_best': _mean_std([validation_bpb(r) for r in rs]),
        'minus_fp': paired(rs, runs['fp']) if key != 'fp' and runs.get('fp') else None,
        'mean_sparsity': float(np.mean(sparsity)) if sparsity else None,
        'run_minutes': _mean_std([r['elapsed_s'] / 60 for r in rs]),
        'per_seed': [{'seed': r['seed'], 'test_bits_per_byte_chosen_on_validation': chosen_bpb(r),
                      'chosen_step': r['best_on_validation']['running']['step'], 'final': r['bits_per_byte'],
                      'elapsed_s': r['elapsed_s']} for r in rs],
        'samples_seed_0': rs[0].get('samples'),
        'scales_seed_0': rs[0].get('scales'),
    }
  first = next((rs[0] for rs in runs.values() if rs), {})
  trajectories = {k: scale_trajectories(runs[k][0]['workdir']) for k in ('ttq', 'ttq_ft') if runs.get(k)}
  pairs = []
  for a, b in PAIRS:
    difference = paired(runs[a], runs[b]) if runs.get(a) and runs.get(b) else None
    if difference:
      pairs.append({'a': a, 'b': b, **difference})
  return {'budget': budget, 'seeds': seeds, 'lr_choice': lr_choice, 'rows': table, 'paired': pairs,
          'ttq_scale_trajectories': trajectories,
          'dataset': first.get('dataset'), 'model': _model_summary(budget),
          'machine': {'cpu_count': os.cpu_count(), 'processor': platform.processor() or platform.machine(),
                      'backend': jax.default_backend(), 'device': str(jax.devices()[0].device_kind),
                      'jax': jax.__version__}}


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
  if not ms:
    return '-'
  return f'{ms["mean"]:.{digits}f}' + (f' +- {ms["std"]:.{digits}f}' if ms.get('std') is not None else '')


def markdown(out: dict) -> str:
  m = out['model']
  lines = [f'Byte-level decoder, depth {m["depth"]}, width {m["width"]}, {m["num_heads"]} heads, MLP {m["mlp_width"]}, '
           f'sequence {m["seq_len"]}, batch {m["batch_size"]}, {m["num_train_steps"]} steps per run (budget '
           f'`{out["budget"]}`), seeds {",".join(map(str, out["seeds"]))}; test bits per byte (lower is better) of the '
           'model chosen on validation.', '',
           '| row | seeds | lr | test bits/byte (chosen on validation) | minus FP, same seed (+- SE) | final test bits/byte | '
           'mean sparsity | minutes a run |', '|---|---|---|---|---|---|---|---|']
  for key, r in out['rows'].items():
    d = r['minus_fp']
    diff = '-' if not d else f'{d["mean"]:+.3f}' + (f' +- {d["se"]:.3f}' if d['se'] is not None else '') + f' (n={d["n"]})'
    sp = f'{r["mean_sparsity"]:.3f}' if r['mean_sparsity'] is not None else '-'
    lines.append(f'| {r["row"]} | {len(r["seeds"])} | {r["learning_rate"]:g} | '
                 f'{_fmt(r["test_bits_per_byte_chosen_on_validation"])} | {diff} | {_fmt(r["test_bits_per_byte_final"])} | '
                 f'{sp} | {_fmt(r["run_minutes"], 1)} |')
  if out.get('paired'):
    lines += ['', 'Paired same-seed differences of test bits/byte: ' + '; '.join(
        f'{out["rows"][p["a"]]["row"]} - {out["rows"][p["b"]]["row"]} {p["mean"]:+.3f}'
        + (f' +- {p["se"]:.3f}' if p['se'] is not None else '') + f' (n={p["n"]})' for p in out['paired'])]
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
  start, end = readme.index(README_START) + len(README_START), readme.index(README_END)
  return readme[start:end].strip('\n')


def main(args) -> None:
  seeds = [int(s) for s in args.seeds.split(',')]
  only = tuple(s for s in args.only.split(',') if s) if args.only else ()
  unknown = [s for s in only if s not in ROWS]
  if unknown:
    raise SystemExit(f'--only {unknown[0]!r} is not a row of the lm table: allowed are {", ".join(ROWS)}')
  run_table(budget=args.budget, seeds=seeds, only=only, workdir_root=args.workdir_root, results=args.results)
