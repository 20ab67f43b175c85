r"""TTQ ResNet-56 on CIFAR-10 (paper, Table 1): test error 6.44% ternary, 6.80% full precision.

First the full-precision twin, then the ternary fine-tune from it (as the paper did):

    python -m ttq_jax.main --config configs/resnet56_cifar10.py:fp --workdir workdirs/resnet56_fp
    python -m ttq_jax.main --config configs/resnet56_cifar10.py --workdir workdirs/resnet56_ttq \
        --config.init_from=workdirs/resnet56_fp

Needs CIFAR-10 as ArrayRecord (README, "Datasets") and an accelerator; 400 epochs of batch 256.
Variants: `:twn` (TWN baseline), `:runlocal` (4 steps on a subset).
"""

from configs import cifar10_base


def get_config(arg: str = ''):
  return cifar10_base.get_config('resnet56', arg)
