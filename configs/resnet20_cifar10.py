r"""TTQ ResNet-20 on CIFAR-10 (paper, Table 1): test error 8.87% ternary, 8.23% full precision.

First the full-precision twin, then the ternary fine-tune from it (the official recipe; the TTQ config
refuses to start without `init_from`):

    python -m ttq_jax.main --config configs/resnet20_cifar10.py:fp --workdir workdirs/resnet20_fp
    python -m ttq_jax.main --config configs/resnet20_cifar10.py --workdir workdirs/resnet20_ttq \
        --config.init_from=workdirs/resnet20_fp

The official log of this row (train_log/cifar10-resnet-20-finetune.log) ends at 9.25% test error, best 8.48%;
the paper reports 8.87%. `reproduce.py` reports final, best and mean of the last 5 evaluations.

Needs CIFAR-10 as ArrayRecord (README, "Datasets") and an accelerator: 156,000 steps of batch 256 each.
The recipe and its deviations: `configs/cifar10_base.py`, `docs/recipes.md`.
Variants: `:fp`, `:twn` (TWN, same recipe), `:bf16` (bfloat16 compute), `:runlocal` (4 steps on a subset).
"""

from configs import cifar10_base


def get_config(arg: str = ''):
  return cifar10_base.get_config('resnet20', arg)
