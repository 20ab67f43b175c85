"""Training and evaluation of ternary networks (TTQ, Zhu et al. ICLR 2017): small pure functions.

`train_step` / `eval_step` are `(state, batch) -> (state, metrics)` / `(state, batch) -> metrics`,
jitted once over a device mesh (batch sharded, state replicated and donated).
`train_and_evaluate(config, workdir)` is the whole job; notebooks call the pieces directly.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import resource
import signal
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax.training import train_state

from ttq_jax import checkpoint as ckpt
from ttq_jax import config_check
from ttq_jax import input_pipeline
from ttq_jax import metric_writers
from ttq_jax import models
from ttq_jax import quant as quant_lib
from ttq_jax import sharding as sharding_lib

BN_MOMENTUM = models.BN_MOMENTUM
SCALE_NAMES = ('w_p', 'w_n')


class TrainState(train_state.TrainState):
  batch_stats: Any
  rng: jax.Array


class NonFiniteError(FloatingPointError):
  """Loss or gradients stopped being finite (reported as one line)."""


# --------------------------------------------------------------------------- construction


def quant_config(config) -> quant_lib.QuantConfig:
  return quant_lib.QuantConfig.from_mapping(config.quant)


def compute_dtype(config):
  return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[config.dtype]


def create_model(config, *, quantized: bool = True) -> nn.Module:
  """The configured model; `quantized=False` gives its full-precision twin (same param paths)."""
  info = input_pipeline.dataset_info(config.data.name)
  q = quant_config(config)
  if not quantized:
    q = quant_lib.QuantConfig(method='fp')
  return models.create_model(config.model.name, num_classes=info.num_classes, quant=q,
                             quantize_first_last=config.model.quantize_first_last, dtype=compute_dtype(config))


def steps_per_epoch(config) -> int:
  info = input_pipeline.dataset_info(config.data.name)
  n = info.train_size
  if config.data.limit_examples:
    n = min(n, config.data.limit_examples)
  return max(1, n // config.batch_size)


def total_steps(config) -> int:
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return max(1, int(math.ceil(config.num_epochs * steps_per_epoch(config))))


def create_learning_rate_fn(config, base_learning_rate: float | None = None) -> optax.Schedule:
  """Warmup + cosine / piecewise-constant / constant; `base_learning_rate` rescales the shape."""
  spe = steps_per_epoch(config)
  total = total_steps(config)
  lr = config.learning_rate
  factor = 1.0 if base_learning_rate is None else base_learning_rate / lr
  warmup = int(config.warmup_epochs * spe)
  if config.lr_schedule == 'cosine':
    main = optax.cosine_decay_schedule(lr * factor, max(1, total - warmup))
  elif config.lr_schedule == 'constant':
    main = optax.constant_schedule(lr * factor)
  else:  # piecewise: the rate becomes lr_values[i] at epoch lr_boundaries_epochs[i]
    boundaries = [int(e * spe) - warmup for e in config.lr_boundaries_epochs]
    values = [lr] + list(config.lr_values)
    def main(step):
      rate = jnp.asarray(values[0], jnp.float32)
      for b, v in zip(boundaries, values[1:]):
        rate = jnp.where(step >= b, v, rate)
      return rate * factor
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr * factor, warmup), main], [warmup])


def _path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def param_labels(params) -> Any:
  """'scale' for TTQ's w_p / w_n, 'weight' for everything else."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: 'scale' if _path_str(p).rsplit('/', 1)[-1] in SCALE_NAMES else 'weight', params)


def weight_decay_mask(params, regex: str, decay_scales: bool) -> Any:
  pattern = re.compile(regex)
  def decays(path, _):
    name = _path_str(path)
    if name.rsplit('/', 1)[-1] in SCALE_NAMES:
      return decay_scales
    return bool(pattern.search(name))
  return jax.tree_util.tree_map_with_path(decays, params)


def _base_optimizer(config, learning_rate) -> optax.GradientTransformation:
  if config.optimizer == 'adam':
    return optax.adam(learning_rate, eps=config.adam_eps)
  return optax.sgd(learning_rate, momentum=config.momentum or None, nesterov=config.nesterov)


def create_optimizer(config, params) -> optax.GradientTransformation:
  """Main optimizer for weights; w_p / w_n get their own Adam (or the same) on the same schedule.

  Weight decay is L2 added to the gradient (as the official code's regularizer), on params whose
  path matches `weight_decay_regex` (latent kernels by default) and on the scales if `decay_scales`.
  """
  lr_fn = create_learning_rate_fn(config)
  if config.scale_optimizer == 'adam':
    scale_opt = optax.adam(create_learning_rate_fn(config, config.scale_learning_rate))
  else:
    scale_opt = _base_optimizer(config, lr_fn)
  inner = optax.multi_transform({'weight': _base_optimizer(config, lr_fn), 'scale': scale_opt},
                                param_labels(params))
  chain = []
  if config.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if config.weight_decay > 0:
    chain.append(optax.add_decayed_weights(
        config.weight_decay, mask=weight_decay_mask(params, config.weight_decay_regex, config.decay_scales)))
  chain.append(inner)
  multiplier = config.ternary_kernel_lr_multiplier
  if multiplier != 1.0 and config.quant.method == 'ttq':
    # TTQ's latent gradient is w_p * g (or w_n * g), and behind batch norm g ~ 1 / w_p, so the latent
    # kernels of a ternary layer move ~mean|w| times slower than the same kernels in full precision
    # (or TWN, whose STE gradient is g: no multiplier there). This restores their pace from the switch on.
    start = int(config.fp_warmup_epochs * steps_per_epoch(config)) if not config.init_from else 0
    chain.append(optax.masked(
        optax.scale_by_schedule(lambda count: jnp.where(count >= start, multiplier, 1.0)),
        ternary_kernel_mask(params)))
  return optax.chain(*chain)


def ternary_kernel_mask(params) -> Any:
  """True for the latent kernels of ternary layers (modules auto-named `Ternary*`)."""
  def is_ternary_kernel(path, _):
    parts = _path_str(path).split('/')
    return parts[-1] == 'kernel' and len(parts) > 1 and quant_lib.is_ternary_layer(parts[-2])
  return jax.tree_util.tree_map_with_path(is_ternary_kernel, params)


def init_variables(model: nn.Module, rng: jax.Array, image_shape) -> dict:
  return model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)


def create_train_state(config, model: nn.Module, mesh, rng: jax.Array | None = None) -> TrainState:
  """A fresh train state created directly with its shardings (no host copy of the parameters)."""
  info = input_pipeline.dataset_info(config.data.name)
  rng = jax.random.PRNGKey(config.seed) if rng is None else rng
  init_rng, state_rng = jax.random.split(rng)

  def make():
    variables = init_variables(model, init_rng, info.image_shape)
    params = variables['params']
    return TrainState.create(apply_fn=model.apply, params=params, tx=create_optimizer(config, params),
                             batch_stats=variables.get('batch_stats', {}), rng=state_rng)

  abstract = jax.eval_shape(make)
  shardings = sharding_lib.state_shardings(abstract, mesh)
  return jax.jit(make, out_shardings=shardings)()


# --------------------------------------------------------------------------- steps


def cross_entropy(logits, labels, num_classes: int):
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), jax.nn.one_hot(labels, num_classes))


def topk_correct(logits, labels, k: int):
  """1.0 where the label is among the k highest logits."""
  if k == 1:
    return (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
  return (jnp.sum(logits > label_logit, axis=-1) < k).astype(jnp.float32)


def train_step(state: TrainState, batch, *, apply_fn, info, dtype):
  """One SGD step on the global batch; skips the update when loss/gradients are not finite."""
  images = input_pipeline.normalize(batch['image'], info, dtype)
  labels = batch['label']

  def loss_fn(params):
    logits, updates = apply_fn({'params': params, 'batch_stats': state.batch_stats}, images, train=True,
                               mutable=['batch_stats'])
    loss = jnp.mean(cross_entropy(logits, labels, info.num_classes))
    return loss, (logits, updates['batch_stats'])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grad_norm = optax.tree_utils.tree_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
  metrics = {'train_loss': loss, 'train_top1_accuracy': jnp.mean(topk_correct(logits, labels, 1)),
             'grad_norm': grad_norm, 'finite': finite}
  if info.num_classes >= 5:
    metrics['train_top5_accuracy'] = jnp.mean(topk_correct(logits, labels, 5))
  return new_state, metrics


def eval_step(state: TrainState, batch, *, apply_fn, info, dtype):
  """Sums of loss / correct over the valid (mask = 1) rows of one global batch."""
  images = input_pipeline.normalize(batch['image'], info, dtype)
  logits = apply_fn({'params': state.params, 'batch_stats': state.batch_stats}, images, train=False)
  mask = batch['mask']
  out = {'loss': jnp.sum(cross_entropy(logits, batch['label'], info.num_classes) * mask),
         'top1_correct': jnp.sum(topk_correct(logits, batch['label'], 1) * mask),
         'count': jnp.sum(mask)}
  if info.num_classes >= 5:
    out['top5_correct'] = jnp.sum(topk_correct(logits, batch['label'], 5) * mask)
  return out


def batch_moments_step(state: TrainState, batch, *, apply_fn, info, dtype):
  """This batch's BN mean/var for every BN layer (train-mode forward from zero statistics)."""
  images = input_pipeline.normalize(batch['image'], info, dtype)
  zeros = jax.tree.map(jnp.zeros_like, state.batch_stats)
  _, updates = apply_fn({'params': state.params, 'batch_stats': zeros}, images, train=True, mutable=['batch_stats'])
  # Flax: ra = momentum * ra + (1 - momentum) * batch_value, so from ra = 0 we get the batch value back.
  return jax.tree.map(lambda x: x / (1.0 - BN_MOMENTUM), updates['batch_stats'])


# --------------------------------------------------------------------------- compiled programs


# XLA:CPU options per compiled program under `xla_cpu_ynn_fusion='auto'`, chosen by measurement
# (experiments/benchmark.py, 2-core Xeon, XLA default vs YNNPACK fusions off, interleaved): train step
# 1.7-2.5x faster off (ResNet-20); eval 1.23-1.26x (ResNet-20, batch 128/512), 1.5x (ResNet-20, batch 1000,
# Fashion-MNIST; ResNet-18) and 1.06x (tiny AlexNet) faster off; BN re-estimation ('moments') 1.17-1.27x.
_NO_YNN_FUSIONS = {'xla_cpu_experimental_ynn_fusion_type': ''}
CPU_PROGRAM_OPTIONS: dict[str, dict[str, str] | None] = {
    'train': _NO_YNN_FUSIONS, 'eval': _NO_YNN_FUSIONS, 'moments': _NO_YNN_FUSIONS}


def compiler_options(config, program: str) -> dict[str, str] | None:
  """Per-program XLA options: on CPU, `CPU_PROGRAM_OPTIONS` (measured); on GPU/TPU none (nothing measured
  faster there). `xla_cpu_ynn_fusion='on'` keeps XLA's default for all programs, 'off' turns fusions off."""
  if jax.default_backend() != 'cpu' or config.xla_cpu_ynn_fusion == 'on':
    return None
  if config.xla_cpu_ynn_fusion == 'off':
    return dict(_NO_YNN_FUSIONS)
  options = CPU_PROGRAM_OPTIONS.get(program)
  return dict(options) if options else None


def compile_program(fn: Callable, args: tuple, *, in_shardings, out_shardings, donate: bool,
                    options: dict | None):
  jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                   donate_argnums=(0,) if donate else ())
  return jitted.lower(*args).compile(compiler_options=options) if options else jitted.lower(*args).compile()


class Programs:
  """The jitted-once programs of a run, compiled lazily for the shapes they first see."""

  def __init__(self, config, mesh, state_shardings):
    self.config, self.mesh, self.state_shardings = config, mesh, state_shardings
    self.info = input_pipeline.dataset_info(config.data.name)
    self.dtype = compute_dtype(config)
    self.models = {True: create_model(config, quantized=True), False: create_model(config, quantized=False)}
    self._cache: dict = {}

  def _get(self, name: str, quantized: bool, state, batch):
    key = (name, quantized)
    if key not in self._cache:
      apply_fn = self.models[quantized].apply
      fn = {'train': train_step, 'eval': eval_step, 'moments': batch_moments_step}[name]
      fn = functools.partial(fn, apply_fn=apply_fn, info=self.info, dtype=self.dtype)
      rep = sharding_lib.replicated(self.mesh)
      batch_sh = {k: sharding_lib.batch_sharding(self.mesh) for k in batch}
      out = (self.state_shardings, rep) if name == 'train' else rep
      self._cache[key] = compile_program(
          fn, (state, batch), in_shardings=(self.state_shardings, batch_sh), out_shardings=out,
          donate=name == 'train', options=compiler_options(self.config, name))
    return self._cache[key]

  def train(self, state, batch, quantized=True):
    return self._get('train', quantized, state, batch)(state, batch)

  def eval(self, state, batch, quantized=True):
    return self._get('eval', quantized, state, batch)(state, batch)

  def moments(self, state, batch, quantized=True):
    return self._get('moments', quantized, state, batch)(state, batch)


# --------------------------------------------------------------------------- evaluation


def evaluate(programs: Programs, state: TrainState, batches, quantized: bool = True) -> dict[str, float]:
  """Loss / top-1 / top-5 over all batches (each a process-local dict with a `mask`)."""
  totals = None
  for local in batches:
    out = programs.eval(state, sharding_lib.global_batch(local, programs.mesh), quantized)
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  count = float(totals['count'])
  result = {'loss': float(totals['loss']) / count, 'top1_accuracy': float(totals['top1_correct']) / count}
  if 'top5_correct' in totals:
    result['top5_accuracy'] = float(totals['top5_correct']) / count
  result['num_examples'] = int(count)
  return result


def recalibrate_batch_stats(programs: Programs, state: TrainState, batches, quantized: bool = True) -> TrainState:
  """Replaces BN running statistics by the average batch statistics of the current (ternary)
  weights over clean training batches (the running averages lag the final ternary weights)."""
  total, n = None, 0
  for local in batches:
    moments = programs.moments(state, sharding_lib.global_batch(local, programs.mesh), quantized)
    total = moments if total is None else jax.tree.map(jnp.add, total, moments)
    n += 1
  if n == 0:
    return state
  return state.replace(batch_stats=jax.tree.map(lambda x: x / n, total))


def quant_report(state: TrainState, config) -> dict[str, Any]:
  """Per-layer sparsity and scales (host floats) for logging and eval JSON."""
  q = quant_config(config)
  params = jax.device_get(state.params)
  weights = quant_lib.ternary_weights(params, q)  # thresholds computed once for both reports
  return {'sparsity': {p: float(np.mean(np.asarray(c) == 0)) for p, (c, _, _) in weights.items()},
          'scales': {p: (float(w_p), float(w_n)) for p, (_, w_p, w_n) in weights.items()},
          'param_counts': quant_lib.count_params(params, q)}


def flat_quant_scalars(report: dict) -> dict[str, float]:
  out = {}
  for path, s in report['sparsity'].items():
    layer = path.rsplit('/', 1)[0]
    out[f'sparsity/{layer}'] = s
    out[f'w_p/{layer}'], out[f'w_n/{layer}'] = report['scales'][path]
  if report['sparsity']:
    out['sparsity/mean'] = float(np.mean(list(report['sparsity'].values())))
  return out


# --------------------------------------------------------------------------- phase changes


def init_scales_from_kernels(params, config):
  """At the switch to ternary: optionally scale kernels to [-1, 1] and set w_p / w_n
  (`quant.scale_init`: 'constant' keeps w_p_init / w_n_init, 'mean_abs' uses mean |w| per sign)."""
  q = quant_config(config)
  params = flax.core.unfreeze(params) if isinstance(params, flax.core.FrozenDict) else jax.tree.map(lambda x: x, params)

  def visit(tree):
    for name, value in tree.items():
      if not isinstance(value, dict):
        continue
      if quant_lib.is_ternary_layer(name) and 'w_p' in value:
        kernel = value['kernel']
        if config.normalize_init:
          kernel = kernel / jnp.max(jnp.abs(kernel))
          value['kernel'] = kernel
        if config.quant.scale_init == 'mean_abs':
          delta = quant_lib.threshold(kernel, q)
          pos, neg = kernel > delta, kernel < -delta
          value['w_p'] = (jnp.sum(jnp.where(pos, kernel, 0)) / jnp.maximum(jnp.sum(pos), 1)).astype(value['w_p'].dtype)
          value['w_n'] = (jnp.sum(jnp.where(neg, -kernel, 0)) / jnp.maximum(jnp.sum(neg), 1)).astype(value['w_n'].dtype)
        else:
          value['w_p'] = jnp.full_like(value['w_p'], q.w_p_init)
          value['w_n'] = jnp.full_like(value['w_n'], q.w_n_init)
      else:
        visit(value)
  visit(params)
  return params


def load_init_from(state: TrainState, config, workdir_from: str) -> TrainState:
  """Fine-tuning (paper, CIFAR): copies an FP run's params and BN statistics into this state,
  then sets the scales (and optionally normalises kernels) as at the FP->ternary switch."""
  mngr = ckpt.create_manager(workdir_from, read_only=True)
  steps = mngr.all_steps()
  if not steps:
    raise ckpt.CheckpointError(f'init_from={workdir_from!r} has no checkpoint in {ckpt.checkpoint_dir(workdir_from)}')
  restored = mngr.restore(max(steps), args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']
  src_params = restored['params']
  src_stats = restored.get('batch_stats', {})
  copied, kept = [], []

  def copy(dst, src, prefix=''):
    out = {}
    for k, v in dst.items():
      if isinstance(v, dict) or isinstance(v, flax.core.FrozenDict):
        out[k] = copy(v, (src or {}).get(k, {}), f'{prefix}{k}/')
      elif src is not None and k in src and np.shape(src[k]) == np.shape(v):
        out[k] = jnp.asarray(src[k], v.dtype)
        copied.append(prefix + k)
      else:
        out[k] = v
        kept.append(prefix + k)
    return out

  params = copy(jax.device_get(state.params), src_params)
  batch_stats = copy(jax.device_get(state.batch_stats), src_stats)
  params = init_scales_from_kernels(params, config)
  logging.info('init_from %s: copied %d tensors, kept %d at init (%s)', workdir_from, len(copied), len(kept),
               ', '.join(kept[:8]))
  new = state.replace(params=params, batch_stats=batch_stats)
  new = new.replace(opt_state=state.tx.init(new.params))
  shardings = jax.tree.map(lambda x: x.sharding, state)
  return jax.device_put(new, shardings)


# --------------------------------------------------------------------------- the job


def setup_compilation_cache(config) -> None:
  """JAX's persistent compilation cache (repeated runs stop paying seconds per compile)."""
  d = config.compilation_cache_dir
  if not d:
    return
  if d == 'default':
    d = os.path.join(os.environ.get('XDG_CACHE_HOME', os.path.expanduser('~/.cache')), 'ttq_jax', 'xla')
  try:
    os.makedirs(d, exist_ok=True)
  except OSError:
    logging.warning('compilation cache dir %s is not writable; cache off', d)
    return
  jax.config.update('jax_compilation_cache_dir', d)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


class _Prefetcher:
  """Pulls host batches from a grain iterator and puts `depth` of them on the devices ahead of
  use; remembers the iterator state that follows each batch (saved with checkpoints)."""

  def __init__(self, iterator, mesh, depth: int):
    self.iterator, self.mesh, self.depth = iterator, mesh, max(1, depth)
    self.queue: list = []

  def _fill(self):
    while len(self.queue) < self.depth:
      local = next(self.iterator)
      self.queue.append((sharding_lib.global_batch(local, self.mesh), self.iterator.get_state()))

  def next(self):
    self._fill()
    batch, state = self.queue.pop(0)
    self._fill()
    return batch, state


def _is_primary() -> bool:
  return jax.process_index() == 0


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from the newest readable checkpoint in `workdir`) and evaluates.

  Returns the final eval metrics with the quantization report.
  """
  config_check.validate(config)
  started = time.perf_counter()
  workdir = os.path.abspath(workdir)
  config_check.prepare_workdir(config, workdir, write=False)  # refuse before touching anything
  setup_compilation_cache(config)
  mesh = sharding_lib.create_mesh(config.mesh_shape, config.mesh_axes)
  sharding_lib.check_batch_size(config.batch_size, mesh)
  sharding_lib.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
  n_proc, p_idx = jax.process_count(), jax.process_index()
  local_batch = config.batch_size // n_proc

  # Data first: a missing dataset fails before anything is compiled or written.
  train_ds = input_pipeline.train_dataset(config.data, local_batch_size=local_batch, seed=config.seed,
                                          process_index=p_idx, process_count=n_proc)
  read = grain.ReadOptions(num_threads=config.data.num_threads, prefetch_buffer_size=8)
  eval_batches = lambda: input_pipeline.eval_batches(config.data, global_batch_size=config.eval_batch_size,
                                                     process_index=p_idx, process_count=n_proc)
  clean_ds = input_pipeline.train_dataset(config.data, local_batch_size=local_batch, seed=config.seed + 7,
                                          process_index=p_idx, process_count=n_proc, augment=False)
  recal_batches = lambda: (clean_ds[i] for i in range(config.bn_recalibration_batches))

  state = create_train_state(config, create_model(config), mesh)
  config_check.write_config(config, workdir)
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  programs = Programs(config, mesh, state_shardings)
  manager = ckpt.create_manager(workdir, max_to_keep=config.keep_checkpoints)
  restored = ckpt.restore_latest(manager, state)
  iterator = iter(train_ds.to_iter_dataset(read))
  total = total_steps(config)
  spe = steps_per_epoch(config)
  warmup_steps = int(config.fp_warmup_epochs * spe) if config.quant.method != 'fp' else 0
  if restored is not None:
    start_step, state, data_state = restored
    ckpt.quarantine_newer(manager, workdir, start_step)
    if data_state:
      iterator.set_state(data_state)
    else:
      iterator.set_state({'next_index': start_step})
    logging.info('resumed from step %d in %s', start_step, workdir)
  else:
    start_step = 0
    if config.init_from:
      state = load_init_from(state, config, config.init_from)

  writer = metric_writers.MetricWriter(workdir, enabled=_is_primary(), resume_step=start_step)
  progress = metric_writers.Progress(total, config.batch_size, start_step, enabled=_is_primary())
  if _is_primary() and start_step == 0:
    counts = quant_lib.count_params(jax.device_get(state.params), quant_config(config))
    logging.info('model %s on %s: %d ternary + %d full-precision parameters; %d steps (%d per epoch), '
                 'mesh %s', config.model.name, config.data.name, counts['ternary'], counts['full_precision'],
                 total, spe, dict(mesh.shape))
  prefetcher = _Prefetcher(iterator, mesh, config.data.prefetch_batches)
  lr_fn = create_learning_rate_fn(config)
  stop = {'signal': None}

  def on_signal(signum, _frame):
    stop['signal'] = signum
  previous_handlers = {}
  for sig in (signal.SIGTERM, signal.SIGINT):
    try:
      previous_handlers[sig] = signal.signal(sig, on_signal)
    except ValueError:  # not the main thread
      pass

  pending: list = []  # device metrics since the last log step (fetched only at log steps)
  data_state = iterator.get_state()
  last_eval: dict = {}
  target: dict = {}  # the first eval at or above config.target_accuracy (step, seconds)
  step = start_step
  try:
    while step < total:
      quantized = step >= warmup_steps
      if step == warmup_steps and warmup_steps > 0:
        state = state.replace(params=jax.device_put(init_scales_from_kernels(state.params, config),
                                                     state_shardings.params))
        logging.info('step %d: full-precision warm-up done, training ternary from here', step)
      batch, data_state = prefetcher.next()
      state, metrics = programs.train(state, batch, quantized)
      step += 1
      pending.append((step, metrics))
      is_last = step == total
      do_eval = is_last or (config.eval_every_steps > 0 and step % config.eval_every_steps == 0)
      do_ckpt = is_last or step % config.checkpoint_every_steps == 0 or stop['signal'] is not None
      if do_eval or do_ckpt or step % config.log_every_steps == 0:
        row = _flush_metrics(pending, lr_fn)
        pending = []
        if step % config.log_every_steps == 0 or do_eval:
          row['steps_per_second'] = progress.rate(step)
          row['images_per_second'] = row['steps_per_second'] * config.batch_size
          row['host_peak_rss_gib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
          row.update(flat_quant_scalars(quant_report(state, config)))
          if do_eval:
            if config.bn_recalibration_batches > 0:
              state = recalibrate_batch_stats(programs, state, recal_batches(), quantized)
            t0 = time.perf_counter()
            last_eval = evaluate(programs, state, eval_batches(), quantized)
            row.update({f'eval_{k}': v for k, v in last_eval.items()})
            row['eval_seconds'] = time.perf_counter() - t0
            if (config.target_accuracy > 0 and not target
                and last_eval['top1_accuracy'] >= config.target_accuracy):
              target = {'step': step, 'seconds': time.perf_counter() - started}
              row['time_to_target_s'] = target['seconds']
          row['elapsed_s'] = time.perf_counter() - started
          writer.write(step, row)
          progress.print(step, row)
      if do_ckpt:
        ckpt.save(manager, step, state, data_state, force=True)
      if stop['signal'] is not None:
        logging.warning('signal %d: saved checkpoint at step %d, exiting', stop['signal'], step)
        manager.wait_until_finished()
        raise SystemExit(128 + stop['signal'])
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.close()
    for sig, handler in previous_handlers.items():
      signal.signal(sig, handler)

  if not last_eval:  # resumed at the end: evaluate what was restored
    last_eval = evaluate(programs, state, eval_batches(), step >= warmup_steps)
  report = quant_report(state, config)
  result = {'step': step, **last_eval, **report, 'elapsed_s': time.perf_counter() - started}
  if config.target_accuracy > 0:
    result['target'] = {'accuracy': config.target_accuracy, **target}
  if _is_primary():
    print(format_eval_table(result, config))
  return result


def _flush_metrics(pending, lr_fn) -> dict[str, Any]:
  """Fetches the pending device metrics (one host sync), checks finiteness, averages."""
  fetched = jax.device_get([m for _, m in pending])
  for (step, _), m in zip(pending, fetched):
    if not bool(m['finite']):
      raise NonFiniteError(
          f'loss or gradients are not finite at step {step} (loss={float(m["train_loss"])}, '
          f'grad_norm={float(m["grad_norm"])}); the update was skipped and the last checkpoint is kept')
  row = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1] if k != 'finite'}
  row['learning_rate'] = float(lr_fn(pending[-1][0] - 1))
  return row


def format_eval_table(result: dict, config) -> str:
  """The final summary: accuracy first, then each ternary layer's sparsity and scales."""
  lines = [f'\n{config.model.name} on {config.data.name}, method {config.quant.method}, step {result["step"]}:',
           f'  test loss {result["loss"]:.4f} | top-1 {result["top1_accuracy"]:.2%}' +
           (f' | top-5 {result["top5_accuracy"]:.2%}' if 'top5_accuracy' in result else '') +
           f' | {result.get("num_examples", "?")} examples']
  target = result.get('target')
  if target:
    if 'step' in target:
      lines.append(f'  reached top-1 >= {target["accuracy"]:.2%} at step {target["step"]}, '
                   f'{target["seconds"] / 60:.1f} min after start (this process)')
    else:
      lines.append(f'  did not reach top-1 >= {target["accuracy"]:.2%} in this process')
  if 'elapsed_s' in result:
    lines.append(f'  wall time {result["elapsed_s"] / 60:.1f} min (this process: compile, train, eval)')
  counts = result.get('param_counts')
  if counts:
    lines.append(f'  parameters: {counts["ternary"]:,} ternary, {counts["full_precision"]:,} full precision')
  if result.get('sparsity'):
    rows = [(path.rsplit('/', 1)[0], f'{s:.3f}', f'{result["scales"][path][0]:+.4f}',
             f'{result["scales"][path][1]:+.4f}') for path, s in result['sparsity'].items()]
    lines.append(metric_writers.table(rows, ('layer', 'sparsity', 'w_p', 'w_n')))
  return '\n'.join(lines)
