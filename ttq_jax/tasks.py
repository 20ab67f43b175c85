"""What a dataset asks the model to do (`DatasetInfo.task` -> `TASKS`): the model's input and targets in a
batch, the loss the train step minimises, the sums one eval step returns, the metrics they make, and the
metric runs are chosen and reported by (with its direction).

- `classify`: batches {'image', 'label'} (+ 'mask' per example in evaluation); softmax cross-entropy (or your
  `loss_fn`); top-1 (and top-5 above 5 classes) accuracy; higher top-1 is better.
- `next_byte`: batches {'tokens': int32 [batch, seq_len + 1]} (+ 'mask' [batch, seq_len] per predicted byte
  in evaluation); next-byte cross-entropy over every position; bits per byte (= nats per byte / ln 2); lower
  is better. Next-byte top-1 accuracy is reported too.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ttq_jax import datasets
from ttq_jax import lm
from ttq_jax import text
from ttq_jax.errors import ConfigError

TOP_K = 5  # top-5 accuracy is reported for datasets with more than 5 classes


def cross_entropy(logits, labels, num_classes: int):
  """Softmax cross-entropy per example (or per position: labels of any leading shape), in float32."""
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), jax.nn.one_hot(labels, num_classes))


def topk_correct(logits, labels, k: int):
  """1.0 where the label is among the k highest logits."""
  if k == 1:
    return (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  label_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)
  return (jnp.sum(logits > label_logit, axis=-1) < k).astype(jnp.float32)


def reports_top_k(num_classes: int) -> bool:
  return num_classes > TOP_K


@dataclasses.dataclass(frozen=True)
class Task:
  """`inputs(batch, info, dtype)` -> the model's input; `targets(batch)`; `metric`: the eval metric (a key of
  `metrics`' result) that selects and headlines a run, `higher_is_better` its direction; `metric_format`
  formats it ('{:.2%}', '{:.4f}'); `label`: its short name in tables; `count`: the name of what evaluation
  counts ('num_examples', 'num_bytes'); `scores`: ((result key, console format), ...) of the final table;
  `progress`: ((metrics-row key, format), ...) of the progress line; `throughput`: (metrics-row key, console
  unit, units per example of `info`); `target_metric`: what `target_accuracy` compares (None: the task has no
  accuracy, and `target_accuracy` is refused). `accuracy`, `top_k` (top-5 above 5 classes) and `bits` say which
  metrics it computes; only this module reads them."""
  inputs: Callable
  targets: Callable
  metric: str
  higher_is_better: bool
  metric_format: str
  label: str
  count: str
  scores: tuple[tuple[str, str], ...]
  progress: tuple[tuple[str, str], ...]
  throughput: tuple[str, str, Callable]
  target_metric: str | None = None
  raw_input: Callable = None  # (raw examples, info, dtype) -> the model's input (`model_input`)
  generate: Callable | None = None  # continues text (`continue_text`): `lm.generate` for language models
  record: Callable = lambda config, apply_fn, variables, info: {}  # what a result records beyond metrics
  accuracy: bool = True
  top_k: bool = False
  bits: bool = False

  def model_input(self, raw, info, dtype=jnp.float32):
    """The model's input from raw examples as the dataset stores them (images: uint8 or float HWC; text: bytes or
    int tokens [batch, seq]), as the steps make it (`inputs`)."""
    return self.raw_input(raw, info, dtype)

  def continue_text(self, apply_fn, variables, prompt: bytes, **kwargs) -> bytes:
    """`lm.generate` for a model that continues text; a one-line ConfigError for any other."""
    if self.generate is None:
      raise ConfigError(f'--mode sample continues text with a language model; this model is scored by {self.label}: '
                        'allowed are runs of a next-byte dataset (e.g. configs/lm.py)')
    return self.generate(apply_fn, variables, prompt, **kwargs)

  def throughput_scalars(self, steps_per_second: float, batch_size: int, info) -> dict[str, float]:
    key, _, per_example = self.throughput
    return {'steps_per_second': steps_per_second, key: steps_per_second * batch_size * per_example(info)}

  def score_line(self, result: dict) -> str:
    return ' | '.join(fmt.format(result[key]) for key, fmt in self.scores if key in result)

  def losses(self, logits, targets, info, loss_fn=None):
    """The loss of each example (classify) or of each predicted byte (next_byte): `loss_fn(logits, targets)`
    when given (your own), else softmax cross-entropy."""
    return loss_fn(logits, targets) if loss_fn is not None else cross_entropy(logits, targets, info.num_classes)

  def eval_sums(self, logits, targets, mask, info, loss_fn=None) -> dict:
    """Sums over the counted (mask = 1) examples or bytes of one global batch."""
    out = {'loss': jnp.sum(self.losses(logits, targets, info, loss_fn) * mask), 'count': jnp.sum(mask)}
    if self.accuracy:
      out['top1_correct'] = jnp.sum(topk_correct(logits, targets, 1) * mask)
    if self.top_k and reports_top_k(info.num_classes):
      out[f'top{TOP_K}_correct'] = jnp.sum(topk_correct(logits, targets, TOP_K) * mask)
    return out

  def metrics(self, totals: dict) -> dict[str, float]:
    """Means of `eval_sums` over a split."""
    count = float(totals['count'])
    out = {'loss': float(totals['loss']) / count}
    if 'top1_correct' in totals:
      out['top1_accuracy'] = float(totals['top1_correct']) / count
    if f'top{TOP_K}_correct' in totals:
      out[f'top{TOP_K}_accuracy'] = float(totals[f'top{TOP_K}_correct']) / count
    if self.bits:
      out['bits_per_byte'] = out['loss'] / math.log(2)
    out[self.count] = int(count)
    return out

  def train_metrics(self, loss, logits, targets, info) -> dict:
    out = {'train_loss': loss}
    if self.accuracy:
      out['train_top1_accuracy'] = jnp.mean(topk_correct(logits, targets, 1))
    if self.top_k and reports_top_k(info.num_classes):
      out[f'train_top{TOP_K}_accuracy'] = jnp.mean(topk_correct(logits, targets, TOP_K))
    if self.bits:
      out['train_bits_per_byte'] = loss / math.log(2)
    return out

  def better(self, a: float, b: float) -> bool:
    """Whether metric value `a` is strictly better than `b`."""
    return a > b if self.higher_is_better else a < b

  def fmt(self, value: float) -> str:
    return self.metric_format.format(value)


def _text_record(config, apply_fn, variables, info) -> dict:
  """Which text the run saw (corpus digest, package version) and samples of the model continuing fixed prompts
  (greedy and temperature 0.8; every process computes them, as the arrays are global)."""
  return {'dataset': {'name': config.data.name, **text.record(config.data)},
          'samples': lm.samples(apply_fn, variables, seq_len=info.input_shape[0])}


TASKS = {
    'classify': Task(inputs=lambda batch, info, dtype: datasets.normalize(batch['image'], info, dtype),
                     targets=lambda batch: batch['label'], metric='top1_accuracy', higher_is_better=True,
                     metric_format='{:.2%}', label='top-1', count='num_examples',
                     scores=(('top1_accuracy', 'top-1 {:.2%}'), (f'top{TOP_K}_accuracy', f'top-{TOP_K} {{:.2%}}')),
                     progress=(('train_loss', 'loss {:.4f}'), ('train_top1_accuracy', 'top1 {:.2%}'),
                               ('learning_rate', 'lr {:.3g}'), ('eval_top1_accuracy', 'eval top1 {:.2%}')),
                     throughput=('images_per_second', 'img/s', lambda info: 1), target_metric='top1_accuracy',
                     raw_input=lambda raw, info, dtype: datasets.normalize(jnp.asarray(raw), info, dtype),
                     top_k=True),
    'next_byte': Task(inputs=lambda batch, info, dtype: batch['tokens'][:, :-1],
                      targets=lambda batch: batch['tokens'][:, 1:], metric='bits_per_byte', higher_is_better=False,
                      metric_format='{:.4f}', label='bits/byte', count='num_bytes',
                      scores=(('bits_per_byte', 'bits/byte {:.4f}'),),
                      progress=(('train_loss', 'loss {:.4f}'), ('train_bits_per_byte', 'bits/byte {:.4f}'),
                                ('learning_rate', 'lr {:.3g}'), ('eval_bits_per_byte', 'eval bits/byte {:.4f}')),
                      throughput=('bytes_per_second', 'bytes/s', lambda info: info.input_shape[0]),
                      raw_input=lambda raw, info, dtype: jnp.asarray(
                          np.frombuffer(raw, np.uint8)[None] if isinstance(raw, bytes) else raw, jnp.int32),
                      record=_text_record, generate=lm.generate, accuracy=False, bits=True),
}


def of(config_or_info) -> Task:
  """The task of a config's dataset (or of a DatasetInfo)."""
  info = config_or_info if isinstance(config_or_info, datasets.DatasetInfo) else datasets.dataset_info(config_or_info.data)
  return TASKS[info.task]
