"""`--mode export`: pack a workdir's ternary checkpoint into a `ttq-safetensors-v2` file, and `load`
such a file back as an inference model. The file format itself is `ttq_jax.export_format`."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import flax.linen as nn
import jax
from flax import nnx
import numpy as np

from ttq_jax import datasets
from ttq_jax import evaluation
from ttq_jax import export_format
from ttq_jax import files
from ttq_jax import functional
from ttq_jax import metric_writers
from ttq_jax import quant as quant_lib
from ttq_jax import run as run_lib
from ttq_jax import state as state_lib
from ttq_jax import steps
from ttq_jax import tasks
from ttq_jax import workdirs
from ttq_jax.errors import ConfigError, DataError, ExportError


def load(path: str, model: nn.Module | None = None):
  """(model, variables): the inference model (ternary layers as plain layers holding the dense ternary
  kernels rebuilt from the codes; the layers whose input was quantized in training, metadata `activations`,
  quantize it again) and its variables, ready for `model.apply(variables, x, ...)`.

  Built-in models are rebuilt from the config stored in the file. For your own model pass `model` (the
  plain one, or its `quant.quantize`d version: the plain model is returned). For an NNX model the pair is
  (`nnx.Module` of the plain structure already holding the loaded values, its `nnx.state`): call `model(x)`."""
  variables, metadata, _ = export_format.read(path)
  modes = json.loads(metadata.get('activations', '{}'))  # layers whose input the trained model quantized
  if model is None:
    model = state_lib.create_model(workdirs.complete(json.loads(metadata['config'])), quantized=False)
  model = functional.plain(functional.as_functional(model), modes)
  if isinstance(model, functional.NNXModel):
    module = model.bind(variables)
    module.eval()
    return module, nnx.state(module)
  return model, variables


def input_spec(data_config) -> dict:
  """What an exported model takes (metadata `input`): the dataset's facts (`datasets.DatasetInfo`: input shape,
  dtype, mean / std of the normalisation, task; text: bytes, vocabulary 256)."""
  return {'dataset': data_config.name, **dataclasses.asdict(datasets.dataset_info(data_config))}


def predictor(path: str, model=None) -> Callable:
  """`predict(raw) -> logits` of an export: raw inputs as the dataset stores them (images uint8 [batch, H, W, C],
  normalised here with the file's mean / std; text: bytes or int tokens [batch, seq]), the model as `load` gives it
  (`model`: your own, Linen or NNX, as for `load`)."""
  loaded, variables = load(path, model)
  _, metadata, _ = export_format.read(path)
  if 'input' in metadata:  # files written before the field: the facts of the config they carry
    info = datasets.DatasetInfo(**{k: tuple(v) if isinstance(v, list) else v
                                   for k, v in json.loads(metadata['input']).items() if k != 'dataset'})
  else:
    info = datasets.dataset_info(workdirs.complete(json.loads(metadata['config'])).data)
  task = tasks.TASKS[info.task]
  if isinstance(loaded, nnx.Module):
    return lambda raw: loaded(task.model_input(raw, info))
  apply = state_lib.apply_fn(loaded)
  return lambda raw: apply(variables, task.model_input(raw, info), train=False)


def _nbytes(tree) -> int:
  return int(sum(np.asarray(x).size * 4 for x in jax.tree.leaves(tree)))  # as float32


def _check_method(config) -> None:
  if not steps.is_quantized(config):
    methods = ', '.join(n for n, m in quant_lib.METHODS.items() if m.quantized)
    raise ExportError(f'quant.method={config.quant.method} has no ternary layers to pack: export a run of {methods}')


def _check_step(config, step: int) -> None:
  if not steps.is_ternary_at(config, step):
    start = steps.ternary_start_step(config)
    raise ExportError(
        f'checkpoint step {step} is from the full-precision warm-up (ternary training starts after step {start}, '
        f'fp_warmup_steps={config.fp_warmup_steps}, fp_warmup_epochs={config.fp_warmup_epochs}): its '
        f'ternary codes were never trained; export a checkpoint '
        f'after step {start} (--config.eval_step) or evaluate this one with --mode eval')


def _headline_bn_statistics(run, state):
  """(state with the BN statistics the export carries, their name): those of the headline evaluation. With
  `export.bn_statistics='reestimated'` and `bn_recalibration_batches` > 0, re-estimated on the clean training
  batches exactly as `--mode eval` does (same seed, same batches), so the file scores what the checkpoint's
  headline scores; otherwise training's running averages."""
  config, user_sources = run.config, run.user_sources
  if config.export.bn_statistics != 'reestimated' or config.bn_recalibration_batches <= 0 or not jax.tree.leaves(
      state.batch_stats):
    return state, 'running'
  try:
    batches = list(evaluation.reestimation_batches(config, user_sources=user_sources))
  except (ConfigError, DataError, OSError) as e:
    raise ExportError(f"export.bn_statistics='reestimated' re-estimates BN statistics on the training data, which is "
                      f'not available here ({str(e).splitlines()[0][:160]}): pass the data'
                      f'{" (data=...)" if config.data.name == datasets.USER_DATA_NAME else ""} or '
                      "export training's running statistics with --config.export.bn_statistics=running") from None
  return evaluation.reestimate_batch_stats(run.programs(state, evaluation.STEPS), state, batches, quantized=True), 'reestimated'


def export_workdir(config, workdir: str, *, model=None, data=None) -> dict[str, Any]:
  """Exports the newest (or `eval_step`) checkpoint to WORKDIR/export/model.safetensors (`model`, `data`:
  your own, as given to `train.train_and_evaluate`). The workdir's saved config decides what was trained
  (`workdirs.workdir_config`; `config` may be None)."""
  run = run_lib.for_workdir(config, workdir, model=model, data=data)
  config, workdir, model = run.config, run.workdir, run.model
  packing = config.export.packing
  _check_method(config)
  step, state, _ = run.restore(None if config.eval_step < 0 else config.eval_step)
  _check_step(config, step)
  state, bn_statistics = _headline_bn_statistics(run, state)
  params, batch_stats = jax.device_get((state.params, state.batch_stats))
  tensors = export_format.build_export(params, batch_stats, state.ternary, packing)
  path = files.join(workdir, 'export', 'model.safetensors')
  modes = state_lib.activation_modes(run.create_model(), datasets.dataset_info(config.data))
  if jax.process_index() == 0:
    export_format.save(path, tensors, packing=packing, config=config, step=step, bn_statistics=bn_statistics,
                       activations=modes, input_spec=input_spec(config.data))
  _, _, report = export_format.read(path)
  fp32_total = _nbytes(params) + _nbytes(batch_stats)
  export_bytes = files.size(path)
  ternary_fp32 = sum(r['numel'] * 4 for r in report.values())
  ternary_packed = sum(r['packed_bytes'] for r in report.values())
  summary = {'step': int(step), 'path': path, 'packing': packing, 'fp32_params_bytes': fp32_total,
             'export_bytes': export_bytes, 'ternary_fp32_bytes': ternary_fp32, 'ternary_packed_bytes': ternary_packed,
             'ternary_compression': ternary_fp32 / max(ternary_packed, 1),
             'model_compression': fp32_total / max(export_bytes, 1), 'layers': report}
  if jax.process_index() == 0:
    rows = [(k.removeprefix('params/').removesuffix('/kernel'), f'{r["numel"]:,}', f'{r["sparsity"]:.3f}',
             f'{r["w_p"]:+.4f}', f'{r["w_n"]:+.4f}') for k, r in report.items()]
    print(metric_writers.table(rows, ('layer', 'weights', 'sparsity', 'w_p', 'w_n')))
    print(f'\nexported step {step} ({packing}) to {path}\n'
          f'  ternary layers: {ternary_fp32:,} B fp32 -> {ternary_packed:,} B packed '
          f'({summary["ternary_compression"]:.2f}x smaller)\n'
          f'  whole model:    {fp32_total:,} B fp32 params -> {export_bytes:,} B file '
          f'({summary["model_compression"]:.2f}x smaller)')
  return summary
