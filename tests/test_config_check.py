"""Config validation: choices come from the dispatch tables, bad values are one-line ConfigErrors,
and the workdir guard refuses a changed model/data config."""

import pytest

from ttq_jax import config_check
from ttq_jax import workdirs
from ttq_jax import export_format
from ttq_jax import optim
from ttq_jax import programs
from ttq_jax import quant
from ttq_jax import state as state_lib
from ttq_jax.errors import ConfigError


def test_the_packaged_schema_is_configs_base():
  """ttq_jax/config_schema.json (what the package reads) holds exactly configs/base.py's keys and defaults."""
  from configs import base
  assert config_check.schema() == base.flat_defaults(), (
      'ttq_jax/config_schema.json differs from configs/base.py: run `python -m configs.base`')


def test_nothing_in_the_package_imports_configs():
  import pathlib
  import re
  package = pathlib.Path(config_check.__file__).parent
  offenders = [str(p) for p in package.rglob('*.py')
               if re.search(r'^\s*(from configs\b|import configs\b)', p.read_text(), re.M)]
  assert not offenders


def test_choices_are_the_dispatch_tables():
  """Allowed values are exactly the keys the code dispatches through (nothing allowed without code)."""
  assert config_check.CHOICES['lr_schedule'] is optim.SCHEDULES
  assert config_check.CHOICES['optimizer'] is optim.OPTIMIZERS
  assert config_check.CHOICES['scale_optimizer'] is optim.SCALE_OPTIMIZERS
  assert config_check.CHOICES['quant.scale_init'] is quant.SCALE_INITS
  assert config_check.CHOICES['dtype'] is state_lib.DTYPES
  assert config_check.CHOICES['export.packing'] is export_format.PACKINGS
  assert config_check.CHOICES['xla_cpu_ynn_fusion'] is programs.YNN_FUSION_MODES


@pytest.mark.parametrize('key', sorted(config_check.CHOICES))
def test_every_allowed_value_validates_and_an_unknown_one_is_named(smoke_config, text_corpus, key):
  from ttq_jax import datasets
  table = config_check.CHOICES[key]
  section, _, leaf = key.rpartition('.')
  target = smoke_config[section] if section else smoke_config
  for value in table:
    if key == 'model.name' and value.startswith('alexnet'):
      continue  # needs larger images than Fashion-MNIST (its own test)
    if key == 'data.name' and datasets.DATASETS[value].reader == 'text':  # read whole, from a corpus folder
      smoke_config.data.limit_examples, smoke_config.data.data_dir = 0, text_corpus
    if key == 'quant.scale_init':  # each method takes its own scale inits (a test below refuses the others)
      smoke_config.quant.method = next(m.name for m in quant.METHODS.values() if value in m.scale_inits)
    target[leaf] = value
    config_check.validate(smoke_config)
  target[leaf] = 'nope'
  with pytest.raises(ConfigError, match=f"{key}='nope' is unknown: allowed are {', '.join(sorted(table))}$"):
    config_check.validate(smoke_config)


@pytest.mark.parametrize('overrides,message', [
    ({'init_from': '/runs/fp', 'fp_warmup_epochs': 1.0}, "init_from='/runs/fp' and a full-precision warm-up \\(fp_warmup_epochs=1.0, fp_warmup_steps=0\\) are both set"),
    ({'learning_rate': 0.0}, 'learning_rate=0 with scale_optimizer=.adam.'),
    ({'ternary_kernel_lr_multiplier': 0.0}, 'ternary_kernel_lr_multiplier=0.0 must be > 0'),
    ({'batch_size': 0}, 'batch_size=0 must be a positive integer'),
    ({'lr_schedule': 'piecewise', 'lr_values': (0.1, 0.01)}, r'lr_boundaries_epochs=\(0.0,\) and lr_values'),
])
def test_bad_combinations_are_one_line_errors(smoke_config, overrides, message):
  for k, v in overrides.items():
    smoke_config[k] = v
  with pytest.raises(ConfigError, match=message) as e:
    config_check.validate(smoke_config)
  assert '\n' not in str(e.value)


def test_quant_errors_become_config_errors(smoke_config):
  smoke_config.quant.t = 1.5
  with pytest.raises(ConfigError, match='quant.t=1.5 is out of range'):
    config_check.validate(smoke_config)


@pytest.mark.parametrize('overrides,message', [
    ({'quant.scale_init': 'mean_abs'}, "quant.scale_init='mean_abs' does not apply to quant.method='paretoq': allowed "
                                       "are None \\(the method's own, 'max_abs'\\) or max_abs$"),
    ({'quant.scale_init': 'constant'}, "quant.scale_init='constant' does not apply to quant.method='paretoq'"),
    ({'normalize_init': True}, "normalize_init=True does not apply to quant.method='paretoq'"),
    ({'quant.w_n_init': 2.0}, "quant.w_n_init=2.0 does not apply to quant.method='paretoq'"),
    ({'quant.threshold': 'mean'}, "quant.threshold='mean' does not combine with quant.method='paretoq'"),
    ({'quant.scale_granularity': 'row'}, "quant.scale_granularity='row' is unknown: allowed are tensor, channel$"),
])
def test_settings_paretoq_does_not_take_are_one_line_errors(smoke_config, overrides, message):
  smoke_config.quant.method = 'paretoq'
  config_check.validate(smoke_config)  # its defaults (scale_init None: its own) are fine
  for key, value in overrides.items():
    section, _, leaf = key.rpartition('.')
    (smoke_config[section] if section else smoke_config)[leaf] = value
  with pytest.raises(ConfigError, match=message) as e:
    config_check.validate(smoke_config)
  assert '\n' not in str(e.value)


def test_init_from_without_warmup_and_fp_runs_with_both_are_fine(smoke_config):
  smoke_config.init_from, smoke_config.fp_warmup_epochs = '/runs/fp', 0.0
  config_check.validate(smoke_config)
  smoke_config.quant.method, smoke_config.fp_warmup_epochs = 'fp', 1.0  # no ternary phase: nothing to refuse
  config_check.validate(smoke_config)


def test_workdir_guard(smoke_config, tmp_path):
  wd = str(tmp_path)
  workdirs.prepare_workdir(smoke_config, wd)
  (tmp_path / 'checkpoints' / '3').mkdir(parents=True)  # a run that saved a step
  smoke_config.learning_rate = 0.5
  smoke_config.num_train_steps = 99
  workdirs.prepare_workdir(smoke_config, wd)  # schedule changes are fine
  smoke_config.model.name = 'resnet20'
  smoke_config.quant.method = 'twn'
  with pytest.raises(ConfigError, match="model.name: 'resnet_tiny' -> 'resnet20', quant.method: 'ttq' -> 'twn'"):
    workdirs.prepare_workdir(smoke_config, wd)
  smoke_config.allow_config_change = True
  workdirs.prepare_workdir(smoke_config, wd)


def test_workdir_guard_on_the_ternary_kernel_lr_multiplier():
  """It changes a TTQ run's optimizer state, so a TTQ workdir refuses another value (a saved config
  from before the key existed counts as 1.0); FP / TWN runs do not use it, so it is not compared."""
  old = {'quant': {'method': 'ttq'}}  # written before the key existed
  assert workdirs.changed_guarded_fields(old, {'quant': {'method': 'ttq'}, 'ternary_kernel_lr_multiplier': 1.0}) == []
  assert workdirs.changed_guarded_fields(old, {'quant': {'method': 'ttq'}, 'ternary_kernel_lr_multiplier': 10.0}) == [
      'ternary_kernel_lr_multiplier']
  twn = {'quant': {'method': 'twn'}}
  assert workdirs.changed_guarded_fields(twn, {'quant': {'method': 'twn'}, 'ternary_kernel_lr_multiplier': 10.0}) == []


@pytest.mark.parametrize('saved_threshold,current,changed', [
    ('max', dict(method='ttq', threshold=None), []),                # TTQ's own rule is max: the same
    ('max', dict(method='ttq', threshold='mean'), ['quant.threshold']),
    ('max', dict(method='twn', threshold=None), []),                # before quant.k, TWN ignored the saved 'max'
    ('max', dict(method='twn', threshold='mean'), []),
    ('max', dict(method='twn', threshold='max'), ['quant.threshold']),  # TWN with t: another computation
    ('sparsity', dict(method='ttq', threshold='sparsity'), []),
])
def test_configs_saved_before_the_threshold_choice_compare_by_the_rule_in_force(saved_threshold, current, changed):
  saved = {'quant': {'method': current['method'], 'threshold': saved_threshold, 't': 0.05}}  # no quant.k
  now = {'quant': {**current, 't': 0.05, 'k': 0.7}}
  assert workdirs.changed_guarded_fields(saved, now) == changed


def test_a_workdir_saved_without_the_new_keys_resumes(smoke_config, tmp_path, caplog):
  """A run written before `quant.k`, `model.bn_*`, `fp_warmup_steps`, `quant.activations` (its config.json
  lacks them and says threshold 'max') resumes under today's config: a key a saved config lacks means its default
  (`config_check.schema()`, the one defaults table), and the run ran with exactly those values."""
  import json
  import os
  from ttq_jax import train
  workdir = str(tmp_path / 'run')
  smoke_config.num_train_steps = 3
  train.train_and_evaluate(smoke_config, workdir)
  path = os.path.join(workdir, 'config.json')
  saved = json.load(open(path))
  for section, key in (('quant', 'k'), ('model', 'bn_unbiased_variance'), ('model', 'bn_bias_init'),
                       ('quant', 'activations')):
    assert saved[section][key] == config_check.schema()[f'{section}.{key}']
    del saved[section][key]
  assert saved['fp_warmup_steps'] == config_check.schema()['fp_warmup_steps']
  del saved['fp_warmup_steps']
  assert workdirs.saved_values(saved)['quant.k'] == 0.7 and workdirs.saved_values(saved)['fp_warmup_steps'] == 0
  saved['quant']['threshold'] = 'max'
  json.dump(saved, open(path, 'w'))
  smoke_config.num_train_steps = 6
  with caplog.at_level('INFO'):
    result = train.train_and_evaluate(smoke_config, workdir)
  assert result['step'] == 6 and 'resumed from step 3' in caplog.text  # trained on from step 3, not refused


def test_batch_size_larger_than_the_training_split_is_refused(smoke_config):
  smoke_config.batch_size = 100_000
  with pytest.raises(ConfigError, match=r'batch_size=100000 is larger than the training split \(512 examples of '
                                        r'fashion_mnist\): allowed is 1 to 512'):
    config_check.validate(smoke_config)


def test_configs_are_locked_and_unknown_keys_are_refused_in_python(smoke_config):
  from configs import fashion_mnist
  c = fashion_mnist.get_config()
  for assign in (lambda: setattr(c, 'num_train_step', 3), lambda: setattr(c.data, 'nme', 'x'),
                 lambda: c.num_train_step):  # set on a locked config, on a nested one, read: one line, no config dump
    with pytest.raises(AttributeError) as e:
      assign()
    assert str(e.value) in ("config key 'num_train_step' is unknown: did you mean num_train_steps?",
                            "config key 'nme' is unknown: did you mean name?")
  c.unlock()
  c.num_train_step = 3  # a config built by hand (unlocked): validate refuses it as the command line would
  with pytest.raises(ConfigError, match="config key 'num_train_step' is unknown: did you mean num_train_steps"):
    config_check.validate(c)


@pytest.mark.parametrize('key,value,message', [
    ('data.seq_len', 1, r'data.seq_len=1 must be an integer >= 2'),
    ('data.validation_examples', 100, r'data.validation_examples=100: python_docs has its own validation split and '
                                      r'is read whole: allowed is 0'),
    ('data.limit_examples', 10, r'data.limit_examples=10: python_docs has its own validation split'),
    ('model.mlp_width', 0, None),  # 0: the model's own
])
def test_text_dataset_settings_are_checked(text_corpus, key, value, message):
  from tests.conftest import make_lm_smoke_config
  config = make_lm_smoke_config(text_corpus)
  section, leaf = key.split('.')
  config[section][leaf] = value
  if message is None:
    config_check.validate(config)
    return
  with pytest.raises(ConfigError, match=message):
    config_check.validate(config)


def test_a_size_key_for_a_model_without_that_field_is_refused(smoke_config):
  smoke_config.model.mlp_width = 64  # resnet_tiny has no MLP
  with pytest.raises(ConfigError, match=r"model.mlp_width=64 does not apply to model 'resnet_tiny' \(it has no field "
                                        r'mlp_width\): allowed is 0'):
    from ttq_jax import state as state_lib
    state_lib.create_model(smoke_config)


def test_a_missing_corpus_is_one_line_saying_how_to_install_it(text_corpus, tmp_path):
  from tests.conftest import make_lm_smoke_config
  from ttq_jax.errors import DataError
  config = make_lm_smoke_config(text_corpus)
  config.data.data_dir = str(tmp_path / 'empty')
  with pytest.raises(DataError, match=r'the python_docs corpus is not in .*apt-get install python3-doc'):
    config_check.validate(config)


def test_target_accuracy_is_refused_for_a_task_without_accuracy(text_corpus):
  from tests.conftest import make_lm_smoke_config
  config = make_lm_smoke_config(text_corpus)
  config.target_accuracy = 0.5
  with pytest.raises(ConfigError, match="target_accuracy=0.5 applies to classification; data.name='python_docs' is a "
                                        'next_byte task without accuracy: allowed is 0'):
    config_check.validate(config)
