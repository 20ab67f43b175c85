"""Defaults shared by every experiment; a row's config imports this and overrides what differs.

Every key is documented here (this file is the schema: `ttq_jax.config_check.validate` refuses keys that
are not here and checks values and choices). The config is returned locked.

The package reads the keys and their defaults from `ttq_jax/config_schema.json`, which this file writes
(`python -m configs.base` after adding or changing a key; tests/test_config_check.py fails until it matches),
so nothing in `ttq_jax/` imports `configs`.
"""

import json
import pathlib

import ml_collections

from ttq_jax.schema_config import Config  # a ConfigDict whose unknown keys are one-line errors


def get_config() -> Config:
  config = Config()
  config.seed = 0

  config.model = Config()
  config.model.name = 'resnet20'           # ttq_jax.models.MODELS
  config.model.bn_ghost_batch_size = 0     # > 0: BN statistics per group of N examples (the official per-GPU batch)
  config.model.bn_unbiased_variance = False  # BN normalises training groups with var x N / (N - 1) (tensorpack)
  config.model.bn_bias_init = 'zeros'     # zeros | uniform_unit_scaling (tensorpack's beta: U(-sqrt 3, sqrt 3))
  # Sizes of models that have these fields (ViT, lm_decoder); 0 / '' = the model's own (models.MODELS)
  config.model.depth = 0                   # blocks
  config.model.width = 0                   # residual stream width
  config.model.num_heads = 0
  config.model.mlp_width = 0               # lm_decoder: the gated MLP's hidden width
  config.model.activation = ''             # lm_decoder: silu (SwiGLU) | relu2 (BitNet 2B4T's squared ReLU)

  config.data = Config()
  config.data.name = 'cifar10'             # fashion_mnist | cifar10 | imagenet2012 | python_docs (text)
  config.data.data_dir = ''                # '' = default place (see README, "Datasets")
  config.data.crop_padding = 4             # random crop after zero padding (CIFAR: 40x40 -> 32x32)
  config.data.random_flip = True
  config.data.train_crop = 'ttq_alexnet'   # ImageNet: ttq_alexnet (official TTQ AlexNet) | inception (fb.resnet.torch)
  config.data.limit_examples = 0           # > 0: use only the first N examples of each split
  config.data.validation_examples = 0      # > 0: hold out N training examples (fixed seed) for model choices
  config.data.user_dataset = ''            # your own data (data=...): its facts as JSON, set by ttq_jax
  config.data.seq_len = 256                # text datasets (python_docs): bytes a training / evaluation window predicts
  # Input worker processes (decode and augment, one batch at a time each); -1: the host's cores less 2 (the
  # ImageNet default). 0: `num_threads` threads of the training process, enough for the in-memory, vectorised
  # Fashion-MNIST / CIFAR batches.
  config.data.worker_processes = 0
  config.data.num_threads = 4              # grain reader threads of the training process (0 workers)
  config.data.prefetch_batches = 2         # batches put on the device ahead of the step

  config.quant = Config()
  # The scale rule (ttq_jax.quant.METHODS): ttq (trained W_p / W_n) | twn (analytic alpha) | bitnet (BitNet b1.58's
  # absmean, its own threshold only) | paretoq (ParetoQ's trained alpha, no threshold rule) | fp
  config.quant.method = 'ttq'
  # Module-path regex (whole path) of the layers kept full precision; every other layer with a kernel is
  # ternary. 'edges' = the model's first and last layer (models.EDGE_LAYERS); '' = none.
  config.quant.full_precision_layers = 'edges'
  # The threshold rule (ttq_jax.quant.THRESHOLDS): None = the method's own (ttq: max with t; twn: mean with k;
  # bitnet: absmean); for ttq and twn: max (delta = t * max|w|) | mean (delta = k * mean|w|) | sparsity (a fixed
  # zero fraction).
  config.quant.threshold = ml_collections.config_dict.placeholder(str)
  config.quant.t = 0.05                    # paper: 0.05
  config.quant.k = 0.7                     # TWN: 0.7
  config.quant.sparsity = 0.5              # zero fraction for threshold = sparsity
  config.quant.w_p_init = 1.0              # official code: 1.0
  config.quant.w_n_init = 1.0
  # How trained scales start at the switch to ternary (quant.SCALE_INITS): None = the method's own (ttq: constant;
  # paretoq: max_abs); ttq: constant (w_p_init / w_n_init) | mean_abs (mean |w| per sign); paretoq: max_abs only
  config.quant.scale_init = ml_collections.config_dict.placeholder(str)
  config.quant.positive_scales = False     # forward uses |w_p|, |w_n| (official code: no guard)
  # The input of each quantized layer: float (as it comes) | int8 (BitNet b1.58's 8-bit absmax per position)
  config.quant.activations = 'float'
  # tensor (one scale set per layer) | channel (per output feature: TTQ's w_p / w_n, TWN's threshold and alpha,
  # BitNet's absmean, ParetoQ's alpha)
  config.quant.scale_granularity = 'tensor'

  config.dtype = 'float32'                 # float32 | bfloat16 (activations and ternary kernels)
  config.batch_size = 128                  # global
  config.eval_batch_size = 1000            # global
  config.num_epochs = 1.0
  config.num_train_steps = -1              # > 0 overrides num_epochs
  config.steps_per_epoch = -1              # > 0: an epoch is N steps (as a reference log counted them)

  config.optimizer = 'sgd'                 # sgd | adam | adamw (weight decay decoupled from the gradient)
  config.learning_rate = 0.1
  config.momentum = 0.9
  config.nesterov = True
  config.adam_eps = 1e-8
  config.lr_schedule = 'cosine'            # cosine | piecewise | constant
  config.lr_boundaries_epochs = (0.0,)     # piecewise: epochs at which the rate becomes lr_values[i]
  config.lr_values = (0.1,)
  config.warmup_epochs = 0.0
  config.warmup_steps = 0                  # > 0 overrides warmup_epochs
  config.weight_decay = 1e-4               # L2 added to the gradient of matching params (adamw: decoupled)
  config.weight_decay_regex = r'kernel$'   # which params decay (slash-joined paths, searched; w_p / w_n too
                                           # if it matches them: r'(kernel|w_p|w_n)$' as the official CIFAR code)
  config.grad_clip_norm = 0.0              # > 0: clip the global gradient norm
  config.scale_optimizer = 'adam'          # adam (own optimizer for the trained scales: w_p / w_n, alpha) | same
  config.scale_learning_rate = 1e-3        # follows the main schedule's shape
  config.ternary_kernel_lr_multiplier = 1.0  # TTQ: x learning rate of the latent kernels (from the switch)

  config.fp_warmup_epochs = 0.0            # train full precision first, then ternarize (one run)
  config.fp_warmup_steps = 0               # > 0 overrides fp_warmup_epochs (short runs and tests)
  config.init_from = ''                    # workdir of a full-precision run to fine-tune from (fp_warmup_epochs = 0)
  config.warm_start_config = ''            # set: a TTQ run must start from a FP run of this config (init_from)
  config.normalize_init = False            # scale each quantized kernel to [-1, 1] at the switch
  config.bn_recalibration_batches = 0      # re-estimate BN statistics on N clean train batches

  config.log_every_steps = 50
  config.eval_every_steps = 0              # 0: evaluate at the end only
  config.target_accuracy = 0.0             # > 0: report when eval top-1 first reaches it (time to target)
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 3
  config.eval_step = -1                    # --mode eval/export: -1 = newest checkpoint
  config.restore_from = ''                 # --mode eval: a .safetensors export instead
  config.eval_dir = ''                     # --mode eval writes its results here ('' = WORKDIR/eval; not writable: stdout)
  config.allow_config_change = False       # resume in a workdir whose model/data config differs
  # one training process per workdir (WORKDIR/.lease; ttq_jax/lease.py). gs:// workdirs: the lease is renewed every
  # lease_renew_s and taken over after lease_timeout_s without renewal (or at once with take_over_lease)
  config.lease_renew_s = 30
  config.lease_timeout_s = 120
  config.take_over_lease = False

  config.mesh_shape = (-1, 1)
  config.mesh_axes = ('data', 'fsdp')

  config.export = Config()
  config.export.packing = '2bit'           # 2bit | base3
  # BN statistics the export carries: reestimated (those of the headline evaluation, re-estimated at export
  # time on the same clean training batches; needs the training data) | running (training's running averages)
  config.export.bn_statistics = 'reestimated'

  config.sample = Config()  # --mode sample (language models; may change for eval / sample)
  config.sample.prompt = 'The '            # the text the model continues
  config.sample.num_bytes = 200            # bytes to generate
  config.sample.temperature = 0.0          # 0 = greedy; > 0: sampled from softmax(logits / temperature)
  config.sample.seed = 0                   # the sampling key (temperature > 0)

  config.xla_cpu_ynn_fusion = 'auto'       # auto (per program, programs.CPU_PROGRAM_OPTIONS) | on | off
  config.compilation_cache_dir = 'default'  # '' = off; default = ~/.cache/ttq_jax/xla
  # Locked: every config derives from this one, so a key that is not here (a typo) is a one-line error in Python
  # as on the command line, naming close matches (`Config`); values of the keys above can still be set.
  config.lock()
  return config


def flat_defaults() -> dict:
  """{dotted key: default} of `get_config()`, tuples as JSON lists (what config_schema.json holds)."""
  def walk(d, prefix=''):
    for k, v in d.items():
      if isinstance(v, dict):
        yield from walk(v, f'{prefix}{k}.')
      else:
        yield f'{prefix}{k}', list(v) if isinstance(v, tuple) else v
  return dict(walk(get_config().to_dict()))


SCHEMA_PATH = pathlib.Path(__file__).resolve().parent.parent / 'ttq_jax' / 'config_schema.json'

if __name__ == '__main__':
  SCHEMA_PATH.write_text(json.dumps(flat_defaults(), indent=1, sort_keys=True) + '\n')
  print(f'wrote {SCHEMA_PATH} ({len(flat_defaults())} keys)')
