r"""TTQ ResNet-32 on CIFAR-10 (paper, Table 1): test error 7.63% ternary, 7.67% full precision.

First the full-precision twin, then the ternary fine-tune from it (as the paper did):

    python -m ttq_jax.main --config configs/resnet32_cifar10.py:fp --workdir workdirs/resnet32_fp
    python -m ttq_jax.main --config configs/resnet32_cifar10.py --workdir workdirs/resnet32_ttq \
        --config.init_from=workdirs/resnet32_fp

Needs CIFAR-10 as ArrayRecord (README, "Datasets") and an accelerator; 400 epochs of batch 256.
Variants: `:twn` (TWN baseline), `:runlocal` (4 steps on a subset).
"""

from configs import cifar10_base


def get_config(arg: str = ''):
  return cifar10_base.get_config('resnet32', arg)
