"""Steps, epochs and phases of a run, computed in one place (big_vision's `u.steps` idea).

Everything that needs "how many steps", "which step is epoch e" or "from which step is the model
ternary" asks here: the optimizer's schedules and multiplier, the training loop, `--mode eval`
and `--mode export`.
"""

from __future__ import annotations

import math

from ttq_jax import datasets
from ttq_jax.quant.methods import METHODS


def steps_per_epoch(config) -> int:
  """Global batches per pass over the (possibly limited) training split, less any validation split; or
  `config.steps_per_epoch` when > 0 (an "epoch" as the reference code logged it, e.g. 390 steps of 256
  images on CIFAR-10: two passes)."""
  if config.steps_per_epoch > 0:
    return int(config.steps_per_epoch)
  return max(1, datasets.train_size(config.data) // config.batch_size)


def epochs_to_steps(config, epochs: float) -> int:
  """The step at which `epochs` epochs are done (rounded down)."""
  return int(epochs * steps_per_epoch(config))


def warmup_steps(config) -> int:
  """Steps of the learning rate's linear warm-up: `warmup_steps` when > 0, else `warmup_epochs`."""
  return int(config.warmup_steps) if config.warmup_steps > 0 else epochs_to_steps(config, config.warmup_epochs)


def total_steps(config) -> int:
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return max(1, int(math.ceil(config.num_epochs * steps_per_epoch(config))))


def is_quantized(config) -> bool:
  """Whether the config's method quantizes (`quant.METHODS[config.quant.method].quantized`)."""
  return METHODS[config.quant.method].quantized


def ternary_start_step(config) -> int:
  """The number of full-precision steps before ternary training: steps after it train (and evaluate)
  the ternary model.

  0 for full-precision runs (nothing changes) and for runs that start from an FP checkpoint
  (`init_from`: the warm start happened in another run); otherwise the end of the in-run FP warm-up
  (`fp_warmup_steps` when > 0, else `fp_warmup_epochs`). `config_check` refuses `init_from` together with `fp_warmup_epochs > 0`.
  """
  if not is_quantized(config) or config.init_from:
    return 0
  if config.fp_warmup_steps > 0:
    return int(config.fp_warmup_steps)
  return epochs_to_steps(config, config.fp_warmup_epochs)


def has_fp_warmup(config) -> bool:
  """Whether the config asks for an in-run full-precision warm-up (`fp_warmup_steps` or `fp_warmup_epochs`)."""
  return config.fp_warmup_steps > 0 or config.fp_warmup_epochs > 0


def ternary_steps(config, step: int) -> int:
  """How many of the first `step` steps trained ternary weights (0 for FP runs and inside the warm-up)."""
  if not is_quantized(config):
    return 0
  return max(0, step - ternary_start_step(config))


def is_ternary_at(config, step: int) -> bool:
  """Whether the parameters after `step` steps (a checkpoint's step) are a trained ternary model.

  With an in-run warm-up ending at W, steps 1..W train full precision and the switch (scale init)
  happens before step W + 1, so a checkpoint at W is still the full-precision model.
  """
  start = ternary_start_step(config)
  return is_quantized(config) and (step > start or start == 0)
