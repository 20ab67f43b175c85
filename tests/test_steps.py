"""Steps and phases: one answer for the optimizer's multiplier, the loop, --mode eval and --mode export."""

import pytest

from ttq_jax import steps


@pytest.fixture
def config(smoke_config):
  smoke_config.data.limit_examples = 512
  smoke_config.batch_size = 64  # 8 steps per epoch
  return smoke_config


def test_steps_per_epoch_and_total(config):
  assert steps.steps_per_epoch(config) == 8
  assert steps.epochs_to_steps(config, 2.5) == 20
  config.num_train_steps = -1
  config.num_epochs = 1.5
  assert steps.total_steps(config) == 12
  config.num_train_steps = 7
  assert steps.total_steps(config) == 7


@pytest.mark.parametrize('method,warmup,init_from,start', [
    ('ttq', 0.0, '', 0),       # from scratch: ternary from the first step
    ('ttq', 0.5, '', 4),       # in-run warm-up of half an epoch
    ('twn', 1.0, '', 8),
    ('ttq', 0.0, '/fp/run', 0),  # warm start from another run
    ('fp', 1.0, '', 0),        # nothing changes in a full-precision run
])
def test_ternary_start_step(config, method, warmup, init_from, start):
  config.quant.method, config.fp_warmup_epochs, config.init_from = method, warmup, init_from
  assert steps.ternary_start_step(config) == start


def test_checkpoint_phase(config):
  """A checkpoint at the end of the warm-up (step 4 here) still holds the full-precision model: the scales
  are set before step 5. Without a warm-up every checkpoint is ternary; an FP run never is."""
  config.fp_warmup_epochs = 0.5
  assert [steps.is_ternary_at(config, s) for s in (1, 3, 4, 5, 9)] == [False, False, False, True, True]
  config.fp_warmup_epochs = 0.0
  assert steps.is_ternary_at(config, 1) and steps.is_ternary_at(config, 0)
  config.quant.method = 'fp'
  assert not steps.is_ternary_at(config, 100)
