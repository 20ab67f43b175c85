"""`--mode sample`: text from a trained language model, from a workdir's checkpoint (`eval_step`, default the
newest) or from an export (`restore_from`), with the code of the samples every LM run reports (`lm.generate`).

    python -m ttq_jax.main --mode sample --workdir workdirs/lm_ttq --config.sample.prompt='def ' \
        --config.sample.num_bytes=120 --config.sample.temperature=0.8

Set by `sample.prompt`, `sample.num_bytes`, `sample.temperature` (0 = greedy, the default) and `sample.seed`,
which eval may override; refused in one line for a model that does not continue text. Writes nothing.
"""

from __future__ import annotations

import json
from typing import Any

import jax
from flax import nnx

from ttq_jax import datasets
from ttq_jax import export
from ttq_jax import export_format
from ttq_jax import run as run_lib
from ttq_jax import state as state_lib
from ttq_jax import tasks


def _from_export(config, model):
  """(apply, variables, step, info) of the export `config.restore_from`."""
  loaded, variables = export.load(config.restore_from, model)
  _, metadata, _ = export_format.read(config.restore_from)
  info = (datasets.DatasetInfo(**{k: tuple(v) if isinstance(v, list) else v
                                  for k, v in json.loads(metadata['input']).items() if k != 'dataset'})
          if 'input' in metadata else datasets.dataset_info(config.data))
  if isinstance(loaded, nnx.Module):
    return lambda _, tokens: loaded(tokens), None, int(metadata.get('step', -1)), info
  return state_lib.apply_fn(loaded), variables, int(metadata.get('step', -1)), info


def sample_workdir(config, workdir: str, *, model=None) -> dict[str, Any]:
  """Prints and returns {'step', 'source', 'prompt', 'text', 'temperature', 'seed'}: `sample.num_bytes` bytes
  continuing `sample.prompt` (`model`: your own, as given to `train.train_and_evaluate`)."""
  run = run_lib.for_workdir(config, workdir, model=model, writes=False)
  config = run.config
  if config.restore_from:
    apply, variables, step, info = _from_export(config, run.model)
    source = config.restore_from
  else:
    step, state, _ = run.restore(None if config.eval_step < 0 else config.eval_step)
    apply = state_lib.apply_fn(run.create_model())
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    info, source = datasets.dataset_info(config.data), 'checkpoint'
  s = config.sample
  text = tasks.TASKS[info.task].continue_text(apply, variables, s.prompt.encode(), num_bytes=s.num_bytes,
                                              seq_len=info.input_shape[0], temperature=s.temperature, seed=s.seed)
  result = {'step': step, 'source': source, 'prompt': s.prompt, 'text': text.decode('utf-8', errors='replace'),
            'temperature': float(s.temperature), 'seed': int(s.seed)}
  if jax.process_index() == 0:
    print(f'{s.prompt}{result["text"]}')
  return result
