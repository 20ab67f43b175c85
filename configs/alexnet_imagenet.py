r"""TTQ AlexNet on ImageNet (paper, Table 2): top-1 / top-5 error 42.5 / 20.3% (full precision 42.8 /
19.7%). The official log (train_log/alexnet-imagenet-scratch.log) ends at 42.8% top-1 error, best 42.4%.

    python -m ttq_jax.main --config configs/alexnet_imagenet.py --workdir workdirs/alexnet_ttq

The official `tw-imagenet-alexnet.py` recipe as its log shows it ran (`--gpu 0,1,2,3 --t 0.049`, from
scratch): 4 GPUs x 32 images (global batch 128, BN statistics per 32), an epoch = 10,000 steps, 80 epochs
(the script allows 100; the log stops at 80) = 800,000 steps; tensorpack's BatchNorm (training batches
normalised with the unbiased variance x 32 / 31 of each 32-image group, moving averages of the biased one;
`beta` created without an initializer, so TF 0.x's default U(-sqrt 3, sqrt 3)); Adam (lr 1e-4, eps 1e-5) for weights *and*
W_p / W_n; lr 2e-5 after epoch 56, 4e-6 after 64; L2 5e-6 on `fc.*/W`: fc0, fc1 and fct kernels and the
Wp / Wn of fc0 and fc1; t = 0.049; conv0 and fct full precision; conv0 and the fc layers without bias
(fct with); BN epsilon 1e-4, decay 0.9; scales start at 1.0; float32. Training crops: short side to
[224, 308) with each axis jittered by its own factor in [0.85, 1.15], never enlarged past the original,
bicubic (OpenCV's INTER_CUBIC, as the script), random 224 crop, flip; eval: short side 256 (not enlarged),
center 224. JPEGs decoded by `data.worker_processes` processes (default: the host's cores less 2). Evaluated on the
validation set after every epoch (running BN statistics; re-estimation is a second column).

Deviations (named): per-channel mean/std input normalisation instead of the per-pixel mean image and
x / 255; the running BN averages are the mean over the four 32-image groups (tensorpack kept GPU 0's);
RGB channel order (the script read BGR with cv2.imread).
Needs imagenet2012 as ArrayRecord (README, "Datasets") and accelerators.
Variants: `:fp` (full precision), `:twn` (TWN, same recipe), `:bf16` (bfloat16 compute), `:runlocal` (4 steps
of a tiny AlexNet: try it on generated JPEGs, `python -c "from ttq_jax import imagenet_like;
imagenet_like.write('/tmp/imagenet_like', train_examples=64, validation_examples=32)"`, then
`--config.data.data_dir=/tmp/imagenet_like`).
"""

from configs import imagenet_base


def get_config(arg: str = ''):
  config = imagenet_base.get_config('alexnet', arg)
  config.model.bn_unbiased_variance = True             # tensorpack BatchNorm: batch_var * N / (N - 1) in training
  config.model.bn_bias_init = 'uniform_unit_scaling'   # its `beta` without an initializer (TF 0.x default)
  if arg != 'runlocal':
    config.quant.t = 0.049  # the log's `--t 0.049` (the script's default is 0.05)
  return config
