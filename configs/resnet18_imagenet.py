r"""TTQ ResNet-18 on ImageNet (paper, Table 3): top-1 accuracy 66.6% (error 33.4 / 12.8%);
full precision 69.6%.

    python -m ttq_jax.main --config configs/resnet18_imagenet.py --workdir workdirs/resnet18_ttq

The paper gives no separate ResNet-18 recipe; this uses the AlexNet one (Adam, 80 epochs).
Variants: `:fp`, `:twn`, `:runlocal`.
"""

from configs import imagenet_base


def get_config(arg: str = ''):
  return imagenet_base.get_config('resnet18', arg)
