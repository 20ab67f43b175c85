r"""TTQ ResNet-20 on CIFAR-10 (paper, Table 1): test error 8.87% ternary, 8.23% full precision.

First the full-precision twin, then the ternary fine-tune from it (as the paper did):

    python -m ttq_jax.main --config configs/resnet20_cifar10.py:fp --workdir workdirs/resnet20_fp
    python -m ttq_jax.main --config configs/resnet20_cifar10.py --workdir workdirs/resnet20_ttq \
        --config.init_from=workdirs/resnet20_fp

Needs CIFAR-10 as ArrayRecord (README, "Datasets") and an accelerator; 400 epochs of batch 256.
Variants: `:twn` (TWN baseline), `:runlocal` (4 steps on a subset).
"""

from configs import cifar10_base


def get_config(arg: str = ''):
  return cifar10_base.get_config('resnet20', arg)
