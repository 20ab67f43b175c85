r"""TTQ AlexNet on ImageNet (paper, Table 2): top-1 / top-5 error 42.5 / 20.3% (full precision
42.8 / 19.7%; the official log ends at 42.8 / 20.7%, best top-1 42.4%).

    python -m ttq_jax.main --config configs/alexnet_imagenet.py --workdir workdirs/alexnet_ttq

Needs imagenet2012 as ArrayRecord (README, "Datasets"); 80 epochs of batch 128 on an accelerator.
Variants: `:fp` (the full-precision twin), `:twn`, `:runlocal`.
"""

from configs import imagenet_base


def get_config(arg: str = ''):
  return imagenet_base.get_config('alexnet', arg)
