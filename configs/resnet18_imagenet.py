r"""TTQ ResNet-18 on ImageNet (paper, Table 3): top-1 / top-5 error 33.4 / 12.8%; full precision 30.4 / 10.8%.

    python -m ttq_jax.main --config configs/resnet18_imagenet.py:fp --workdir workdirs/resnet18_fp
    python -m ttq_jax.main --config configs/resnet18_imagenet.py --workdir workdirs/resnet18_ttq \
        --config.init_from=workdirs/resnet18_fp

No official TTQ recipe exists for this row (no script, no log). The `:fp` twin is the fb.resnet.torch model
the paper compares with: batch 256, SGD lr 0.1 momentum 0.9 with Nesterov (fb.resnet.torch's optimState),
L2 1e-4 on every parameter (torch's `weightDecay` covers BN and biases too), 90 epochs, lr /10 after 30 and
60; random-sized crops (8-100% area, aspect 3/4-4/3, bicubic) and flips; v1 basic blocks with projection
shortcuts (type B), He fan-out init, BN eps 1e-5. Left out of the fb.resnet.torch recipe: colour jitter
(brightness / contrast / saturation 0.4) and PCA lighting noise; the eval resize does not enlarge images
whose short side is under 256 (the TTQ scripts' eval transform); an epoch is 5,004 full batches (torch
also runs the last partial one: 5,005), so the rate drops after 150,120 / 300,240 steps, not 150,150 /
300,300 (docs/recipes.md marks these as differing).

The TTQ row's choices are ours, taken from the official TTQ code where it has one: fine-tuning from the
`:fp` checkpoint (required, as the CIFAR rows); the `:fp` schedule and augmentation again (90 epochs);
W_p / W_n trained by the same SGD and decayed like every parameter (as the official CIFAR code); scales
from 1.0; no kernel normalisation; t = 0.05; first conv and last dense full precision (paper, Sec. 5.2).
"""

from configs import imagenet_base


def get_config(arg: str = ''):
  config = imagenet_base.get_config('resnet18', arg)
  config.data.train_crop = 'inception'
  config.model.bn_ghost_batch_size = 0
  config.batch_size = 256
  config.steps_per_epoch = -1  # passes over the 1,281,167 images: 5,004 steps
  config.num_epochs = 90.0
  config.optimizer = 'sgd'
  config.nesterov = True
  config.momentum = 0.9
  config.learning_rate = 0.1
  config.lr_boundaries_epochs = (30.0, 60.0)
  config.lr_values = (0.01, 0.001)
  config.weight_decay = 1e-4
  config.weight_decay_regex = '.*'
  config.scale_optimizer = 'same'
  config.quant.t = 0.05
  config.warm_start_config = 'configs/resnet18_imagenet.py:fp'
  config.eval_every_steps = 5_004
  if arg == 'runlocal':  # 2 FP + 2 TTQ steps
    config.batch_size = 8
    config.num_train_steps = 4
    config.steps_per_epoch = 2
    config.fp_warmup_epochs = 1.0
  return config
