"""Dataset readers as a table: each reader (`READERS`: 'idx', 'tfds', 'text', 'user') owns its facts, where it
reads, its random-access sources and its training and evaluation streams (image crops, flips and JPEG decoding;
text windows; the padded last evaluation batch). A `datasets.DatasetInfo` names its reader; nothing outside this
module tests a reader's name or how a reader stores its images.

Image streams: training batch k is a pure function of (seed, k) and the process's rows, so a run on N processes
sees the same global batches and augmentations as on one (`_ProcessRows`); images leave the host as uint8.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import grain
import numpy as np

from ttq_jax import augment as augment_lib
from ttq_jax import files
from ttq_jax import text
from ttq_jax.errors import ConfigError, DataError
from ttq_jax.idx import fashion_mnist_dir, load_fashion_mnist
from ttq_jax.sources import ArraySource, Subset, as_example, stack

# Augmentation draws from seed + 1 (the shuffle uses the seed itself).
AUGMENT_SEED_OFFSET = 1


class _ProcessRows:
  """Element i of process p = row p*L + i%L of global batch i//L in the global example stream, so
  every process count sees the same global batches (and reads only its own rows)."""

  def __init__(self, stream, global_batch: int, local_batch: int, process_index: int):
    self.stream, self.b, self.l, self.p = stream, global_batch, local_batch, process_index

  def global_position(self, i: int) -> int:
    return (i // self.l) * self.b + self.p * self.l + i % self.l

  def __len__(self) -> int:
    return (len(self.stream) // self.b) * self.l

  def __getitem__(self, i):
    j = self.global_position(i)
    return dict(self.stream[j], position=j)


def _image_train_dataset(source, info, data_config, *, local_batch_size: int, seed: int, process_index: int,
                         process_count: int, augment: bool) -> grain.MapDataset:
  global_batch = local_batch_size * process_count
  stream = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
  rows = _ProcessRows(stream, global_batch, local_batch_size, process_index)
  if info.encoded:  # decoded and cropped per example (in the workers)
    size = info.input_shape[0]
    if augment:  # keyed by the example's global position
      train_crop = augment_lib.TRAIN_CROPS[data_config.train_crop]
      crop = lambda ex: train_crop(ex['image'], np.random.default_rng([seed + AUGMENT_SEED_OFFSET, ex['position']]), size)
    else:
      crop = lambda ex: augment_lib.imagenet_eval_crop(ex['image'], size, info.eval_short_side)
    ds = grain.MapDataset.source(rows).map(lambda ex: augment_lib.prepared(ex, crop, 'train', f'position {ex["position"]}'))
  else:
    ds = grain.MapDataset.source(rows).map(lambda ex: dict(as_example(ex), position=ex['position']))
  ds = ds.batch(local_batch_size, drop_remainder=True, batch_fn=stack)
  if augment and not info.encoded:
    pad, flip = int(data_config.crop_padding), bool(data_config.random_flip)
    lo, hi = process_index * local_batch_size, (process_index + 1) * local_batch_size

    def crop_flip(batch, rng):  # the rng of batch k is the same on every process: draw globally, use our rows
      return dict(batch, image=augment_lib.random_crop_flip(batch['image'], rng, pad, flip, rows=slice(lo, hi),
                                                            global_size=global_batch))
    ds = ds.random_map(crop_flip, seed=seed + AUGMENT_SEED_OFFSET)
  return ds


def _image_eval_dataset(source, info, data_config, *, split: str, global_batch_size: int, process_index: int,
                        process_count: int) -> grain.MapDataset:
  del data_config
  n, local = len(source), global_batch_size // process_count
  examples = grain.MapDataset.source(source)
  if info.encoded:
    crop = lambda ex: augment_lib.imagenet_eval_crop(ex['image'], info.input_shape[0], info.eval_short_side)
    examples = examples.map_with_index(lambda i, ex: augment_lib.prepared(ex, crop, split, f'index {i}'))
  else:
    examples = examples.map(as_example)

  def batch(k: int) -> dict[str, np.ndarray]:
    idx = np.arange(k * global_batch_size + process_index * local, k * global_batch_size + (process_index + 1) * local)
    valid = idx < n
    return dict(stack([examples[int(i)] for i in np.where(valid, idx, 0)]), mask=valid.astype(np.float32))
  return grain.MapDataset.range(-(-n // global_batch_size)).map(batch)


@dataclasses.dataclass(frozen=True)
class Reader:
  """One reader: `open(data_config, split, info, user_sources)` -> the split's random-access source (limit
  applied; 'validation' only for a dataset with a split of its own), `location(data_config)` for the console,
  `facts(entry, data_config)` -> the registry entry completed with what the data decide (the text's window count),
  and the two streams over a source."""
  open: Callable
  location: Callable[[object], str]
  facts: Callable = lambda entry, data_config: entry
  train_dataset: Callable = _image_train_dataset
  eval_dataset: Callable = _image_eval_dataset


def _limited(source, data_config):
  limit = int(data_config.limit_examples or 0)
  return Subset(source, np.arange(min(limit, len(source)))) if limit else source


def _open_user(data_config, split, info, user_sources):
  del info
  if user_sources is None:
    raise ConfigError(f"data.name={data_config.name!r} is your own data, which this process does not have: pass "
                      'data=... (the train / test arrays or sources the run was trained on)')
  return _limited(user_sources[split], data_config)


def _open_idx(data_config, split, info, user_sources):
  del info, user_sources
  images, labels = load_fashion_mnist(split, data_config.data_dir or None)
  limit = int(data_config.limit_examples or 0)
  return ArraySource(images[:limit], labels[:limit]) if limit else ArraySource(images, labels)


def _open_tfds(data_config, split, info, user_sources):
  del user_sources
  name, limit = data_config.name, int(data_config.limit_examples or 0)
  if files.is_url(data_config.data_dir or ''):
    raise DataError(f'data.data_dir={data_config.data_dir!r}: {name} is read as ArrayRecord from local disk; copy the '
                    f'prepared dataset to the host first (e.g. `gcloud storage cp -r {data_config.data_dir}/{name} '
                    '~/tensorflow_datasets/`) and pass that folder')
  import tensorflow_datasets as tfds  # only the ArrayRecord reader: no TensorFlow needed
  tfds_split = info.test_split if split == 'test' else 'train'
  if limit:
    tfds_split = f'{tfds_split}[:{limit}]'
  # ImageNet's JPEGs are decoded by `augment.decode_image` (in the workers); tfds would decode with PIL / OpenCV here
  decoders = {'image': tfds.decode.SkipDecoding()} if info.encoded else None
  try:
    return tfds.data_source(name, split=tfds_split, data_dir=data_config.data_dir or None, decoders=decoders)
  except Exception as e:  # tfds raises several types for a missing dataset
    raise DataError(
        f'{name} ({tfds_split}) is not prepared as ArrayRecord in {data_config.data_dir or "~/tensorflow_datasets"} '
        f'({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ""}); prepare it with '
        f'`tfds build {name} --file_format=array_record` (see README, "Datasets")') from None


def _text_train_dataset(source, info, data_config, *, augment: bool, **stream):
  del info, augment  # windows at random starts are the text's only randomness
  return text.train_dataset(data_config, source_bytes=source, **stream)


def _text_eval_dataset(source, info, data_config, **stream):
  del info
  return text.eval_dataset(data_config, source_bytes=source, **stream)


READERS: dict[str, Reader] = {
    'idx': Reader(_open_idx, lambda dc: fashion_mnist_dir(dc.data_dir or None)),
    'tfds': Reader(_open_tfds, lambda dc: dc.data_dir or '~/tensorflow_datasets'),
    'text': Reader(lambda dc, split, info, user_sources: text.source(dc, split),
                   lambda dc: f'{text.corpus_dir(dc.data_dir or None)} (corpus sha256 {text.record(dc)["corpus_sha256"][:16]})',
                   facts=text.dataset_facts,
                   train_dataset=_text_train_dataset, eval_dataset=_text_eval_dataset),
    'user': Reader(_open_user, lambda dc: 'the arrays or sources given as data='),
}


def reader(info) -> Reader:
  """The reader of a `datasets.DatasetInfo`."""
  if info.reader not in READERS:
    raise ConfigError(f'reader={info.reader!r} is unknown: allowed are {", ".join(READERS)}')
  return READERS[info.reader]
