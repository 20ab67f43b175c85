"""Compiled programs: per-program XLA:CPU options change speed, not numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import scaled_allclose
from tests.test_train import programs_state_batches
from ttq_jax import programs as programs_lib

# Fraction of the compared tree's largest entry (see conftest.scaled_allclose). Measured on a 2-core Xeon,
# fusions off vs XLA's default: train-step updates 1.7e-2 (FP) / 3.5e-3 (TTQ): the same rounding amplification
# as across device counts (see UPDATE_TOL in test_train: permuting the batch on one device moves them too),
# BN statistics 1.3e-5 / 2.5e-5, BN batch moments 3.2e-5 (the
# variance is E[x^2] - E[x]^2: its rounding is relative to E[x^2], not to the variance), eval sums 1e-7.
TOL = {('fp', 'train'): 5e-2, ('ttq', 'train'): 2e-2, 'moments': 1e-3, 'eval': 1e-4}


@pytest.mark.parametrize('program', ['train', 'eval', 'moments'])
@pytest.mark.parametrize('method', ['ttq', 'fp'])
def test_cpu_fast_path_matches_xla_default(smoke_config, method, program):
  """The per-program XLA:CPU options (YNNPACK fusions off) compile another executable that computes the
  same loss, parameter update and BN statistics (train), eval sums and BN batch moments as XLA's default."""
  smoke_config.quant.method = method
  smoke_config.batch_size = 32
  outs, texts = [], []
  for option in ('off', 'on'):
    smoke_config.xla_cpu_ynn_fusion = option
    programs, state, batches = programs_state_batches(smoke_config, (1, 1), n=1)
    batch = dict(batches[0], mask=jnp.ones(32, jnp.float32)) if program == 'eval' else batches[0]
    texts.append(programs.executable(program, state, batch).as_text())
    if program == 'train':
      before = jax.device_get(state.params)
      state, m = programs.train(state, batch)
      outs.append((float(m['train_loss']), jax.tree.map(np.subtract, jax.device_get(state.params), before),
                   jax.device_get(state.batch_stats)))
    else:
      outs.append(jax.device_get(programs.run(program, state, batch)))
    assert (programs_lib.compiler_options(smoke_config, program) is None) == (option == 'on')
  assert texts[0] != texts[1]  # the option really produced another executable
  if program == 'train':
    (loss_a, update_a, stats_a), (loss_b, update_b, stats_b) = outs
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    scaled_allclose(update_a, update_b, TOL[(method, 'train')], 'update')
    scaled_allclose(stats_a, stats_b, TOL['moments'], 'batch_stats')
  else:
    scaled_allclose(outs[0], outs[1], TOL[program], program)


def test_ynn_fusion_modes():
  class C:
    xla_cpu_ynn_fusion = 'auto'
  assert programs_lib.compiler_options(C, 'train') == programs_lib.CPU_PROGRAM_OPTIONS['train']
  C.xla_cpu_ynn_fusion = 'on'
  assert programs_lib.compiler_options(C, 'train') is None
  C.xla_cpu_ynn_fusion = 'off'
  assert programs_lib.compiler_options(C, 'anything') == {'xla_cpu_experimental_ynn_fusion_type': ''}


def test_programs_refuse_a_step_they_do_not_have(smoke_config):
  from ttq_jax import evaluation
  from ttq_jax import state as state_lib
  mesh, state = state_lib.create_mesh_and_state(smoke_config)
  programs = programs_lib.Programs(smoke_config, mesh, state_lib.shardings_of(state), evaluation.STEPS)
  with pytest.raises(KeyError, match="no step 'train' in these programs: \\['eval', 'moments'\\]"):
    programs.train(state, {})
