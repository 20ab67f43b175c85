r"""Base of the CIFAR-10 rows (TTQ paper, Table 1): the official `tw-cifar10-resnet.py` recipe, as its log
`train_log/cifar10-resnet-20-finetune.log` shows it ran.

The official run: 2 GPUs (SyncMultiGPUTrainer), 128 images each (global batch 256, gradients averaged, BN
statistics per GPU); a logged "epoch" = 390 steps (two passes over the 50k images); 400 epochs = 156,000
steps. TTQ fine-tunes the FP checkpoint (`--load`, global_step 156000): the first logged epoch runs at the
FP run's final rate 2e-4, then 0.1, x0.1 after logged epochs 82 and 123, 2e-4 after 300 (the committed
script says 0.0001 after 150; the log shows 300 / 2e-4). Momentum SGD 0.9 (no Nesterov) for weights *and*
W_p / W_n; L2 2e-4 (`regularize_cost('.*/W')`: every kernel and every Wp / Wn); scales start at 1.0; no
kernel normalisation at the switch; `conv0` full precision, `linear` ternary (its bias full precision);
threshold t = 0.05 of max |w|; eval on the test split after every logged epoch with the running BN
statistics. Batch norm as tensorpack's `BatchNorm` (models/batch_norm.py of the authors' copy): decay 0.9,
epsilon 1e-5, training groups normalised with the unbiased variance (x 128 / 127; the moving average keeps
the biased one), `beta` created without an initializer, i.e. TF 0.x's `get_variable` default
`uniform_unit_scaling_initializer()`, U(-sqrt 3, sqrt 3) for a 1-D variable (the code runs on TF 0.x only:
`tf.select`, `tf.mul`, `tf.scalar_summary`). The FP twin is tensorpack's `examples/ResNet/cifar10-resnet.py`:
`learning_rate` starts as `tf.Variable(0.01)` and its schedule's `(1, 0.1)` takes effect from logged epoch 2
(the semantics that make the TTQ log run epoch 1 at 0.0002), so the twin runs its first 390 steps at 0.01,
then 0.1, x0.1 after 82 and 123, 2e-4 after 300.

Deviations (named): per-channel mean/std input normalisation instead of the per-pixel mean image and
x / 128 - 1; the running BN averages are the mean over the two 128-image groups (tensorpack kept GPU 0's);
the L2 coefficient's exponential decay (x0.2 at step 480,000) is never reached and left out; the FP
twin's GPU count is not logged (2 assumed, as the TTQ run). BN re-estimation is reported as a second
column, never mixed into the running-statistics one.
"""

from configs import base

STEPS_PER_EPOCH = 390  # logged epoch: 390 steps of 2 x 128 images


def get_config(model: str, arg: str = ''):
  config = base.get_config()
  config.model.name = model
  config.model.bn_ghost_batch_size = 128
  config.model.bn_unbiased_variance = True             # tensorpack BatchNorm (see the docstring)
  config.model.bn_bias_init = 'uniform_unit_scaling'
  config.data.name = 'cifar10'
  config.data.crop_padding = 4
  config.batch_size = 256
  config.eval_batch_size = 1000
  config.steps_per_epoch = STEPS_PER_EPOCH
  config.num_epochs = 400.0
  config.optimizer = 'sgd'
  config.nesterov = False
  config.momentum = 0.9
  config.scale_optimizer = 'same'
  config.ternary_kernel_lr_multiplier = 1.0
  config.lr_schedule = 'piecewise'
  config.learning_rate = 2e-4  # the first logged epoch: the FP checkpoint's last rate
  config.lr_boundaries_epochs = (1.0, 82.0, 123.0, 300.0)
  config.lr_values = (0.1, 0.01, 0.001, 0.0002)
  config.weight_decay = 2e-4
  config.weight_decay_regex = r'(kernel|w_p|w_n)$'
  config.quant.t = 0.05
  config.quant.full_precision_layers = 'conv0'
  config.quant.scale_init = 'constant'
  config.quant.w_p_init = config.quant.w_n_init = 1.0
  config.normalize_init = False
  config.warm_start_config = f'configs/{model}_cifar10.py:fp'  # refuses to train TTQ from scratch
  config.init_from = ''            # --config.init_from=WORKDIR of the :fp run
  config.dtype = 'float32'
  config.bn_recalibration_batches = 50  # the second column only
  config.log_every_steps = 100
  config.eval_every_steps = STEPS_PER_EPOCH
  config.checkpoint_every_steps = STEPS_PER_EPOCH * 5
  if arg == 'fp':
    config.quant.method = 'fp'
    config.learning_rate = 0.01  # tf.Variable(0.01); the schedule's (1, 0.1) applies from logged epoch 2

  elif arg == 'twn':  # not an official run: TWN under the same fine-tuning recipe
    config.quant.method = 'twn'
  elif arg == 'bf16':
    config.dtype = 'bfloat16'
  elif arg == 'runlocal':  # a laptop-sized sanity run of the real pipeline: 2 FP + 2 TTQ steps
    config.num_train_steps = 4
    config.steps_per_epoch = 2
    config.fp_warmup_epochs = 1.0
    config.batch_size = 16
    config.model.bn_ghost_batch_size = 8
    config.eval_batch_size = 16
    config.data.limit_examples = 32
    config.log_every_steps = 2
    config.bn_recalibration_batches = 1
    config.eval_every_steps = 0
  elif arg:
    raise ValueError(f'config argument {arg!r} is unknown: allowed are fp, twn, bf16, runlocal')
  return config
