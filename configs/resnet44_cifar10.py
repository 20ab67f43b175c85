r"""TTQ ResNet-44 on CIFAR-10 (paper, Table 1): test error 7.02% ternary, 7.18% full precision.

First the full-precision twin, then the ternary fine-tune from it (the official recipe; the TTQ config
refuses to start without `init_from`):

    python -m ttq_jax.main --config configs/resnet44_cifar10.py:fp --workdir workdirs/resnet44_fp
    python -m ttq_jax.main --config configs/resnet44_cifar10.py --workdir workdirs/resnet44_ttq \
        --config.init_from=workdirs/resnet44_fp

Only the ResNet-20 run has an official log; deeper rows use its recipe (the paper: same setup).

Needs CIFAR-10 as ArrayRecord (README, "Datasets") and an accelerator: 156,000 steps of batch 256 each.
The recipe and its deviations: `configs/cifar10_base.py`, `docs/recipes.md`.
Variants: `:fp`, `:twn` (TWN, same recipe), `:bf16` (bfloat16 compute), `:runlocal` (4 steps on a subset).
"""

from configs import cifar10_base


def get_config(arg: str = ''):
  return cifar10_base.get_config('resnet44', arg)
