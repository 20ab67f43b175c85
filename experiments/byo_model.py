r"""Bring your own model, data and loss: TTQ for a Flax model ttq_jax has never seen.

    python experiments/byo_model.py --workdir workdirs/byo            # ~10 min on 2 CPU cores
    python experiments/byo_model.py --workdir /tmp/byo --smoke         # seconds (the test runs this)
    python experiments/byo_model.py --workdir /tmp/byo_nnx --smoke --api nnx   # the same net in Flax NNX

`Net` below is plain Flax Linen (nn.Conv / nn.Dense / nn.LayerNorm, explicit names); `NNXNet` is the same
network in Flax NNX (nnx.Conv / nnx.Linear / nnx.LayerNorm, the same layer paths), trained by the same loop. One `quant.quantize` call
with two path rules makes its two feature convolutions ternary, with one w_p / w_n per output channel,
and keeps the stem and the classifier full precision. The data are arrays (Fashion-MNIST here, any
`(images, labels)` or random-access source works), the loss is label-smoothed cross-entropy. The recipe
is the paper's: train the plain model in full precision, then fine-tune the quantized model from that
checkpoint (`init_from`: the params tree of the quantized model is the plain one plus the scales). Then
export the ternary model packed and evaluate the file: it scores what the checkpoint scores.
"""

from __future__ import annotations

import argparse
import os

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx
import optax

from configs import fashion_mnist  # noqa: E402
from ttq_jax import datasets, evaluation, export, quant, train  # noqa: E402


class Net(nn.Module):
  """A small CNN that knows nothing about ternary weights."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = nn.relu(nn.Conv(16, (3, 3), name='stem')(x))
    for i, width in enumerate((32, 64)):
      x = nn.Conv(width, (3, 3), strides=2, name=f'conv_{i}')(x)
      x = nn.relu(nn.LayerNorm(name=f'norm_{i}')(x))
    return nn.Dense(10, name='classifier')(x.mean(axis=(1, 2)))


class NNXNet(nnx.Module):
  """`Net` in Flax NNX: the same layers at the same paths (stem, conv_0, norm_0, conv_1, norm_1, classifier)."""

  def __init__(self, rngs: nnx.Rngs = None):
    rngs = rngs or nnx.Rngs(0)
    self.stem = nnx.Conv(1, 16, (3, 3), rngs=rngs)
    self.conv_0 = nnx.Conv(16, 32, (3, 3), strides=2, rngs=rngs)
    self.norm_0 = nnx.LayerNorm(32, rngs=rngs)
    self.conv_1 = nnx.Conv(32, 64, (3, 3), strides=2, rngs=rngs)
    self.norm_1 = nnx.LayerNorm(64, rngs=rngs)
    self.classifier = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.stem(x))
    x = nnx.relu(self.norm_0(self.conv_0(x)))
    x = nnx.relu(self.norm_1(self.conv_1(x)))
    return self.classifier(x.mean(axis=(1, 2)))


MODELS = {'linen': Net, 'nnx': NNXNet}  # --api

RULES = [quant.Rule(module_path='stem|classifier', method='fp'),
         quant.Rule(module_path='conv_.*', scale_granularity='channel')]


def smoothed_cross_entropy(logits, labels, smoothing: float = 0.1):
  targets = optax.smooth_labels(jnp.eye(logits.shape[-1])[labels], smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def make_data() -> dict:
  """Fashion-MNIST as arrays (any (images, labels) arrays or random-access source would do)."""
  images, labels = datasets.load_fashion_mnist('train')
  test_images, test_labels = datasets.load_fashion_mnist('test')
  return {'train': (images, labels), 'test': (test_images, test_labels), 'mean': (72.94,), 'std': (90.02,)}


def make_config(smoke: bool = False):
  config = fashion_mnist.get_config('smoke' if smoke else '')
  config.optimizer, config.learning_rate, config.warmup_epochs = 'adam', 1e-3, 0.0
  config.bn_recalibration_batches, config.target_accuracy, config.fp_warmup_epochs = 0, 0.0, 0.0
  config.ternary_kernel_lr_multiplier = 1.0
  config.quant.scale_init = 'mean_abs'  # no batch norm after the convs: start the scales at the kernels' size
  config.num_epochs = 1.0
  if smoke:
    config.mesh_shape, config.compilation_cache_dir = (1, 1), ''
  return config


def run(workdir: str, smoke: bool = False, api: str = 'linen') -> dict:
  if api not in MODELS:
    raise ValueError(f'api={api!r} is unknown: allowed are {", ".join(MODELS)}')
  make_model = MODELS[api]
  data, config = make_data(), make_config(smoke)
  fp_config = config.copy_and_resolve_references()
  fp_config.quant.method = 'fp'
  fp_dir, ttq_dir = os.path.join(workdir, 'fp'), os.path.join(workdir, 'ttq')
  fp = train.train_and_evaluate(fp_config, fp_dir, model=make_model(), data=data, loss_fn=smoothed_cross_entropy)

  model = quant.quantize(make_model(), RULES)
  config.init_from = fp_dir
  ttq = train.train_and_evaluate(config, ttq_dir, model=model, data=data, loss_fn=smoothed_cross_entropy)
  summary = export.export_workdir(config, ttq_dir, model=model, data=data)
  config.restore_from = summary['path']
  from_file = evaluation.evaluate_workdir(config, ttq_dir, model=model, data=data, loss_fn=smoothed_cross_entropy)
  print(f'\nfull precision {fp["top1_accuracy"]:.2%} -> TTQ {ttq["top1_accuracy"]:.2%} (export file: '
        f'{from_file["top1_accuracy"]:.2%}, {summary["ternary_compression"]:.1f}x smaller ternary layers)')
  return {'fp': fp, 'ttq': ttq, 'export': summary, 'from_file': from_file}


if __name__ == '__main__':
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--smoke', action='store_true')
  parser.add_argument('--api', choices=sorted(MODELS), default='linen', help='the Flax API of the model')
  args = parser.parse_args()
  run(args.workdir, args.smoke, args.api)
