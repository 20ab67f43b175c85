"""Optimizer, learning-rate schedules and the parameter masks that say what each setting applies to.

Each choice a config can make is a dispatch table here (`SCHEDULES`, `OPTIMIZERS`,
`SCALE_OPTIMIZERS`): the code dispatches through the table and `config_check` reads its allowed
values from it, so a value is allowed exactly when code stands behind it.
"""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
import optax

from ttq_jax import paths
from ttq_jax import steps

# --------------------------------------------------------------------------- learning-rate schedules


def _cosine(config, factor: float, decay_steps: int) -> optax.Schedule:
  return optax.cosine_decay_schedule(config.learning_rate * factor, max(1, decay_steps))


def _constant(config, factor: float, decay_steps: int) -> optax.Schedule:
  del decay_steps
  return optax.constant_schedule(config.learning_rate * factor)


def _piecewise(config, factor: float, decay_steps: int) -> optax.Schedule:
  """The rate becomes `lr_values[i]` (times `factor`) at epoch `lr_boundaries_epochs[i]`."""
  del decay_steps
  warmup = steps.warmup_steps(config)
  boundaries = [steps.epochs_to_steps(config, e) - warmup for e in config.lr_boundaries_epochs]
  values = [config.learning_rate] + list(config.lr_values)

  def schedule(step):
    rate = jnp.asarray(values[0], jnp.float32)
    for b, v in zip(boundaries, values[1:]):
      rate = jnp.where(step >= b, v, rate)
    return rate * factor
  return schedule


# name -> (config, factor on the config's rates, steps after the warm-up) -> the schedule after the warm-up
SCHEDULES: dict[str, Callable[..., optax.Schedule]] = {
    'cosine': _cosine, 'piecewise': _piecewise, 'constant': _constant}


def create_learning_rate_fn(config, base_learning_rate: float | None = None) -> optax.Schedule:
  """Linear warm-up, then `SCHEDULES[config.lr_schedule]`; `base_learning_rate` rescales the shape
  (the scales' own optimizer follows the weights' schedule at its own base rate)."""
  total = steps.total_steps(config)
  lr = config.learning_rate
  factor = 1.0 if base_learning_rate is None else base_learning_rate / lr
  warmup = steps.warmup_steps(config)
  main = SCHEDULES[config.lr_schedule](config, factor, total - warmup)
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr * factor, warmup), main], [warmup])


# --------------------------------------------------------------------------- optimizers


def _sgd(config, learning_rate, decay_mask) -> optax.GradientTransformation:
  del decay_mask  # weight decay is L2 added to the gradient before it (`create_optimizer`)
  return optax.sgd(learning_rate, momentum=config.momentum or None, nesterov=config.nesterov)


def _adam(config, learning_rate, decay_mask) -> optax.GradientTransformation:
  del decay_mask  # as sgd
  return optax.adam(learning_rate, eps=config.adam_eps)


def _adamw(config, learning_rate, decay_mask) -> optax.GradientTransformation:
  """AdamW (Loshchilov & Hutter 2019): Adam on the gradient alone, then `weight_decay * w` subtracted times the
  learning rate (the schedule's, warm-up included) from the params `decay_mask` selects."""
  return optax.adamw(learning_rate, eps=config.adam_eps, weight_decay=config.weight_decay, mask=decay_mask)


# name -> (config, schedule, decay mask: params -> bool tree) -> the transformation
OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {'sgd': _sgd, 'adam': _adam, 'adamw': _adamw}
# The optimizers that apply `weight_decay` themselves, decoupled from the gradient; for the others it is L2 added
# to the gradient before them (as the official code's regularizer).
DECOUPLED_DECAY = ('adamw',)


def _weights_optimizer(config, decay_mask) -> optax.GradientTransformation:
  return OPTIMIZERS[config.optimizer](config, create_learning_rate_fn(config), decay_mask)


def _scale_adam(config, decay_mask) -> optax.GradientTransformation:
  learning_rate = create_learning_rate_fn(config, config.scale_learning_rate)
  if config.optimizer in DECOUPLED_DECAY:  # the L2 term is not added to the gradient then: decay scales the same way
    return optax.adamw(learning_rate, weight_decay=config.weight_decay, mask=decay_mask)
  return optax.adam(learning_rate)


# How the trained scales (TTQ's w_p / w_n, ParetoQ's alpha) are trained: 'adam' (their own Adam at
# scale_learning_rate, on the weights' schedule shape) or 'same' (the weights' optimizer, as the official TTQ code
# and ParetoQ's single AdamW). Either decays the scales that
# `weight_decay_regex` selects as the weights' optimizer decays (L2 in the gradient, or decoupled).
SCALE_OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    'adam': _scale_adam,
    'same': _weights_optimizer,
}


# --------------------------------------------------------------------------- parameter masks


def param_labels(params, layers=()) -> Any:
  """'scale' for the trained scales of the `layers` (`quant.TernaryLayer`s: the parameters their method's entry of
  `quant.METHODS` names, e.g. TTQ's w_p / w_n, ParetoQ's alpha, at the layer's path), 'weight' for everything else."""
  scales = {p for layer in layers for p in layer.scale_paths}
  return paths.select(params, lambda path: 'scale' if path in scales else 'weight')


def weight_decay_mask(params, regex: str) -> Any:
  """True for params whose slash-joined path matches `regex` (searched), scales included: the official
  CIFAR regularizer `.*/W` also caught every `Wp` / `Wn`, AlexNet's `fc.*/W` those of fc0 and fc1."""
  return paths.select(params, lambda path: paths.searches(regex, path))


def ternary_kernel_mask(params, layers) -> Any:
  """True for the latent kernels of the `layers` (`quant.TernaryLayer`s) whose method trains its scales."""
  kernels = {layer.kernel_path for layer in layers if layer.quant.spec.trained_scales}
  return paths.select(params, lambda path: path in kernels)


def create_optimizer(config, params, layers=()) -> optax.GradientTransformation:
  """Weights: `OPTIMIZERS[config.optimizer]`; the trained scales of `layers` (the model's ternary layers,
  `quant.ternary_layers`; their methods name the scales): `SCALE_OPTIMIZERS[config.scale_optimizer]`.

  Weight decay applies to params whose path matches `weight_decay_regex` (latent kernels by default;
  `(kernel|w_p|w_n)$` adds the scales): L2 added to the gradient (as the official code's regularizer), or
  decoupled for the optimizers of `DECOUPLED_DECAY` (adamw).
  """
  decay_mask = lambda tree: weight_decay_mask(tree, config.weight_decay_regex)
  inner = optax.multi_transform(
      {'weight': _weights_optimizer(config, decay_mask),
       'scale': SCALE_OPTIMIZERS[config.scale_optimizer](config, decay_mask)},
      param_labels(params, layers))
  chain = []
  if config.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if config.weight_decay > 0 and config.optimizer not in DECOUPLED_DECAY:
    chain.append(optax.add_decayed_weights(config.weight_decay, mask=decay_mask(params)))
  chain.append(inner)
  multiplier = config.ternary_kernel_lr_multiplier
  if multiplier != 1.0 and any(layer.quant.spec.trained_scales for layer in layers):
    # TTQ's latent gradient is w_p * g (or w_n * g), and behind batch norm g ~ 1 / w_p, so the latent
    # kernels of a ternary layer move ~mean|w| times slower than the same kernels in full precision
    # (or TWN / BitNet, whose STE gradient is g: no multiplier there). This restores their pace from the switch on.
    start = steps.ternary_start_step(config)
    chain.append(optax.masked(
        optax.scale_by_schedule(lambda count: jnp.where(count >= start, multiplier, 1.0)),
        ternary_kernel_mask(params, layers)))
  return optax.chain(*chain)
