r"""TTQ ResNet-32 on CIFAR-10 (paper, Table 1): test error 7.63% ternary, 7.67% full precision.

First the full-precision twin, then the ternary fine-tune from it (the official recipe; the TTQ config
refuses to start without `init_from`):

    python -m ttq_jax.main --config configs/resnet32_cifar10.py:fp --workdir workdirs/resnet32_fp
    python -m ttq_jax.main --config configs/resnet32_cifar10.py --workdir workdirs/resnet32_ttq \
        --config.init_from=workdirs/resnet32_fp

Only the ResNet-20 run has an official log; deeper rows use its recipe (the paper: same setup).

Needs CIFAR-10 as ArrayRecord (README, "Datasets") and an accelerator: 156,000 steps of batch 256 each.
The recipe and its deviations: `configs/cifar10_base.py`, `docs/recipes.md`.
Variants: `:fp`, `:twn` (TWN, same recipe), `:bf16` (bfloat16 compute), `:runlocal` (4 steps on a subset).
"""

from configs import cifar10_base


def get_config(arg: str = ''):
  return cifar10_base.get_config('resnet32', arg)
