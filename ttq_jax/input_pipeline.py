"""Input pipelines: Fashion-MNIST from gzip IDX files, CIFAR-10 / ImageNet from tfds ArrayRecord.

All datasets go through `grain.MapDataset` (random access, so the iterator state is one index and a
resumed run sees exactly the batches it would have seen). Each process reads only its shard
(`jax.process_index()`); images leave the host as uint8 and are normalised on the device
(`normalize`), which keeps host->device traffic 4x smaller. Batches are made by worker processes
(`data.worker_processes`, `BatchIterator`) or, with none, by threads of the training process.
ImageNet JPEGs are decoded here (simplejpeg / OpenCV) and resized as the official scripts do
(cv2.INTER_CUBIC).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import os
import signal
import struct
import threading
import time
import zlib
from typing import Iterator, Sequence

import grain
import numpy as np

from ttq_jax import files
from ttq_jax.errors import ConfigError, DataError

FASHION_MNIST_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
DEBIAN_FASHION_MNIST = '/usr/share/datasets/fashion-mnist'
# Random streams derived from config.seed: the shuffle uses the seed itself, augmentation seed + 1,
# and the un-augmented stream for BN re-estimation shuffles with seed + 7 (other batches than training).
AUGMENT_SEED_OFFSET = 1
CLEAN_STREAM_SEED_OFFSET = 7
# The validation split (`data.validation_examples` > 0) is the same for every run and every config.seed:
# a permutation of the training split drawn with this seed; its first N examples are held out.
VALIDATION_SEED = 20170208
SPLITS = ('train', 'validation', 'test')
# data.worker_processes = -1 (auto): the host's cores less what the training process keeps busy itself
# (the Python loop dispatching steps, device transfers, grain's reader threads).
AUTO_WORKERS = -1
TRAINING_PROCESS_CORES = 2


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_classes: int
  image_shape: tuple[int, int, int]  # what the model sees
  train_size: int
  test_size: int
  mean: tuple[float, ...]  # per channel, in [0, 255] units
  std: tuple[float, ...]
  test_split: str = 'test'


DATASETS = {
    'fashion_mnist': DatasetInfo(10, (28, 28, 1), 60_000, 10_000, (72.94,), (90.02,)),
    'cifar10': DatasetInfo(10, (32, 32, 3), 50_000, 10_000, (125.3, 123.0, 113.9), (63.0, 62.1, 66.7)),
    'imagenet2012': DatasetInfo(1000, (224, 224, 3), 1_281_167, 50_000, (123.675, 116.28, 103.53),
                                (58.395, 57.12, 57.375), test_split='validation'),
}


# Your own data, registered by name (`register_dataset`): name -> {'train': source, 'test': source};
# `data=` of train_and_evaluate / evaluate_workdir / export_workdir registers under USER_DATA_NAME.
USER_SOURCES: dict[str, dict[str, object]] = {}
USER_DATA_NAME = 'user'


def register_dataset(name: str, *, train, test, num_classes: int | None = None, mean=None, std=None) -> DatasetInfo:
  """Makes your own data a dataset of the pipeline (then `config.data.name = name`).

  `train` / `test`: random-access sources of {'image': HWC array, 'label': int} examples (`len` and
  indexing, e.g. a grain data source) or `(images, labels)` arrays. uint8 images are normalised on the
  device with `mean` / `std` (per channel, in image units; required for uint8 images), other dtypes go as
  float32 (mean / std default 0 / 1).
  `num_classes` defaults to 1 + the largest training label when the data are arrays.
  """
  if name in DATASETS and name not in USER_SOURCES and name != USER_DATA_NAME:  # your own name: replaced
    raise ConfigError(f'data name {name!r} is a built-in dataset: register yours under another name')
  train, test = (ArraySource(*x) if isinstance(x, tuple) else x for x in (train, test))
  first = np.asarray(_as_example(train[0])['image'])
  image_shape = tuple(first.shape)
  if first.dtype == np.uint8 and (mean is None or std is None):
    raise ConfigError(f'register_dataset({name!r}): the images are uint8 (0-255) and mean / std are not given, so they '
                      'would enter the model unnormalised: pass mean=... and std=... (per channel, in 0-255 units), '
                      'or float images')
  if num_classes is None:
    if not isinstance(train, ArraySource):
      raise ConfigError(f'register_dataset({name!r}): pass num_classes for a source that is not (images, labels) arrays')
    num_classes = int(np.max(train.labels)) + 1
  channels = image_shape[-1]
  info = DatasetInfo(int(num_classes), image_shape, len(train), len(test),
                     tuple(mean if mean is not None else (0.0,) * channels),
                     tuple(std if std is not None else (1.0,) * channels))
  DATASETS[name] = info
  USER_SOURCES[name] = {'train': train, 'test': test}
  return info


USER_DATA_INFO = 'user_dataset.json'  # WORKDIR/user_dataset.json: the DatasetInfo of the data a run trained on


def with_user_data(config, data, workdir: str | None = None):
  """`config` itself without `data`; else registers `data` (a dict of `register_dataset`'s arguments:
  train, test, and optionally num_classes, mean, std) as the dataset 'user' and returns a copy of
  `config` that reads it. Without `data`, a `workdir` that trained on your own data (its config says
  data.name 'user') makes that data's shapes and normalisation known again (WORKDIR/user_dataset.json), so the
  model can be rebuilt (export); reading examples then needs `data` (a one-line error says so)."""
  if data is None:
    if (workdir and config.data.name == USER_DATA_NAME and USER_DATA_NAME not in USER_SOURCES
        and files.exists(files.join(workdir, USER_DATA_INFO))):
      saved = json.loads(files.read_text(files.join(workdir, USER_DATA_INFO)))
      DATASETS[USER_DATA_NAME] = DatasetInfo(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    return config
  register_dataset(USER_DATA_NAME, **dict(data))
  config = config.copy_and_resolve_references()
  config.data.name = USER_DATA_NAME
  return config


def dataset_info(name: str) -> DatasetInfo:
  if name not in DATASETS:
    raise ConfigError(f'data.name={name!r} is unknown: allowed are {", ".join(sorted(DATASETS))}')
  return DATASETS[name]


def normalize(images, info: DatasetInfo, dtype=np.float32):
  """uint8 NHWC -> (x - mean) / std in `dtype` (works on numpy and jax arrays)."""
  mean = np.asarray(info.mean, np.float32)
  std = np.asarray(info.std, np.float32)
  return ((images.astype(np.float32) - mean) / std).astype(dtype)


# --------------------------------------------------------------------------- Fashion-MNIST (IDX)


def fashion_mnist_dir(data_dir: str | None) -> str:
  """config.data.data_dir (a folder or a bucket URL) when it is set: the only place looked (a run that names
  its data must not quietly read other files); else the first of $TTQ_DATA_DIR and Debian's folder that
  holds all four files."""
  names = [n for pair in FASHION_MNIST_FILES.values() for n in pair]
  if data_dir:
    missing = [n for n in names if not files.isfile(files.join(data_dir, n))]
    if missing:
      raise DataError(f'Fashion-MNIST not found in data.data_dir={data_dir!r}: missing {", ".join(missing)} '
                      f'(looked for {", ".join(names)}); put the four gzip IDX files there or unset data.data_dir')
    return data_dir
  candidates = [d for d in (os.environ.get('TTQ_DATA_DIR'), DEBIAN_FASHION_MNIST) if d]
  for d in candidates:
    if all(files.isfile(files.join(d, n)) for n in names):
      return d
  raise DataError(
      f'Fashion-MNIST not found: looked for {", ".join(names)} in {", ".join(candidates)}; '
      'install them with `apt-get install dataset-fashion-mnist` (Debian) or put the four gzip files '
      'from github.com/zalandoresearch/fashion-mnist in a folder named by --config.data.data_dir or $TTQ_DATA_DIR')


def _read_idx(path: str, expected_ndim: int) -> np.ndarray:
  try:
    data = gzip.decompress(files.read_bytes(path))
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f'malformed IDX file {path}: {e}') from None
  if len(data) < 4:
    raise DataError(f'malformed IDX file {path}: {len(data)} bytes')
  zero, dtype_code, ndim = struct.unpack('>HBB', data[:4])
  if zero != 0 or dtype_code != 0x08 or ndim != expected_ndim:
    raise DataError(f'malformed IDX file {path}: header says dtype 0x{dtype_code:02x}, {ndim} dims '
                    f'(want uint8 with {expected_ndim} dims)')
  if len(data) < 4 + 4 * ndim:
    raise DataError(f'malformed IDX file {path}: truncated header ({len(data)} bytes)')
  shape = struct.unpack('>' + 'I' * ndim, data[4:4 + 4 * ndim])
  body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if body.size != int(np.prod(shape)):
    raise DataError(f'malformed IDX file {path}: {body.size} values for shape {shape}')
  return body.reshape(shape)


def load_fashion_mnist(split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, 28, 28, 1], labels int32 [N]) of 'train' or 'test'."""
  d = fashion_mnist_dir(data_dir)
  images_file, labels_file = FASHION_MNIST_FILES[split]
  images = _read_idx(files.join(d, images_file), 3)[..., None]
  labels = _read_idx(files.join(d, labels_file), 1).astype(np.int32)
  if len(images) != len(labels):
    raise DataError(f'malformed Fashion-MNIST in {d}: {len(images)} images but {len(labels)} labels')
  return images, labels


class ArraySource:
  """Random-access source over in-memory arrays (grain's RandomAccessDataSource protocol)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i):
    return {'image': self.images[i], 'label': self.labels[i]}


class _Head:
  """The first `n` examples of a random-access source."""

  def __init__(self, source, n: int):
    self.source, self.n = source, min(n, len(source))

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, i):
    if not 0 <= i < self.n:
      raise IndexError(i)
    return self.source[i]


class _Subset:
  """The examples of a random-access source at `indices`, in that order."""

  def __init__(self, source, indices: np.ndarray):
    self.source, self.indices = source, indices

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[int(self.indices[i])]


def validation_indices(train_size: int, n: int) -> tuple[np.ndarray, np.ndarray]:
  """(held-out, kept) indices of a training split of `train_size`: `n` drawn with VALIDATION_SEED."""
  if not 0 < n < train_size:
    raise ConfigError(f'data.validation_examples={n} must be between 1 and the training split size minus 1 '
                      f'({train_size - 1}), or 0 (no validation split)')
  perm = np.random.default_rng(VALIDATION_SEED).permutation(train_size)
  return np.sort(perm[:n]), np.sort(perm[n:])


def train_size(data_config) -> int:
  """Examples that training iterates over (the training split, less a held-out validation split)."""
  n = dataset_info(data_config.name).train_size
  if data_config.get('limit_examples', 0):
    n = min(n, data_config.limit_examples)
  return n - int(data_config.get('validation_examples', 0) or 0)


# --------------------------------------------------------------------------- sources


def get_source(data_config, split: str):
  """A random-access source of {'image': uint8 HWC, 'label': int} for `split` ('train' | 'validation' |
  'test'). With `data.validation_examples` = N > 0, 'validation' is N training examples held out with a
  fixed seed and 'train' is the rest."""
  if split not in SPLITS:
    raise ConfigError(f'split={split!r} is unknown: allowed are {", ".join(SPLITS)}')
  held_out = int(data_config.get('validation_examples', 0) or 0)
  if split == 'validation' and not held_out:
    raise ConfigError('split=validation needs data.validation_examples > 0')
  if split == 'test' or not held_out:
    return _get_source(data_config, split)
  source = _get_source(data_config, 'train')
  validation, kept = validation_indices(len(source), held_out)
  return _Subset(source, validation if split == 'validation' else kept)


def _get_source(data_config, split: str):
  name = data_config.name
  info = dataset_info(name)
  limit = int(data_config.get('limit_examples', 0) or 0)
  if name == USER_DATA_NAME and name not in USER_SOURCES:
    raise ConfigError(f"data.name={name!r} is your own data, which this process does not have: pass data=... (the "
                      'train / test arrays or sources the run was trained on)')
  if name in USER_SOURCES:
    source = USER_SOURCES[name][split]
    return _Head(source, limit) if limit else source
  if name == 'fashion_mnist':
    images, labels = load_fashion_mnist(split, data_config.get('data_dir') or None)
    if limit:
      images, labels = images[:limit], labels[:limit]
    return ArraySource(images, labels)
  if files.is_url(data_config.get('data_dir') or ''):
    raise DataError(f'data.data_dir={data_config.data_dir!r}: {name} is read as ArrayRecord from local disk; copy the '
                    f'prepared dataset to the host first (e.g. `gcloud storage cp -r {data_config.data_dir}/{name} '
                    '~/tensorflow_datasets/`) and pass that folder')
  import tensorflow_datasets as tfds  # only the ArrayRecord reader: no TensorFlow needed
  tfds_split = info.test_split if split == 'test' else 'train'
  if limit:
    tfds_split = f'{tfds_split}[:{limit}]'
  # ImageNet's JPEGs are decoded by `decode_image` (in the workers); tfds would decode with PIL / OpenCV here
  decoders = {'image': tfds.decode.SkipDecoding()} if name == 'imagenet2012' else None
  try:
    return tfds.data_source(name, split=tfds_split, data_dir=data_config.get('data_dir') or None, decoders=decoders)
  except Exception as e:  # tfds raises several types for a missing dataset
    raise DataError(
        f'{name} ({tfds_split}) is not prepared as ArrayRecord in {data_config.get("data_dir") or "~/tensorflow_datasets"} '
        f'({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ""}); prepare it with `tfds build {name} --file_format=array_record` '
        '(see README, "Datasets")') from None


# --------------------------------------------------------------------------- augmentation


def random_crop_flip(images: np.ndarray, rng: np.random.Generator, pad: int, flip: bool = True,
                     rows: slice | None = None, global_size: int | None = None) -> np.ndarray:
  """Pads NHWC uint8 images by `pad` with 0 (background), takes a random crop of the original size
  per image, and flips each horizontally with probability 1/2. Vectorised over the batch.

  With `rows`, `images` are those rows of a global batch of `global_size`: the random draws are made
  for the whole batch and the rows' own draws are used, so the result does not depend on the split.
  """
  n, h, w, _ = images.shape
  total = global_size or n
  rows = rows or slice(0, n)
  dy = rng.integers(0, 2 * pad + 1, size=total)[rows]
  dx = rng.integers(0, 2 * pad + 1, size=total)[rows]
  flips = (rng.random(total) < 0.5)[rows]
  if pad:
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    r = dy[:, None] + np.arange(h)[None, :]
    c = dx[:, None] + np.arange(w)[None, :]
    images = padded[np.arange(n)[:, None, None], r[:, :, None], c[:, None, :]]
  if flip:
    images = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
  return images


def decode_image(data) -> np.ndarray:
  """Encoded image bytes -> uint8 HWC RGB: simplejpeg (libjpeg-turbo, the same pixels as PIL's decoder) for
  JPEG, OpenCV for what it refuses (PNG, CMYK JPEGs: ImageNet holds a few). A decoded array passes as is."""
  if isinstance(data, np.ndarray) and data.dtype != object:
    return data
  data = bytes(data.item() if isinstance(data, np.ndarray) else data)
  try:
    import simplejpeg
    return simplejpeg.decode_jpeg(data, colorspace='RGB')
  except (ImportError, ValueError):
    cv2 = _cv2()
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
      raise ValueError(f'not a decodable image ({len(data)} bytes, starting {data[:8]!r})') from None
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


@functools.cache
def _cv2():
  import cv2
  cv2.setNumThreads(1)  # parallelism comes from the workers; one image is ~0.2 ms of resize
  return cv2


def _flip(image: np.ndarray) -> np.ndarray:
  """Left-right mirror image, contiguous (OpenCV: stacking reversed numpy views into a batch copies 3-byte
  pixels one by one, several times slower)."""
  out = _cv2().flip(image, 1)
  return out[..., None] if out.ndim == 2 else out


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bicubic resize as the official scripts (`cv2.resize(..., interpolation=cv2.INTER_CUBIC)`: a = -0.75,
  no antialiasing filter when shrinking, unlike PIL's bicubic)."""
  cv2 = _cv2()
  out = cv2.resize(np.ascontiguousarray(image), (width, height), interpolation=cv2.INTER_CUBIC)
  return out[..., None] if out.ndim == 2 else out


def imagenet_train_crop(image: np.ndarray, rng: np.random.Generator, size: int = 224,
                        short_side: tuple[int, int] = (224, 308), aspect: tuple[float, float] = (0.85, 1.15)):
  """The official AlexNet augmentation (`Resize` in tw-imagenet-alexnet.py): short side to an integer in
  [224, 308), each axis jittered by its own factor in [0.85, 1.15], never enlarged past the original (but
  at least `size`), cv2 bicubic; then a random `size` crop and a horizontal flip with probability 1/2."""
  h, w = image.shape[:2]
  scale = rng.integers(short_side[0], short_side[1]) / min(h, w)
  scale_x, scale_y = scale * rng.uniform(*aspect), scale * rng.uniform(*aspect)
  new_w, new_h = int(max(size, min(w, scale_x * w))), int(max(size, min(h, scale_y * h)))
  image = _resize(image, new_h, new_w)
  y, x = rng.integers(0, new_h - size + 1), rng.integers(0, new_w - size + 1)
  image = image[y:y + size, x:x + size]
  return _flip(image) if rng.random() < 0.5 else image


def inception_crop(image: np.ndarray, rng: np.random.Generator, size: int = 224, area: tuple[float, float] = (0.08, 1.0),
                   aspect: tuple[float, float] = (3 / 4, 4 / 3), attempts: int = 10):
  """fb.resnet.torch's `RandomSizedCrop`: a crop of 8-100% of the area and aspect ratio 3/4-4/3 (10
  attempts; else the short side to `size` and a center crop), bicubic to `size` x `size`, flip 1/2.
  (Its colour and lighting jitter are not applied; its bicubic is Torch's `image.scale`, ours cv2's.)"""
  h, w = image.shape[:2]
  for _ in range(attempts):
    target = rng.uniform(*area) * h * w
    ratio = rng.uniform(*aspect)
    cw, ch = int(round(np.sqrt(target * ratio))), int(round(np.sqrt(target / ratio)))
    if rng.random() < 0.5:
      cw, ch = ch, cw
    if cw <= w and ch <= h:
      y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
      image = _resize(image[y:y + ch, x:x + cw], size, size)
      break
  else:
    image = imagenet_eval_crop(image, size, short_side=size)
  return _flip(image) if rng.random() < 0.5 else image


# data.train_crop -> the per-image augmentation of ImageNet training batches
TRAIN_CROPS = {'ttq_alexnet': imagenet_train_crop, 'inception': inception_crop}


def imagenet_eval_crop(image: np.ndarray, size: int = 224, short_side: int = 256) -> np.ndarray:
  """The official eval transform: short side to 256 (never enlarged past the original, at least `size`),
  cv2 bicubic, center `size` crop."""
  h, w = image.shape[:2]
  scale = short_side / min(h, w)
  new_w, new_h = int(max(size, min(w, scale * w))), int(max(size, min(h, scale * h)))
  image = _resize(image, new_h, new_w)
  y, x = (new_h - size) // 2, (new_w - size) // 2
  return image[y:y + size, x:x + size]


def _prepared(ex, crop, split: str, where: str) -> dict[str, np.ndarray]:
  """An ImageNet example decoded and cropped; a failure is a DataError naming the example (it reaches the
  user as one line from a worker process too)."""
  try:
    example = _as_example({'image': decode_image(ex['image']), 'label': ex['label']})
    example['image'] = crop(dict(ex, image=example['image']))
  except (ValueError, OSError, _cv2().error) as e:  # undecodable or unusable image data (not a bug of ours)
    file_name = ex.get('file_name', b'')
    file_name = file_name.decode() if isinstance(file_name, bytes) else str(file_name)
    raise DataError(f'{split} example at {where}{f" ({file_name})" if file_name else ""}: '
                    f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}') from None
  return dict(example, position=ex['position']) if 'position' in ex else example


def _as_example(ex) -> dict[str, np.ndarray]:
  image = np.asarray(ex['image'])
  image = image if image.dtype == np.uint8 else image.astype(np.float32)  # uint8 leaves the host as is
  if image.ndim == 2:
    image = image[..., None]
  return {'image': image, 'label': np.int32(ex['label'])}


def _stack(examples: Sequence[dict]) -> dict[str, np.ndarray]:
  return {'image': np.stack([e['image'] for e in examples]), 'label': np.asarray([e['label'] for e in examples], np.int32)}


# --------------------------------------------------------------------------- pipelines


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


def train_dataset(data_config, *, local_batch_size: int, seed: int, process_index: int = 0,
                  process_count: int = 1, augment: bool = True) -> grain.MapDataset:
  """Infinite, shuffled-per-epoch, augmented batches: this process's rows of each global batch.

  Batch k is a pure function of (seed, k) and the process's row range: `ds[k]` can be recomputed at
  any time, and a run on N processes sees the same global batches and augmentations as on one.
  """
  name = data_config.name
  info = dataset_info(name)
  global_batch = local_batch_size * process_count
  stream = grain.MapDataset.source(get_source(data_config, 'train')).shuffle(seed=seed).repeat(None)
  rows = _ProcessRows(stream, global_batch, local_batch_size, process_index)
  if name == 'imagenet2012':  # decoded and cropped per example (in the workers)
    size = info.image_shape[0]
    if augment:  # keyed by the example's global position
      train_crop = TRAIN_CROPS[data_config.get('train_crop', 'ttq_alexnet')]
      crop = lambda ex: train_crop(ex['image'], np.random.default_rng([seed + AUGMENT_SEED_OFFSET, ex['position']]), size)
    else:
      crop = lambda ex: imagenet_eval_crop(ex['image'], size)
    ds = grain.MapDataset.source(rows).map(lambda ex: _prepared(ex, crop, 'train', f'position {ex["position"]}'))
  else:
    ds = grain.MapDataset.source(rows).map(lambda ex: dict(_as_example(ex), position=ex['position']))
  ds = ds.batch(local_batch_size, drop_remainder=True, batch_fn=_stack)
  if augment and name != 'imagenet2012':
    pad = int(data_config.get('crop_padding', 4))
    flip = bool(data_config.get('random_flip', True))
    lo, hi = process_index * local_batch_size, (process_index + 1) * local_batch_size

    def crop_flip(batch, rng):  # the rng of batch k is the same on every process: draw globally, use our rows
      return dict(batch, image=random_crop_flip(batch['image'], rng, pad, flip, rows=slice(lo, hi),
                                                global_size=global_batch))
    ds = ds.random_map(crop_flip, seed=seed + AUGMENT_SEED_OFFSET)
  return ds


def eval_dataset(data_config, *, split: str = 'test', global_batch_size: int, process_index: int = 0,
                 process_count: int = 1, source=None) -> grain.MapDataset:
  """Batch k = this process's part of global eval batch k, in order, the last one padded (`mask` = 0);
  `source`: the split's source when the caller already holds it (else it is opened here)."""
  name = data_config.name
  info = dataset_info(name)
  source = get_source(data_config, split) if source is None else source
  n = len(source)
  local = global_batch_size // process_count
  examples = grain.MapDataset.source(source)
  if name == 'imagenet2012':
    crop = lambda ex: imagenet_eval_crop(ex['image'], info.image_shape[0])
    examples = examples.map_with_index(lambda i, ex: _prepared(ex, crop, split, f'index {i}'))
  else:
    examples = examples.map(_as_example)

  def batch(k: int) -> dict[str, np.ndarray]:
    idx = np.arange(k * global_batch_size + process_index * local, k * global_batch_size + (process_index + 1) * local)
    valid = idx < n
    return dict(_stack([examples[int(i)] for i in np.where(valid, idx, 0)]), mask=valid.astype(np.float32))
  return grain.MapDataset.range(-(-n // global_batch_size)).map(batch)


def eval_batches(data_config, *, split: str = 'test', global_batch_size: int, process_index: int = 0,
                 process_count: int = 1, source=None, workers: int = 0,
                 threads: int = 4) -> Iterator[dict[str, np.ndarray]]:
  """The batches of `eval_dataset`, made by `workers` processes (0: `threads` threads of this one)."""
  ds = eval_dataset(data_config, split=split, global_batch_size=global_batch_size, process_index=process_index,
                    process_count=process_count, source=source)
  with BatchIterator(ds, workers=workers, threads=threads) as it:
    yield from it


def clean_train_dataset(data_config, *, local_batch_size: int, seed: int, process_index: int = 0,
                        process_count: int = 1) -> grain.MapDataset:
  """Un-augmented training batches from their own shuffle (for BN re-estimation)."""
  return train_dataset(data_config, local_batch_size=local_batch_size, seed=seed + CLEAN_STREAM_SEED_OFFSET,
                       process_index=process_index, process_count=process_count, augment=False)


def worker_count(data_config) -> int:
  """Worker processes of the input pipeline: data.worker_processes, or with -1 the host's cores (those this
  process may use) less TRAINING_PROCESS_CORES."""
  n = int(data_config.get('worker_processes', 0))
  if n == AUTO_WORKERS:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    return max(0, cores - TRAINING_PROCESS_CORES)
  if n < 0:
    raise ConfigError(f'data.worker_processes={n}: allowed are 0 (threads of the training process), a number of '
                      f'processes, or {AUTO_WORKERS} (the host\'s cores less {TRAINING_PROCESS_CORES})')
  return n


def _worker_init(index: int, count: int) -> None:
  """In each worker process: the training process owns shutdown (SIGTERM / SIGINT reach the whole process
  group; it saves at the agreed step, then closes the workers), and a worker whose parent died (SIGKILL)
  exits instead of waiting on a full queue forever."""
  del index, count
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  parent = os.getppid()

  def exit_with_parent():
    while os.getppid() == parent:
      time.sleep(1.0)
    os._exit(0)
  threading.Thread(target=exit_with_parent, daemon=True).start()


class BatchIterator:
  """Batches ds[start], ds[start + 1], ... of a `grain.MapDataset` of batches, made by `workers` processes
  (grain's `mp_prefetch`: worker w computes batches start + w, start + w + workers, ...; results are
  interleaved back in order) or, with 0 workers, by `threads` threads of this process.

  The state is the index of the next batch alone, so a run resumed with another worker count (or on
  another host) sees the same batches. Workers start on the first batch, no more than there are batches
  left (a short evaluation starts few); `close` (or leaving the `with` block) stops them.
  """

  def __init__(self, ds: grain.MapDataset, *, workers: int = 0, threads: int = 4, start: int = 0,
               buffer_per_worker: int = 2):
    self.ds, self.workers, self.threads, self.buffer = ds, workers, max(1, threads), buffer_per_worker
    self.next_index, self._it = start, None

  def _open(self):
    remaining = self.ds[self.next_index:]
    workers = min(self.workers, len(remaining))
    # a worker is one core's worth: it makes one batch at a time, `buffer_per_worker` ahead
    options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=1) if workers else \
        grain.ReadOptions(num_threads=self.threads, prefetch_buffer_size=8)
    ds = remaining.to_iter_dataset(options)
    if workers:
      # Batches come back pickled through the workers' pipes, not in shared memory: grain 0.2's shared-memory
      # batches outlive a closed iterator (the resource tracker reports them leaked at exit).
      ds = grain.experimental.WithOptionsIterDataset(ds, grain.experimental.DatasetOptions(min_shm_size=1 << 62))
      from absl import flags  # grain's workers read its absl flags: from a notebook / pytest, take their defaults
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=self.buffer),
                          worker_init_fn=_worker_init)
    return iter(ds)

  def __iter__(self):
    return self

  def __next__(self):
    if self._it is None:
      self._it = self._open()
    batch = next(self._it)
    self.next_index += 1
    return batch

  def get_state(self) -> dict:
    return {'next_index': self.next_index}

  def set_state(self, state: dict) -> None:
    self.close()
    self.next_index = int(state['next_index'])

  def close(self) -> None:
    if self._it is not None and hasattr(self._it, 'close'):
      self._it.close()
    self._it = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class Prefetcher:
  """Pulls host batches from a `BatchIterator` and puts `depth` of them on the devices ahead of use;
  remembers the iterator state that follows each batch (saved with checkpoints)."""

  def __init__(self, iterator, mesh, depth: int):
    self.iterator, self.mesh, self.depth = iterator, mesh, max(1, depth)
    self.queue: list = []

  def _fill(self):
    from ttq_jax import sharding as sharding_lib  # not at import: worker processes unpickle this module
    while len(self.queue) < self.depth:
      local = next(self.iterator)
      self.queue.append((sharding_lib.global_batch(local, self.mesh), self.iterator.get_state()))

  def next(self):
    """(the next global batch on the devices, the iterator state after it)."""
    self._fill()
    batch, state = self.queue.pop(0)
    self._fill()
    return batch, state
