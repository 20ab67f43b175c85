r"""Base of the ImageNet rows: the official TTQ AlexNet recipe (`tw-imagenet-alexnet.py` and its log);
`configs/alexnet_imagenet.py` says what it is and what deviates. ResNet-18 has its own recipe
(`configs/resnet18_imagenet.py`).
"""

from configs import base

STEPS_PER_EPOCH = 10_000  # the script's step_per_epoch: 10,000 steps of 4 x 32 images


def get_config(model: str, arg: str = ''):
  config = base.get_config()
  config.model.name = model
  config.model.bn_ghost_batch_size = 32
  config.data.name = 'imagenet2012'
  config.data.train_crop = 'ttq_alexnet'
  config.data.worker_processes = -1  # the host's cores less 2 (experiments/benchmark_input.py measures them)
  config.data.num_threads = 16
  config.batch_size = 128
  config.eval_batch_size = 500
  config.steps_per_epoch = STEPS_PER_EPOCH
  config.num_epochs = 80.0
  config.optimizer = 'adam'
  config.learning_rate = 1e-4
  config.adam_eps = 1e-5
  config.scale_optimizer = 'same'
  config.ternary_kernel_lr_multiplier = 1.0
  config.lr_schedule = 'piecewise'
  config.lr_boundaries_epochs = (56.0, 64.0)
  config.lr_values = (2e-5, 4e-6)
  config.weight_decay = 5e-6
  config.weight_decay_regex = r'^fc.*/(kernel|w_p|w_n)$'  # `fc.*/W` caught fc*/W, fc*/Wp, fc*/Wn
  config.quant.t = 0.05
  config.quant.full_precision_layers = 'edges'  # conv0 and fct
  config.quant.scale_init = 'constant'
  config.quant.w_p_init = config.quant.w_n_init = 1.0
  config.normalize_init = False
  config.dtype = 'float32'
  config.bn_recalibration_batches = 100  # the second column only
  config.log_every_steps = 500
  config.eval_every_steps = STEPS_PER_EPOCH
  config.checkpoint_every_steps = 5_000
  if arg == 'fp':
    config.quant.method = 'fp'
  elif arg == 'twn':
    config.quant.method = 'twn'
  elif arg == 'bf16':
    config.dtype = 'bfloat16'
  elif arg == 'runlocal':
    config.num_train_steps = 4
    config.steps_per_epoch = -1
    config.batch_size = 8
    config.model.bn_ghost_batch_size = 4
    config.eval_batch_size = 8
    config.data.limit_examples = 16
    config.log_every_steps = 2
    config.eval_every_steps = 0
    config.bn_recalibration_batches = 1
    config.model.name = f'{model}_tiny' if model == 'alexnet' else model
  elif arg:
    raise ValueError(f'config argument {arg!r} is unknown: allowed are fp, twn, bf16, runlocal')
  return config
