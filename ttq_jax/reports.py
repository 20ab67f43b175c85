"""What a run reports about its ternary layers (sparsity, scales, parameter counts) and the final
table printed at the end of training and by `--mode eval`."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from ttq_jax import metric_writers
from ttq_jax import quant as quant_lib


def quant_report(state, config, quantized: bool = True) -> dict[str, Any]:
  """Per-layer sparsity and scales (host floats; per-channel scales as their mean) for logging and eval
  JSON. `quantized=False` (a checkpoint from the FP warm-up) reports every parameter as full precision."""
  layers = state.ternary if quantized else ()
  params = jax.device_get(state.params)
  weights = quant_lib.ternary_weights(params, layers)  # thresholds computed once for both reports
  return {'sparsity': {p: tw.sparsity for p, tw in weights.items()},
          'scales': {p: (float(np.mean(tw.w_p)), float(np.mean(tw.w_n))) for p, tw in weights.items()},
          'param_counts': quant_lib.count_params(params, layers)}


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


def format_eval_table(result: dict, config, model_name: str | None = None) -> str:
  """The final summary: accuracy first, then each ternary layer's sparsity and scales."""
  lines = [f'\n{model_name or config.model.name} on {config.data.name}, method {config.quant.method}, '
           f'step {result["step"]}:',
           f'  test loss {result["loss"]:.4f} | top-1 {result["top1_accuracy"]:.2%}' +
           (f' | top-5 {result["top5_accuracy"]:.2%}' if 'top5_accuracy' in result else '') +
           f' | {result.get("num_examples", "?")} examples']
  target = result.get('target')
  if target:
    if 'step' in target:
      lines.append(f'  reached top-1 >= {target["accuracy"]:.2%} at step {target["step"]}, '
                   f'{target["seconds"] / 60:.1f} min after start (this process)')
    else:
      lines.append(f'  did not reach top-1 >= {target["accuracy"]:.2%} in this process')
  if 'elapsed_s' in result:
    lines.append(f'  wall time {result["elapsed_s"] / 60:.1f} min (this process: compile, train, eval)')
  counts = result.get('param_counts')
  if counts:
    lines.append(f'  parameters: {counts["ternary"]:,} ternary, {counts["full_precision"]:,} full precision')
  if result.get('sparsity'):
    rows = [(path.rsplit('/', 1)[0], f'{s:.3f}', f'{result["scales"][path][0]:+.4f}',
             f'{result["scales"][path][1]:+.4f}') for path, s in result['sparsity'].items()]
    lines.append(metric_writers.table(rows, ('layer', 'sparsity', 'w_p', 'w_n')))
  return '\n'.join(lines)
