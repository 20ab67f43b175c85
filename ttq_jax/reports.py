"""What a run reports about its ternary layers (sparsity, scales, parameter counts) and the final
table printed at the end of training and by `--mode eval`."""

from __future__ import annotations

import collections
import json
from typing import Any

import jax
import numpy as np

from ttq_jax import files
from ttq_jax import metric_writers
from ttq_jax import quant as quant_lib
from ttq_jax import tasks


def quant_report(state, config, quantized: bool = True) -> dict[str, Any]:
  """Per-layer sparsity and scales (host floats; per-channel scales as their mean) for logging and eval
  JSON. `quantized=False` (a checkpoint from the FP warm-up) reports every parameter as full precision."""
  layers = state.ternary if quantized else ()
  params = jax.device_get(state.params)
  return {**from_layer_reports(quant_lib.layer_reports(params, layers)),
          'layer_rules': quant_lib.layer_rules(layers),
          'param_counts': quant_lib.count_params(params, layers)}


def from_layer_reports(layers: dict[str, Any]) -> dict[str, Any]:
  """{'sparsity': {kernel path: s}, 'scales': {kernel path: (w_p, w_n)}} of `quant.LayerReport`s (or their
  dicts, as `export_format.read` returns them; a leading 'params/' is dropped)."""
  as_dict = lambda r: r if isinstance(r, dict) else r.as_dict()
  rows = {k.removeprefix('params/'): as_dict(r) for k, r in layers.items()}
  return {'sparsity': {k: r['sparsity'] for k, r in rows.items()},
          'scales': {k: (r['w_p'], r['w_n']) for k, r in rows.items()}}


def rules_differ_from_config(layers, config) -> str:
  """'' when every ternary layer quantizes as `config.quant` says (method, threshold rule and its factor),
  else a line naming the first layer whose rule differs (a `quantize()`d model's rules decide)."""
  expected = quant_lib.rule_settings(quant_lib.QuantConfig.from_mapping(config.quant))
  for layer in layers:
    got = quant_lib.rule_settings(layer.quant)
    mismatch = {k: (expected.get(k), v) for k, v in got.items() if expected.get(k) != v}
    if mismatch:
      details = ', '.join(f'{k} {a!r} -> {b!r}' for k, (a, b) in mismatch.items())
      return (f'config.quant is not what the model\'s rules do (layer {layer.path!r}: {details}); the rules decide, '
              'and result.json lists each layer\'s settings (layer_rules)')
  return ''


class CodeDynamics:
  """Ternary dynamics for metrics rows, per ternary layer: `flip_rate/<layer>`, the fraction of its codes that
  changed since the previous call (the previous logged step of this process; absent on the first call, so after
  a start or resume), and `near_threshold/<layer>`, the fraction of its latent weights within 10% of the zero
  threshold in force for them (`quant.near_threshold`). Called on log steps only: the train step is unchanged."""

  def __init__(self):
    self.previous: dict[str, np.ndarray] = {}

  def scalars(self, params, layers) -> dict[str, float]:
    params = jax.device_get(params)
    codes = {p: np.asarray(tw.codes) for p, tw in quant_lib.ternary_weights(params, layers).items()}
    layer = lambda path: path.rsplit('/', 1)[0]
    out = {f'flip_rate/{layer(p)}': v for p, v in quant_lib.flip_rates(self.previous, codes).items()}
    out.update({f'near_threshold/{layer(p)}': v for p, v in quant_lib.near_threshold(params, layers).items()})
    self.previous = codes
    return out


def flat_quant_scalars(report: dict) -> dict[str, float]:
  """`sparsity/<layer>`, `w_p/<layer>`, `w_n/<layer>` and `sparsity/mean` for metrics rows."""
  out = {}
  for path, s in report['sparsity'].items():
    layer = path.rsplit('/', 1)[0]
    out[f'sparsity/{layer}'] = s
    out[f'w_p/{layer}'], out[f'w_n/{layer}'] = report['scales'][path]
  if report['sparsity']:
    out['sparsity/mean'] = float(np.mean(list(report['sparsity'].values())))
  return out


# BN statistics an evaluation used -> the prefix of its metrics-row keys: the running averages of training
# (what the official code evaluated with) and statistics re-estimated on clean training batches.
BN_COLUMNS = {'running': 'eval_', 'reestimated': 'eval_bnre_'}
LAST_N = 5


def read_metrics(path: str) -> list[dict]:
  """The rows of a metrics.jsonl (later rows for a step replace earlier ones, as after a resume)."""
  rows = {}
  for line in files.read_text(path).splitlines():
    if line.strip():
      row = json.loads(line)
      rows[row['step']] = row
  return [rows[k] for k in sorted(rows)]


def eval_protocol(rows: list[dict], *, metric: str = 'top1_accuracy', higher_is_better: bool = True) -> dict[str, dict]:
  """Final, best (the highest, or with `higher_is_better=False` the lowest: bits per byte) and mean of the last
  5 evaluations of `metric`, per BN column, over the evaluations of the trained
  model: only those of the ternary model when the run has any (`eval_ternary` = 1), so the evaluation at
  the end of a full-precision warm-up never counts. {column: {'final', 'best', 'best_step',
  'mean_last5', 'num_evals'}} for each column present in the rows."""
  evals = [r for r in rows if f'eval_{metric}' in r]
  if any(r.get('eval_ternary') for r in evals):
    evals = [r for r in evals if r.get('eval_ternary')]
  out = {}
  for column, prefix in BN_COLUMNS.items():
    points = [(r['step'], r[prefix + metric]) for r in evals if prefix + metric in r]
    if not points:
      continue
    sign = 1 if higher_is_better else -1
    best_step, best = max(points, key=lambda p: (sign * p[1], -p[0]))  # the earliest of equal bests
    last = [v for _, v in points[-LAST_N:]]
    out[column] = {'final': points[-1][1], 'best': best, 'best_step': best_step,
                   'mean_last5': float(np.mean(last)), 'num_evals': len(points)}
  return out


def format_protocol(protocol: dict, split: str, task: tasks.Task = tasks.TASKS['classify'],
                    batch_norm: bool = True) -> list[str]:
  lines = []
  for column, p in protocol.items():
    lines.append(f'  {split} {task.label}{f", {column} BN statistics" if batch_norm else ""}: final {task.fmt(p["final"])} | best '
                 f'{task.fmt(p["best"])} (step {p["best_step"]}) | mean of last {min(LAST_N, p["num_evals"])} '
                 f'{task.fmt(p["mean_last5"])} ({p["num_evals"]} evaluations)')
  return lines


def method_line(result: dict, config) -> str:
  """The method of the layers actually quantized: one method, a mix with its layer counts, or none."""
  rules = result.get('layer_rules') or {}
  counts = collections.Counter(r['method'] for r in rules.values())
  if len(counts) == 1:
    return next(iter(counts))
  if counts:
    return 'mixed: ' + ', '.join(f'{m} ({n} layers)' for m, n in sorted(counts.items()))
  if (result.get('param_counts') or {}).get('ternary') == 0 and quant_lib.METHODS[config.quant.method].quantized:
    return 'none (no layer is ternary)'
  return config.quant.method


def format_eval_table(result: dict, config, model_name: str | None = None) -> str:
  """The final summary: accuracy first, then each ternary layer's sparsity and scales. The method line says what
  the layers did (`layer_rules`), not what the config asked."""
  method = method_line(result, config)
  if quant_lib.METHODS[config.quant.method].quantized and result.get('ternary_steps') == 0:
    method = f'{method} (no ternary step trained: the run ended inside its full-precision warm-up)'
  elif result.get('ternary_steps'):
    method = f'{method}, {result["ternary_steps"]} ternary steps'
  task = tasks.of(config)
  lines = [f'\n{model_name or config.model.name} on {config.data.name}, method {method}, '
           f'step {result["step"]}:',
           f'  test loss {result["loss"]:.4f} | ' + task.score_line(result) +
           f' | {result.get(task.count, "?")} {task.count.split("_")[1]}' +
           (f' ({result["bn_statistics"]} BN statistics)' if result.get('bn_statistics') else '')]
  columns = result.get('test') or {}
  if len(columns) > 1:  # every figure with the BN statistics it was computed with
    lines.append(f'  test {task.label} by BN statistics: ' + ' | '.join(f'{c} {task.fmt(m[task.metric])}'
                                                                          for c, m in columns.items()))
  if 'protocol' in result:
    lines += format_protocol(result['protocol'], result.get('selection_split', 'test'), task, 'bn_statistics' in result)
  for column, r in (result.get('best_on_validation') or {}).items():
    bn = f'{column} BN statistics, ' if 'bn_statistics' in result else ''
    lines.append(f'  test {task.label} of the model chosen on validation ({bn}step {r["step"]}): '
                 f'{task.fmt(r[task.metric])}')
  for name, text in (result.get('samples') or {}).items():
    lines.append(f'  sample ({name}): {text!r}')
  target = result.get('target')
  if target:
    if 'step' in target:
      lines.append(f'  ternary model reached {result.get("selection_split", "test")} {task.label} >= '
                   f'{task.fmt(target["accuracy"])} at step {target["step"]}, {target["seconds"] / 60:.1f} min after '
                   'start (this process)')
    else:
      lines.append(f'  did not reach {task.label} >= {task.fmt(target["accuracy"])} in this process')
  if 'elapsed_s' in result:
    s = result.get('seconds')
    lines.append(f'  wall time {result["elapsed_s"] / 60:.1f} min (this process' + (
        f': compiling the train step {s["compile_train_step"]:.0f} s, evaluating {s["evaluation"]:.0f} s, saving '
        f'checkpoints {s["checkpoint_saves"]:.0f} s, the rest setup and training)' if s else ')'))
  counts = result.get('param_counts')
  if counts:
    lines.append(f'  parameters: {counts["ternary"]:,} ternary, {counts["full_precision"]:,} full precision')
  if result.get('sparsity'):
    rules = result.get('layer_rules') or {}
    describe = lambda r: ' '.join([r['method']] + ([r['threshold']] if r['threshold'] else [])
                                  + [f'{k}={r[k]:g}' for k in ('t', 'k', 'sparsity') if k in r]
                                  + (['per-channel'] if r.get('scale_granularity') == 'channel' else [])
                                  + ([f'act={r["activations"]}'] if 'activations' in r else []))
    rows = [(path.rsplit('/', 1)[0], describe(rules[path]) if path in rules else '-', f'{s:.3f}',
             f'{result["scales"][path][0]:+.4f}', f'{result["scales"][path][1]:+.4f}')
            for path, s in result['sparsity'].items()]
    lines.append(metric_writers.table(rows, ('layer', 'rule', 'sparsity', 'w_p', 'w_n')))
  return '\n'.join(lines)
