"""The compiled programs of a run: each step function jitted once over the mesh (batch sharded, state
replicated or FSDP-sharded, the state donated where a step returns a new one), with per-program XLA
options, and JAX's persistent compilation cache."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from typing import Any, Callable, Mapping

import jax
import flax.linen as nn

from ttq_jax import datasets
from ttq_jax import functional
from ttq_jax import sharding as sharding_lib
from ttq_jax import state as state_lib


# XLA:CPU options per compiled program under `xla_cpu_ynn_fusion='auto'`, chosen by measurement
# (experiments/benchmark.py, 2-core Xeon, XLA default vs YNNPACK fusions off, interleaved): train step
# 1.7-2.5x faster off (ResNet-20); eval 1.23-1.26x (ResNet-20, batch 128/512), 1.5x (ResNet-20, batch 1000,
# Fashion-MNIST; ResNet-18) and 1.06x (tiny AlexNet) faster off; BN re-estimation ('moments') 1.17-1.27x.
_NO_YNN_FUSIONS = {'xla_cpu_experimental_ynn_fusion_type': ''}
CPU_PROGRAM_OPTIONS: dict[str, dict[str, str] | None] = {
    'train': _NO_YNN_FUSIONS, 'eval': _NO_YNN_FUSIONS, 'moments': _NO_YNN_FUSIONS}

# config.xla_cpu_ynn_fusion -> program name -> XLA options on CPU (None: XLA's default)
YNN_FUSION_MODES: dict[str, Callable[[str], dict[str, str] | None]] = {
    'auto': lambda program: CPU_PROGRAM_OPTIONS.get(program),
    'on': lambda program: None,
    'off': lambda program: _NO_YNN_FUSIONS,
}


def compiler_options(config, program: str) -> dict[str, str] | None:
  """Per-program XLA options: on CPU `YNN_FUSION_MODES[config.xla_cpu_ynn_fusion]` ('auto': the measured
  `CPU_PROGRAM_OPTIONS`); on GPU/TPU none (nothing measured faster there)."""
  if jax.default_backend() != 'cpu':
    return None
  options = YNN_FUSION_MODES[config.xla_cpu_ynn_fusion](program)
  return dict(options) if options else None


def compile_program(fn: Callable, args: tuple, *, in_shardings, out_shardings, donate: bool,
                    options: dict | None):
  jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                   donate_argnums=(0,) if donate else ())
  return jitted.lower(*args).compile(compiler_options=options) if options else jitted.lower(*args).compile()


@dataclasses.dataclass(frozen=True)
class Step:
  """A step function `fn(state, batch, *, apply_fn, info, dtype, loss_fn)`; `updates_state`: it returns
  `(new_state, metrics)` and its input state is donated, else it returns metrics only."""
  fn: Callable
  updates_state: bool = False


class Programs:
  """The jitted-once programs of a run (one per step name and phase), compiled for the shapes they
  first see. `quantized=False` runs the full-precision twin of the model (the FP warm-up)."""

  def __init__(self, config, mesh, state_shardings, steps: Mapping[str, Step], model: nn.Module | None = None,
               loss_fn: Callable | None = None):
    """`model`: your own, Linen or NNX (its full-precision twin is `functional.unquantized(model)`); default: the
    config's."""
    model = functional.as_functional(model)
    self.config, self.mesh, self.state_shardings, self.steps = config, mesh, state_shardings, dict(steps)
    self.loss_fn = loss_fn
    self.info = datasets.dataset_info(config.data)
    self.dtype = state_lib.compute_dtype(config)
    if model is None:
      self.models = {True: state_lib.create_model(config), False: state_lib.create_model(config, quantized=False)}
    else:
      self.models = {True: model, False: functional.unquantized(model)}
    self._compiled: dict = {}
    self.compile_seconds: dict[tuple[str, bool], float] = {}  # (step name, quantized) -> seconds compiling it

  def executable(self, name: str, state, batch, quantized: bool = True):
    """The compiled program for step `name` (compiling it for these shapes the first time)."""
    key = (name, quantized)
    if key not in self._compiled:
      if name not in self.steps:
        raise KeyError(f'no step {name!r} in these programs: {sorted(self.steps)}')
      step = self.steps[name]
      fn = functools.partial(step.fn, apply_fn=state_lib.apply_fn(self.models[quantized], self.config.seed), info=self.info, dtype=self.dtype,
                             loss_fn=self.loss_fn)
      rep = sharding_lib.replicated(self.mesh)
      batch_sh = {k: sharding_lib.batch_sharding(self.mesh) for k in batch}
      started = time.perf_counter()
      self._compiled[key] = compile_program(
          fn, (state, batch), in_shardings=(self.state_shardings, batch_sh),
          out_shardings=(self.state_shardings, rep) if step.updates_state else rep,
          donate=step.updates_state, options=compiler_options(self.config, name))
      self.compile_seconds[key] = time.perf_counter() - started
    return self._compiled[key]

  def run(self, name: str, state, batch, quantized: bool = True) -> Any:
    return self.executable(name, state, batch, quantized)(state, batch)

  def train(self, state, batch, quantized: bool = True):
    return self.run('train', state, batch, quantized)

  def eval(self, state, batch, quantized: bool = True):
    return self.run('eval', state, batch, quantized)

  def moments(self, state, batch, quantized: bool = True):
    return self.run('moments', state, batch, quantized)


def setup_compilation_cache(config) -> None:
  """JAX's persistent compilation cache (repeated runs stop paying seconds per compile). Programs that compile
  in under 0.5 s are not cached, unless $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says otherwise (the
  tests set 0: their many short runs each compile dozens of small programs)."""
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
  if 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS' not in os.environ:  # JAX reads it at import: nothing to do
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
