r"""Base of the ImageNet rows (TTQ paper, Tables 2-3), trained from scratch as the official AlexNet log.

Adam lr 1e-4, eps 1e-5; lr 2e-5 at epoch 56 and 4e-6 at epoch 64; 64-80 epochs; batch 128 (32 on each
of 4 GPUs); weight decay 5e-6 on fully-connected weights only; short side to U[224, 308] with aspect
jitter 0.85-1.15, random 224 crop, flip. First conv and last FC full precision.
"""

from configs import base


def get_config(model: str, arg: str = ''):
  config = base.get_config()
  config.model.name = model
  config.data.name = 'imagenet2012'
  config.data.num_threads = 16
  config.batch_size = 128
  config.eval_batch_size = 500
  config.num_epochs = 80.0
  config.optimizer = 'adam'
  config.learning_rate = 1e-4
  config.adam_eps = 1e-5
  config.lr_schedule = 'piecewise'
  config.lr_boundaries_epochs = (56.0, 64.0)
  config.lr_values = (2e-5, 4e-6)
  config.weight_decay = 5e-6
  config.weight_decay_regex = r'Dense_\d+/kernel$'  # FC weights only (TernaryDense_* and Dense_*)
  config.scale_optimizer = 'same'  # the official code trains W_p / W_n with the same Adam
  config.quant.t = 0.05
  config.bn_recalibration_batches = 100
  config.log_every_steps = 500
  config.eval_every_steps = 10_000
  config.checkpoint_every_steps = 5_000
  config.dtype = 'bfloat16'
  if arg == 'fp':
    config.quant.method = 'fp'
  elif arg == 'twn':
    config.quant.method = 'twn'
  elif arg == 'runlocal':
    config.num_train_steps = 4
    config.batch_size = 8
    config.eval_batch_size = 8
    config.data.limit_examples = 16
    config.log_every_steps = 2
    config.eval_every_steps = 0
    config.bn_recalibration_batches = 1
    config.dtype = 'float32'
    config.model.name = f'{model}_tiny' if model == 'alexnet' else model
  elif arg:
    raise ValueError(f'config argument {arg!r} is unknown: allowed are fp, twn, runlocal')
  return config
