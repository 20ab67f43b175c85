"""Datasets: the registry (each dataset's facts as fields of its `DatasetInfo`), your own data (`user_data`),
the held-out validation split, and a config's sources by split.

A source is random access ({'image': uint8 HWC (or encoded bytes), 'label': int} by index); how each kind of
dataset is read is its reader's (`ttq_jax.readers`), the pipelines over sources are `ttq_jax.input_pipeline`.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from ttq_jax import files
from ttq_jax import readers
from ttq_jax.errors import ConfigError
from ttq_jax.idx import load_fashion_mnist  # noqa: F401 - datasets.load_fashion_mnist: documented
from ttq_jax.sources import ArraySource, Subset, as_example

# The validation split (`data.validation_examples` > 0) is the same for every run and every config.seed:
# a permutation of the training split drawn with this seed; its first N examples are held out.
VALIDATION_SEED = 20170208
SPLITS = ('train', 'validation', 'test')
@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_classes: int  # outputs per example (classes), or per position (a next-byte task's vocabulary)
  input_shape: tuple[int, ...]  # what the model sees per example: HWC image, or (seq_len,) bytes
  train_size: int
  test_size: int
  mean: tuple[float, ...]  # per channel, in [0, 255] units
  std: tuple[float, ...]
  test_split: str = 'test'
  reader: str = 'tfds'        # readers.READERS: 'idx' (gzip IDX files), 'tfds' (ArrayRecord), 'text', 'user'
  encoded: bool = False       # images stored encoded (JPEG): decoded and cropped per example (`augment`)
  eval_short_side: int = 0    # encoded images: the short side resized to before the centre crop
  task: str = 'classify'      # ttq_jax.tasks.TASKS: the steps' loss and metrics, the metric runs are chosen by
  input_dtype: str = 'float32'  # of the model's input (uint8 images are normalised to float32 on the device)
  own_validation: bool = False  # a validation split of its own (else held out of train: data.validation_examples)


DATASETS = {
    'fashion_mnist': DatasetInfo(10, (28, 28, 1), 60_000, 10_000, (72.94,), (90.02,), reader='idx'),
    'cifar10': DatasetInfo(10, (32, 32, 3), 50_000, 10_000, (125.3, 123.0, 113.9), (63.0, 62.1, 66.7)),
    'imagenet2012': DatasetInfo(1000, (224, 224, 3), 1_281_167, 50_000, (123.675, 116.28, 103.53),
                                (58.395, 57.12, 57.375), test_split='validation', encoded=True, eval_short_side=256),
    # bytes; shape and sizes (in windows of data.seq_len) measured on the corpus by `text.dataset_facts`
    'python_docs': DatasetInfo(256, (0,), 0, 0, (), (), reader='text', task='next_byte', input_dtype='int32',
                               own_validation=True),
}

# Your own data (`data=` of train_and_evaluate / evaluate_workdir / export_workdir): the config names it
# USER_DATA_NAME and carries its facts (`data.user_dataset`, a DatasetInfo as JSON, saved in config.json); its
# sources travel explicitly, as `UserData.sources`, to the pipelines. Nothing is registered in module state.
USER_DATA_NAME = 'user'
USER_DATA_INFO = 'user_dataset.json'  # what workdirs written before `data.user_dataset` hold instead


@dataclasses.dataclass(frozen=True)
class UserData:
  """Your own data: its facts and its random-access sources by split ('train', 'test')."""
  info: DatasetInfo
  sources: dict


def user_data(*, train, test, num_classes: int | None = None, mean=None, std=None) -> UserData:
  """Your own data as the pipeline reads it (the `data=` dict of `train.train_and_evaluate` holds these
  arguments).

  `train` / `test`: random-access sources of {'image': HWC array, 'label': int} examples (`len` and
  indexing, e.g. a grain data source) or `(images, labels)` arrays. uint8 images are normalised on the
  device with `mean` / `std` (per channel, in image units; required for uint8 images), other dtypes go as
  float32 (mean / std default 0 / 1).
  `num_classes` defaults to 1 + the largest training label when the data are arrays.
  """
  train, test = (ArraySource(*x) if isinstance(x, tuple) else x for x in (train, test))
  first = np.asarray(as_example(train[0])['image'])
  input_shape = tuple(first.shape)
  if first.dtype == np.uint8 and (mean is None or std is None):
    raise ConfigError('data=...: the images are uint8 (0-255) and mean / std are not given, so they would enter the '
                      'model unnormalised: pass mean=... and std=... (per channel, in 0-255 units), or float images')
  if num_classes is None:
    if not isinstance(train, ArraySource):
      raise ConfigError('data=...: pass num_classes for a source that is not (images, labels) arrays')
    num_classes = int(np.max(train.labels)) + 1
  mean, std = (tuple(v if v is not None else (d,) * input_shape[-1]) for v, d in ((mean, 0.0), (std, 1.0)))
  info = DatasetInfo(int(num_classes), input_shape, len(train), len(test), mean, std, reader='user')
  return UserData(info, {'train': train, 'test': test})


def with_user_data(config, data, workdir: str | None = None):
  """(config, sources): `config` itself and None without `data`; else a copy of `config` that reads `data` (a
  dict of `user_data`'s arguments) as the dataset 'user', with its facts in `data.user_dataset`, and the data's
  sources. Without `data`, a workdir written before `data.user_dataset` existed gets the facts from its
  WORKDIR/user_dataset.json, so the model can be rebuilt (export); reading examples then needs `data`."""
  if data is None:
    if (workdir and config.data.name == USER_DATA_NAME and not config.data.user_dataset
        and files.exists(files.join(workdir, USER_DATA_INFO))):
      saved = json.loads(files.read_text(files.join(workdir, USER_DATA_INFO)))
      config = config.copy_and_resolve_references()
      saved['input_shape'] = saved.pop('image_shape', saved.get('input_shape'))  # the name it had then
      config.data.user_dataset = json.dumps({'reader': 'user', **saved})
    return config, None
  user = user_data(**dict(data))
  config = config.copy_and_resolve_references()
  config.data.name = USER_DATA_NAME
  config.data.user_dataset = json.dumps(dataclasses.asdict(user.info))
  return config, user.sources


def dataset_info(data_config) -> DatasetInfo:
  """The facts of the dataset `data_config` (a config's `data`, or a built-in dataset's name) names: a built-in
  entry, or your own data's (`data.user_dataset`)."""
  data_config = {'name': data_config} if isinstance(data_config, str) else data_config
  name = data_config['name']
  if name == USER_DATA_NAME and data_config.get('user_dataset'):
    saved = json.loads(data_config['user_dataset'])
    return DatasetInfo(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
  if name not in DATASETS:
    raise ConfigError(f'data.name={name!r} is unknown: allowed are {", ".join(sorted(DATASETS))}'
                      + (' (your own data: pass data=...)' if name == USER_DATA_NAME else ''))
  entry = DATASETS[name]
  return entry if isinstance(data_config, dict) else readers.reader(entry).facts(entry, data_config)


def data_location(data_config) -> str:
  """Which folder (and, for text, which corpus) a run of `data_config` reads."""
  return readers.reader(dataset_info(data_config)).location(data_config)


def normalize(images, info: DatasetInfo, dtype=np.float32):
  """uint8 NHWC -> (x - mean) / std in `dtype` (works on numpy and jax arrays)."""
  mean = np.asarray(info.mean, np.float32)
  std = np.asarray(info.std, np.float32)
  return ((images.astype(np.float32) - mean) / std).astype(dtype)


def validation_indices(train_size: int, n: int) -> tuple[np.ndarray, np.ndarray]:
  """(held-out, kept) indices of a training split of `train_size`: `n` drawn with VALIDATION_SEED."""
  if not 0 < n < train_size:
    raise ConfigError(f'data.validation_examples={n} must be between 1 and the training split size minus 1 '
                      f'({train_size - 1}), or 0 (no validation split)')
  perm = np.random.default_rng(VALIDATION_SEED).permutation(train_size)
  return np.sort(perm[:n]), np.sort(perm[n:])


def train_size(data_config) -> int:
  """Examples that training iterates over (the training split, less a held-out validation split)."""
  n = dataset_info(data_config).train_size
  if data_config.limit_examples:
    n = min(n, data_config.limit_examples)
  return n - int(data_config.validation_examples or 0)


# --------------------------------------------------------------------------- sources


def get_source(data_config, split: str, user_sources: dict | None = None):
  """A random-access source of {'image': uint8 HWC, 'label': int} for `split` ('train' | 'validation' |
  'test'). With `data.validation_examples` = N > 0, 'validation' is N training examples held out with a
  fixed seed and 'train' is the rest. `user_sources`: your own data's (`UserData.sources`)."""
  if split not in SPLITS:
    raise ConfigError(f'split={split!r} is unknown: allowed are {", ".join(SPLITS)}')
  info = dataset_info(data_config)
  open_split = lambda s: readers.reader(info).open(data_config, s, info, user_sources)
  if info.own_validation:
    return open_split(split)
  held_out = int(data_config.validation_examples or 0)
  if split == 'validation' and not held_out:
    raise ConfigError('split=validation needs data.validation_examples > 0')
  if split == 'test' or not held_out:
    return open_split(split)
  source = open_split('train')
  validation, kept = validation_indices(len(source), held_out)
  return Subset(source, validation if split == 'validation' else kept)
