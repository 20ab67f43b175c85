"""The paper's table rows (Zhu et al. 2017, Tables 1-2) as research data next to their configs: the config of
each row, the error the paper prints, and the official value of each recipe field (`ttq_jax.recipes.FIELDS`)
with the file it comes from (the authors' `czhu95/ternarynet` scripts and training logs; fb.resnet.torch for
the ResNet-18 FP row). `experiments/reproduce.py --table paper` runs them, `--describe` compares each with
`ttq_jax.recipes.describe(config)` (docs/recipes.md).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from ttq_jax import recipes


def load_config(spec: str):
  """`configs/NAME.py[:ARG]` -> its ConfigDict."""
  path, _, arg = spec.partition(':')
  module = path.removesuffix('.py').replace('/', '.')
  return importlib.import_module(module).get_config(arg)


# --------------------------------------------------------------------------- the paper's rows

TF = 'czhu95/ternarynet examples/Ternary-Net/'
CIFAR_SCRIPT, CIFAR_LOG = TF + 'tw-cifar10-resnet.py', TF + 'train_log/cifar10-resnet-20-finetune.log'
FP_SCRIPT = 'czhu95/ternarynet examples/ResNet/cifar10-resnet.py'
ALEX_SCRIPT, ALEX_LOG = TF + 'tw-imagenet-alexnet.py', TF + 'train_log/alexnet-imagenet-scratch.log'
FB = 'facebook/fb.resnet.torch (train.lua, opts.lua, datasets/imagenet.lua)'


@dataclasses.dataclass(frozen=True)
class PaperRow:
  name: str
  config: str                     # configs/NAME.py[:ARG]
  paper_error: str                # as printed in the paper (top-1, or top-1 / top-5)
  needs_data: str
  init_from_row: str = ''         # fine-tuned from this row's checkpoint
  official: dict = dataclasses.field(default_factory=dict)  # field -> (value, source)


def _tensorpack_bn() -> dict:
  bn = 'czhu95/ternarynet tensorpack/models/batch_norm.py'
  return {'bn_unbiased_variance': (True, f'{bn}: "batch_var * mul  # use unbiased variance estimator in training", '
                                         'mul = N / (N - 1); the EMA averages the biased batch_var'),
          'bn_bias_init': ('uniform_unit_scaling', f"{bn}: tf.get_variable('beta', [n_out]) without an initializer: TF "
                                                   '0.x uses uniform_unit_scaling_initializer(), U(-sqrt 3, sqrt 3) for 1-D')}


def _cifar_layers(n: int) -> list[str]:
  convs = [f'res{s}_{b}/conv{c}/kernel' for s in (1, 2, 3) for b in range(n) for c in (1, 2)]
  return sorted(convs + ['linear/kernel'])


def _cifar_official(n: int, fp: bool) -> dict:
  log = CIFAR_LOG if n == 3 else CIFAR_SCRIPT + ' (the ResNet-20 log\'s schedule: no log for this depth)'
  ternary = [] if fp else _cifar_layers(n)
  decay = sorted(['conv0/kernel'] + (_cifar_layers(n) if fp else
                                     [p.replace('/kernel', f'/{x}') for p in ternary for x in ('kernel', 'w_p', 'w_n')]))
  sgd = lambda lr: {'name': 'sgd', 'learning_rate': lr, 'momentum': 0.9, 'nesterov': False}
  base = 0.01 if fp else 2e-4
  script = FP_SCRIPT if fp else CIFAR_SCRIPT
  out = {
      'global_batch_size': (256, f'{script}: BATCH_SIZE = 128 per GPU; TTQ log: "Training a model of 2 tower"'),
      'total_steps': (156_000, f'{log}: 400 epochs x 390 steps ("Start training with global_step=156000" at load)'),
      'lr_boundaries_steps': ([390, 31_980, 47_970, 117_000],
                              f'{log}: "learning_rate at epoch 2 / 83 / 124 / 301 will change"' if not fp else
                              f'{FP_SCRIPT}: ScheduledHyperParamSetter [(1, 0.1), (82, 0.01), (123, 0.001), (300, '
                              '0.0002)], applied from the epoch after each number as the TTQ log shows'),
      'lr_values': ([0.1, 0.01, 0.001, 0.0002], f'{log}: learning_rate lines' if not fp else FP_SCRIPT),
      'base_learning_rate': (base, f'{log}: epoch 1 "learning_rate: 0.0002" (restored with the FP checkpoint)'
                             if not fp else f'{FP_SCRIPT}: tf.Variable(0.01, name=\'learning_rate\')'),
      'weight_optimizer': (sgd(base), f'{script}: tf.train.MomentumOptimizer(lr, 0.9)'),
      'scale_optimizer': (None if fp else sgd(base), f'{CIFAR_SCRIPT}: one optimizer for every trainable variable'),
      'weight_decay': (2e-4, f'{script}: exponential_decay(0.0002, step, 480000, 0.2) (not reached)'),
      'weight_decay_params': (decay, f'{CIFAR_LOG if not fp else script}: "Apply regularizer for ..." (regex .*/W)'),
      'ternary_layers': (ternary, f'{CIFAR_SCRIPT}: every W but conv0 (and fct: no such layer)'),
      'full_precision_layers': (sorted(['conv0/kernel'] + (_cifar_layers(n) if fp else [])), script),
      'warm_start': ('none' if fp else 'required', f'{CIFAR_LOG}: Argv --load ../ResNet/train_log/cifar10-resnet-20'),
      'normalize_init': (False, TF + 'ternary.py: tw_ternarize uses the weights as loaded'),
      'threshold': (None if fp else 'max', TF + 'ternary.py: tw_ternarize, thre_x = reduce_max(abs(x)) * thre'),
      'threshold_t': (None if fp else 0.05, f'{CIFAR_SCRIPT}: --t default 0.05 (not set in the log\'s Argv)'),
      'threshold_k': (None, TF + 'ternary.py: no mean rule'),
      'activations': (None if fp else 'float', TF + 'ternary.py: tw_ternarize quantizes the weights only'),
      'dtype': ('float32', 'TF 0.x float32'),
      **_tensorpack_bn(),
  }
  return out


def _alexnet_official(method: str) -> dict:
  fc_ternary = ['fc0/kernel', 'fc1/kernel']
  ternary = [] if method == 'fp' else sorted([f'conv{i}/kernel' for i in (1, 2, 3, 4)] + fc_ternary)
  decay = sorted(['fct/kernel', *fc_ternary] + ([] if method != 'ttq' else ['fc0/w_n', 'fc0/w_p', 'fc1/w_n', 'fc1/w_p']))
  adam = {'name': 'adam', 'learning_rate': 1e-4, 'momentum': None, 'nesterov': False}
  src = ALEX_LOG if method == 'ttq' else ALEX_SCRIPT + ' (no log for this method: the TTQ log\'s settings)'
  return {
      'global_batch_size': (128, f'{ALEX_SCRIPT}: BATCH_SIZE = 32 per GPU; log: "Training a model of 4 tower"'),
      'total_steps': (800_000, f'{src}: "Epoch 80 (global_step 800000) finished" (script: max_epoch=100)'),
      'lr_boundaries_steps': ([560_000, 640_000], f'{src}: "learning_rate at epoch 57 / 65 will change"'),
      'lr_values': ([2e-5, 4e-6], f'{ALEX_SCRIPT}: ScheduledHyperParamSetter [(56, 2e-5), (64, 4e-6)]'),
      'base_learning_rate': (1e-4, f'{ALEX_SCRIPT}: tf.Variable(1e-4)'),
      'weight_optimizer': (adam, f'{ALEX_SCRIPT}: AdamOptimizer(lr, epsilon=1e-5)'),
      'scale_optimizer': (adam if method == 'ttq' else None, f'{ALEX_SCRIPT}: one optimizer for every variable'),
      'weight_decay': (5e-6, f"{ALEX_SCRIPT}: regularize_cost('fc.*/W', l2_regularizer(5e-6))"),
      'weight_decay_params': (decay, f'{ALEX_LOG}: "Apply regularizer for fc0/W, fc0/Wp, fc0/Wn, ..., fct/W"'),
      'ternary_layers': (ternary, f"{ALEX_SCRIPT}: every W but conv0 and fct"),
      'full_precision_layers': (sorted(['conv0/kernel', 'fct/kernel'] + ([] if ternary else fc_ternary + [
          f'conv{i}/kernel' for i in (1, 2, 3, 4)])), ALEX_SCRIPT),
      'warm_start': ('none', f'{ALEX_LOG}: trained from scratch (no --load)'),
      'normalize_init': (False, TF + 'ternary.py'),
      'threshold': ({'fp': None, 'ttq': 'max', 'twn': 'mean'}[method],
                    TF + 'ternary.py (TTQ); TWN: Li & Liu 2016, delta = 0.7 * mean|w|'),
      'threshold_t': (0.049 if method == 'ttq' else None, f'{ALEX_LOG}: Argv --t 0.049'),
      'threshold_k': (0.7 if method == 'twn' else None, 'TWN: Li & Liu 2016, Eq. 8'),
      'activations': (None if method == 'fp' else 'float', TF + 'ternary.py: weights only; activations float32'),
      'dtype': ('float32', 'TF 0.x float32'),
      **_tensorpack_bn(),
  }


def _resnet18_fp_official() -> dict:
  sgd = {'name': 'sgd', 'learning_rate': 0.1, 'momentum': 0.9, 'nesterov': True}
  return {
      'global_batch_size': (256, f'{FB}: -batchSize 256'),
      'total_steps': (90 * 5005, f'{FB}: 90 epochs; torch keeps the last partial batch (5,005 per epoch)'),
      'lr_boundaries_steps': ([30 * 5005, 60 * 5005], f'{FB}: lr * 0.1^floor((epoch - 1) / 30)'),
      'lr_values': ([0.01, 0.001], FB),
      'base_learning_rate': (0.1, FB),
      'weight_optimizer': (sgd, f'{FB}: optim.sgd nesterov=true, dampening=0'),
      'scale_optimizer': (None, 'full precision'),
      'weight_decay': (1e-4, f'{FB}: -weightDecay 1e-4 on the flattened parameters (BN and biases too)'),
      'warm_start': ('none', FB),
      'dtype': ('float32', FB),
  }


PAPER_ROWS: list[PaperRow] = []
for _n, (_fp, _ttq) in {3: ('8.23', '8.87'), 5: ('7.67', '7.63'), 7: ('7.18', '7.02'), 9: ('6.80', '6.44')}.items():
  _d = 6 * _n + 2
  PAPER_ROWS.append(PaperRow(f'ResNet-{_d} CIFAR-10 FP', f'configs/resnet{_d}_cifar10.py:fp', _fp, 'cifar10',
                             official=_cifar_official(_n, fp=True)))
  PAPER_ROWS.append(PaperRow(f'ResNet-{_d} CIFAR-10 TTQ', f'configs/resnet{_d}_cifar10.py', _ttq, 'cifar10',
                             init_from_row=f'ResNet-{_d} CIFAR-10 FP', official=_cifar_official(_n, fp=False)))
PAPER_ROWS += [
    PaperRow('AlexNet ImageNet FP', 'configs/alexnet_imagenet.py:fp', '42.8 / 19.7', 'imagenet2012',
             official=_alexnet_official('fp')),
    PaperRow('AlexNet ImageNet TWN', 'configs/alexnet_imagenet.py:twn', '45.5 / 23.2', 'imagenet2012',
             official=_alexnet_official('twn')),
    PaperRow('AlexNet ImageNet TTQ', 'configs/alexnet_imagenet.py', '42.5 / 20.3', 'imagenet2012',
             official=_alexnet_official('ttq')),
    PaperRow('ResNet-18 ImageNet FP', 'configs/resnet18_imagenet.py:fp', '30.4 / 10.8', 'imagenet2012',
             official=_resnet18_fp_official()),
    PaperRow('ResNet-18 ImageNet TWN', 'configs/resnet18_imagenet.py:twn', '34.7 / -', 'imagenet2012',
             init_from_row='ResNet-18 ImageNet FP'),
    PaperRow('ResNet-18 ImageNet TTQ', 'configs/resnet18_imagenet.py', '33.4 / 12.8', 'imagenet2012',
             init_from_row='ResNet-18 ImageNet FP'),
]


def describe_row(row: PaperRow) -> dict[str, Any]:
  return {'name': row.name, 'config': row.config, **recipes.describe(load_config(row.config))}
