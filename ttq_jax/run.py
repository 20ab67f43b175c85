"""The one place where a run is built: (config, workdir, model, data) -> what training, evaluation and export need.

    run = run_lib.for_training(config, workdir, model=model, data=data)     # every start check, nothing written
    state = run.fresh_state(); programs = run.programs(state, STEPS)
    run = run_lib.for_workdir(None, workdir)                                  # eval / export: the saved config
    step, state, data_state = run.restore()

Every check that can refuse (the model, the config, the workdir's saved config, writability, the mesh and batch
sizes) runs in `for_training` / `for_workdir`, before anything is compiled or written.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax

from ttq_jax import config_check
from ttq_jax import datasets
from ttq_jax import files
from ttq_jax import functional
from ttq_jax import programs as programs_lib
from ttq_jax import sharding as sharding_lib
from ttq_jax import state as state_lib
from ttq_jax import workdirs
from ttq_jax.errors import ConfigError


@dataclasses.dataclass
class Run:
  """A run's checked config, resolved workdir, model (None: the config's; an NNX module as
  `functional.NNXModel`), your own data's sources, device mesh and loss."""
  config: Any
  workdir: str
  model: Any
  user_sources: dict | None
  mesh: jax.sharding.Mesh
  loss_fn: Callable | None = None

  @property
  def custom_model(self) -> bool:
    return self.model is not None

  def create_model(self):
    """The model the steps call (your own, or the config's)."""
    return self.model if self.model is not None else state_lib.create_model(self.config)

  def fresh_state(self) -> state_lib.TrainState:
    return state_lib.create_train_state(self.config, self.create_model(), self.mesh)

  def programs(self, state, steps: Mapping[str, programs_lib.Step], model=None) -> programs_lib.Programs:
    """The run's jitted-once programs for `state`'s shardings (`model`: another model than the run's, e.g. the
    plain model an export runs in)."""
    return programs_lib.Programs(self.config, self.mesh, state_lib.shardings_of(state), steps,
                                 self.model if model is None else model, self.loss_fn)

  def restore(self, step: int | None = None) -> tuple[int, state_lib.TrainState, dict]:
    """(step, state, data state) of the workdir's newest readable checkpoint (or exactly `step`), on the run's
    mesh; raises CheckpointError when there is none."""
    return workdirs.restore_state(self.workdir, self.fresh_state(), step)


def _mesh(config, *batch_keys: str) -> jax.sharding.Mesh:
  mesh = sharding_lib.create_mesh(config.mesh_shape, config.mesh_axes)
  for key in batch_keys:
    sharding_lib.check_batch_size(config[key], mesh, key)
  return mesh


def for_training(config, workdir: str, *, model=None, data=None, loss_fn=None) -> Run:
  """A training run: `config` as given (with your own data's facts), checked; the workdir checked against a run
  already in it (nothing written yet)."""
  model = functional.as_functional(model)  # an NNX module as init / apply; refuses what no step can call
  config, user_sources = datasets.with_user_data(config, data)
  config_check.validate(config, custom_model=model is not None)
  config_check.check_warm_start(config)
  workdir = files.resolve(workdir)
  workdirs.prepare_workdir(config, workdir, write=False)
  programs_lib.setup_compilation_cache(config)
  return Run(config, workdir, model, user_sources, _mesh(config, 'batch_size', 'eval_batch_size'), loss_fn)


def for_workdir(config, workdir: str, *, model=None, data=None, loss_fn=None, writes: bool = True) -> Run:
  """A run of what `workdir` holds (eval, export, sample): its saved config decides, `config` (may be None) only
  what `workdirs.EVAL_OVERRIDABLE` lists. `writes`: the mode writes its results into the workdir (checked
  writable first; sampling writes nothing)."""
  model = functional.as_functional(model)
  workdir = files.resolve(workdir)
  if not files.is_url(workdir) and not files.isdir(workdir):  # never created by eval or export
    raise ConfigError(f'workdir {workdir} does not exist: eval, export and sample read a workdir that training wrote')
  if writes:
    workdirs.check_writable(workdir)  # results are written there: refuse before any work
  config = workdirs.workdir_config(config, workdir)
  config, user_sources = datasets.with_user_data(config, data, workdir)
  config_check.validate(config, custom_model=model is not None)
  programs_lib.setup_compilation_cache(config)
  return Run(config, workdir, model, user_sources, _mesh(config, 'eval_batch_size'), loss_fn)
