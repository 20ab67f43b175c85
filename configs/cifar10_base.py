r"""Base of the CIFAR-10 rows (TTQ paper, Table 1): pre-activation ResNet fine-tuned from full precision.

The official scripts: SGD momentum 0.9, weight decay 2e-4, batch 256 (128 on each of 2 GPUs), lr 0.1,
x0.1 at epochs ~80 and ~120, 2e-4 at ~300, up to 400 epochs; pad 40x40, random 32x32 crop, flip.
The ternary run starts from a full-precision run of the same model (`init_from`).
"""

from configs import base


def get_config(model: str, arg: str = ''):
  config = base.get_config()
  config.model.name = model
  config.data.name = 'cifar10'
  config.data.crop_padding = 4
  config.batch_size = 256
  config.eval_batch_size = 1000
  config.num_epochs = 400.0
  config.optimizer = 'sgd'
  config.nesterov = False
  config.momentum = 0.9
  config.learning_rate = 0.1
  config.lr_schedule = 'piecewise'
  config.lr_boundaries_epochs = (80.0, 120.0, 300.0)
  config.lr_values = (0.01, 0.001, 0.0002)
  config.weight_decay = 2e-4
  config.decay_scales = True       # the official regex decayed W_p / W_n too
  config.quant.t = 0.05
  config.init_from = ''            # set to the FP run's workdir: --config.init_from=workdirs/resnet20_fp
  config.normalize_init = True     # the paper divides pretrained kernels by max|w|
  config.bn_recalibration_batches = 50
  config.log_every_steps = 100
  config.eval_every_steps = 390 * 10
  config.checkpoint_every_steps = 390 * 5
  if arg == 'fp':
    config.quant.method = 'fp'
    config.num_epochs = 160.0
    config.lr_boundaries_epochs = (80.0, 120.0)
    config.lr_values = (0.01, 0.001)
    config.normalize_init = False
  elif arg == 'twn':
    config.quant.method = 'twn'
  elif arg == 'runlocal':  # a laptop-sized sanity run on the real pipeline
    config.num_train_steps = 4
    config.batch_size = 16
    config.eval_batch_size = 16
    config.data.limit_examples = 32
    config.log_every_steps = 2
    config.bn_recalibration_batches = 1
    config.eval_every_steps = 0
  elif arg:
    raise ValueError(f'config argument {arg!r} is unknown: allowed are fp, twn, runlocal')
  return config
