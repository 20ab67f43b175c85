"""Input pipeline tests: IDX loading, errors, determinism, sharding, augmentation, tfds mock data."""

import gzip
import os
import struct

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from ttq_jax import input_pipeline as ip


def _data_config(**kw):
  c = dict(name='fashion_mnist', data_dir='', crop_padding=2, random_flip=True, limit_examples=0)
  c.update(kw)
  return ml_collections.ConfigDict(c)


def test_fashion_mnist_loads_real_files():
  images, labels = ip.load_fashion_mnist('test')
  assert images.shape == (10_000, 28, 28, 1) and images.dtype == np.uint8
  assert labels.shape == (10_000,) and set(np.unique(labels)) == set(range(10))
  assert 60 < images.mean() < 90  # real clothes, not zeros


def _write_idx(path, array):
  header = struct.pack('>HBB', 0, 0x08, array.ndim) + struct.pack('>' + 'I' * array.ndim, *array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def fake_fashion_mnist(d, n=20, corrupt=None):
  os.makedirs(d, exist_ok=True)
  rng = np.random.default_rng(0)
  for split, (img, lab) in ip.FASHION_MNIST_FILES.items():
    _write_idx(os.path.join(d, img), rng.integers(0, 255, (n, 28, 28)))
    _write_idx(os.path.join(d, lab), rng.integers(0, 10, (n,)))
  if corrupt:
    with gzip.open(os.path.join(d, corrupt), 'wb') as f:
      f.write(b'\x00\x00\x08\x03' + b'\x00' * 5)


def test_data_dir_is_searched_first(tmp_path):
  fake_fashion_mnist(tmp_path)
  images, _ = ip.load_fashion_mnist('train', str(tmp_path))
  assert images.shape == (20, 28, 28, 1)


def test_missing_files_error_says_where_it_looked(tmp_path, monkeypatch):
  monkeypatch.setattr(ip, 'DEBIAN_FASHION_MNIST', str(tmp_path / 'debian'))
  monkeypatch.setenv('TTQ_DATA_DIR', str(tmp_path / 'env'))
  with pytest.raises(ip.DataError) as e:
    ip.load_fashion_mnist('train')
  msg = str(e.value)
  assert '\n' not in msg and 'env' in msg and 'debian' in msg and 'apt-get install' in msg
  assert 'train-images-idx3-ubyte.gz' in msg and 't10k-labels-idx1-ubyte.gz' in msg


def test_an_explicit_data_dir_is_the_only_place_looked(tmp_path, monkeypatch):
  """A data_dir lacking a file is an error naming the missing file, even where $TTQ_DATA_DIR has all four."""
  fake_fashion_mnist(tmp_path / 'env')
  monkeypatch.setenv('TTQ_DATA_DIR', str(tmp_path / 'env'))
  fake_fashion_mnist(tmp_path / 'cfg')
  os.remove(tmp_path / 'cfg' / 't10k-labels-idx1-ubyte.gz')
  with pytest.raises(ip.DataError) as e:
    ip.load_fashion_mnist('train', str(tmp_path / 'cfg'))
  msg = str(e.value)
  assert '\n' not in msg and 'cfg' in msg and 'missing t10k-labels-idx1-ubyte.gz (' in msg
  assert 'train-images' not in msg.split('(looked for')[0]
  assert ip.load_fashion_mnist('train')[0].shape == (20, 28, 28, 1)  # without data_dir: $TTQ_DATA_DIR


def test_malformed_file_is_a_data_error(tmp_path):
  fake_fashion_mnist(tmp_path, corrupt='t10k-images-idx3-ubyte.gz')
  with pytest.raises(ip.DataError, match='malformed IDX file .*t10k-images'):
    ip.load_fashion_mnist('test', str(tmp_path))


def test_train_batches_are_deterministic_and_reshuffled_per_epoch():
  c = _data_config(limit_examples=256)
  a = ip.train_dataset(c, local_batch_size=64, seed=3)
  b = ip.train_dataset(c, local_batch_size=64, seed=3)
  np.testing.assert_array_equal(a[5]['image'], b[5]['image'])
  other = ip.train_dataset(c, local_batch_size=64, seed=4)
  assert not np.array_equal(a[0]['label'], other[0]['label'])
  # 4 batches per epoch; epoch 2 covers every example again, in another order
  no_aug = ip.train_dataset(c, local_batch_size=64, seed=3, augment=False)
  epoch1 = np.concatenate([no_aug[i]['label'] for i in range(4)])
  epoch2 = np.concatenate([no_aug[i]['label'] for i in range(4, 8)])
  assert sorted(epoch1) == sorted(epoch2) and not np.array_equal(epoch1, epoch2)


def test_processes_read_disjoint_shards():
  c = _data_config(limit_examples=200)
  seen = []
  for p in range(2):
    ds = ip.train_dataset(c, local_batch_size=100, seed=0, process_index=p, process_count=2, augment=False)
    seen.append({img.tobytes() for img in ds[0]['image']})
  assert len(seen[0]) == len(seen[1]) == 100 and not seen[0] & seen[1]


def _crop_flip_reference(images, dy, dx, flips, pad):
  out = np.empty_like(images)
  n, h, w, _ = images.shape
  for i in range(n):
    p = np.pad(images[i], ((pad, pad), (pad, pad), (0, 0)))
    crop = p[dy[i]:dy[i] + h, dx[i]:dx[i] + w]
    out[i] = crop[:, ::-1] if flips[i] else crop
  return out


def test_random_crop_flip_matches_loop_reference():
  images = np.random.default_rng(0).integers(1, 255, (16, 6, 5, 2)).astype(np.uint8)
  got = ip.random_crop_flip(images, np.random.default_rng(7), pad=2)
  rng = np.random.default_rng(7)
  dy, dx = rng.integers(0, 5, 16), rng.integers(0, 5, 16)
  flips = rng.random(16) < 0.5
  np.testing.assert_array_equal(got, _crop_flip_reference(images, dy, dx, flips, 2))
  assert (got == 0).any()  # some crops reach into the zero (background) padding


def test_eval_batches_cover_the_split_once_with_padding_mask():
  c = _data_config(limit_examples=250)
  parts = [list(ip.eval_batches(c, global_batch_size=100, process_index=p, process_count=2)) for p in range(2)]
  assert [len(p) for p in parts] == [3, 3]
  assert all(b['image'].shape == (50, 28, 28, 1) for p in parts for b in p)
  assert sum(float(b['mask'].sum()) for p in parts for b in p) == 250
  # batch 3 of process 0 holds rows 200..249 (valid), process 1 rows 250..299 (padding)
  assert parts[0][2]['mask'].sum() == 50 and parts[1][2]['mask'].sum() == 0


@pytest.mark.parametrize('name,size', [('cifar10', 32), ('imagenet2012', 224)])
def test_tfds_pipelines_with_mock_data(name, size):
  c = _data_config(name=name, crop_padding=4)
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    ds = ip.train_dataset(c, local_batch_size=8, seed=0)
    batch = ds[1]
    evals = list(ip.eval_batches(c, global_batch_size=16))
  assert batch['image'].shape == (8, size, size, 3) and batch['image'].dtype == np.uint8
  assert batch['label'].dtype == np.int32 and batch['label'].shape == (8,)
  assert evals[0]['image'].shape == (16, size, size, 3) and sum(b['mask'].sum() for b in evals) == 24
  if name == 'cifar10':  # zero padding + random crop: unless the offset is exactly (4, 4) (p = 1/81),
    img = batch['image']  # one of an image's border lines is all background
    lines = [img[:, 0], img[:, -1], img[:, :, 0], img[:, :, -1]]
    has_zero_border = np.any([(l.reshape(8, -1) == 0).all(axis=1) for l in lines], axis=0)
    assert has_zero_border.sum() >= 6


def _recording_resize(calls):
  """Stands in for the resize: records the size asked for and returns an image whose pixels encode their
  own row and column (channel 0: row % 256, 1: col % 256, 2: 16 * (row // 256) + col // 256)."""
  def resize(image, height, width, method='bilinear'):
    calls.append((height, width))
    assert method == 'bicubic'  # as cv2.INTER_CUBIC in the official scripts
    r, c = np.meshgrid(np.arange(height), np.arange(width), indexing='ij')
    return np.stack([r % 256, c % 256, 16 * (r // 256) + c // 256], -1).astype(np.uint8)
  return resize


def _origin(crop):
  """(row, col) of the crop's top-left pixel in the resized image, and whether it was flipped."""
  decode = lambda p: (int(p[0]) + 256 * (int(p[2]) // 16), int(p[1]) + 256 * (int(p[2]) % 16))
  (r0, c0), (_, c1) = decode(crop[0, 0]), decode(crop[0, 1])
  return (r0, c0 - 223, True) if c1 < c0 else (r0, c0, False)


@pytest.mark.parametrize('shape', [(300, 400, 3), (1000, 1200, 3), (230, 240, 3)])
def test_imagenet_train_crop_is_the_official_resize(monkeypatch, shape):
  """tw-imagenet-alexnet.py's `Resize`: s = randint(224, 308) / short side; each axis its own jitter in
  [0.85, 1.15]; size = int(max(224, min(original, scaled))) per axis (never enlarged past the original);
  then a random 224 window inside it, flipped half of the time. Sizes replayed from the same draws."""
  calls = []
  monkeypatch.setattr(ip, '_pil_resize', _recording_resize(calls))
  h, w = shape[:2]
  rng, replay = np.random.default_rng(0), np.random.default_rng(0)
  origins, expected = [], []
  for _ in range(200):
    crop = ip.imagenet_train_crop(np.zeros(shape, np.uint8), rng)
    assert crop.shape == (224, 224, 3)
    origins.append(_origin(crop))
    scale = replay.integers(224, 308) / min(h, w)
    sx, sy = scale * replay.uniform(0.85, 1.15), scale * replay.uniform(0.85, 1.15)
    eh, ew = int(max(224, min(h, sy * h))), int(max(224, min(w, sx * w)))
    expected.append((eh, ew))
    replay.integers(0, eh - 223), replay.integers(0, ew - 223), replay.random()  # window and flip draws
  assert calls == expected
  sizes = np.array(calls)
  assert sizes.min() >= 224 and (sizes[:, 0] <= max(h, 224)).all() and (sizes[:, 1] <= max(w, 224)).all()
  for (ch, cw), (y, x, _) in zip(calls, origins):
    assert 0 <= y <= ch - 224 and 0 <= x <= cw - 224
  assert 0.35 < np.mean([f for _, _, f in origins]) < 0.65
  if shape[0] == 1000:  # no clipping: the two axes' factors are independent draws
    ratio = (sizes[:, 1] / w) / (sizes[:, 0] / h)
    assert ratio.min() < 0.8 and ratio.max() > 1.25


def test_inception_crop_area_and_aspect(monkeypatch):
  """fb.resnet.torch `RandomSizedCrop`: a window of 8-100% of the area, aspect 3/4-4/3, resized to 224."""
  windows = []
  def resize(image, height, width, method='bilinear'):
    windows.append(image.shape[:2])
    return np.zeros((height, width, 3), np.uint8)
  monkeypatch.setattr(ip, '_pil_resize', resize)
  rng = np.random.default_rng(0)
  for _ in range(300):
    assert ip.inception_crop(np.zeros((400, 500, 3), np.uint8), rng).shape == (224, 224, 3)
  area = np.array([a * b for a, b in windows]) / (400 * 500)
  aspect = np.array([b / a for a, b in windows])
  assert area.min() >= 0.075 and area.max() <= 1.0 and area.min() < 0.15 and area.max() > 0.8
  assert aspect.min() >= 0.74 and aspect.max() <= 1.35


def test_imagenet_eval_crop_is_the_center_of_the_short_side_256(monkeypatch):
  calls = []
  monkeypatch.setattr(ip, '_pil_resize', _recording_resize(calls))
  crop = ip.imagenet_eval_crop(np.zeros((300, 400, 3), np.uint8))
  assert calls == [(256, 341)] and crop.shape == (224, 224, 3)
  assert _origin(crop) == ((256 - 224) // 2, (341 - 224) // 2, False)
  small = np.random.default_rng(0).integers(0, 255, (10, 25, 3)).astype(np.uint8)
  monkeypatch.undo()
  assert ip.imagenet_eval_crop(small).shape == (224, 224, 3)


def test_unknown_dataset():
  with pytest.raises(ValueError, match="data.name='mnist' is unknown"):
    ip.dataset_info('mnist')


def test_missing_tfds_dataset_is_one_line(tmp_path):
  c = _data_config(name='cifar10', data_dir=str(tmp_path))
  with pytest.raises(ip.DataError, match='tfds build cifar10 --file_format=array_record') as e:
    ip.get_source(c, 'train')
  assert '\n' not in str(e.value)


def test_global_batches_do_not_depend_on_the_process_count():
  c = _data_config(limit_examples=300)
  whole = ip.train_dataset(c, local_batch_size=64, seed=5)
  for k in (0, 3, 7):  # epoch boundaries included (4 batches of 64 per epoch of 300)
    parts = [ip.train_dataset(c, local_batch_size=16, seed=5, process_index=p, process_count=4)[k] for p in range(4)]
    np.testing.assert_array_equal(np.concatenate([b['image'] for b in parts]), whole[k]['image'])
    np.testing.assert_array_equal(np.concatenate([b['label'] for b in parts]), whole[k]['label'])


def test_validation_split_is_held_out_of_training_with_a_fixed_seed():
  """5,000 (here 100) training examples held out: disjoint from what training reads, the same for every
  run and seed, and the test split untouched."""
  c = _data_config(limit_examples=1000, validation_examples=100)
  train, val, test = (ip.get_source(c, s) for s in ('train', 'validation', 'test'))
  assert (len(train), len(val), len(test)) == (900, 100, 1000)
  full = ip.get_source(_data_config(limit_examples=1000), 'train')
  key = lambda ex: (np.asarray(ex['image']).tobytes(), int(ex['label']))
  held, kept = {key(val[i]) for i in range(100)}, [key(train[i]) for i in range(900)]
  assert not held & set(kept) and held | set(kept) == {key(full[i]) for i in range(1000)}
  held_out, _ = ip.validation_indices(1000, 100)
  np.testing.assert_array_equal(held_out, np.sort(np.random.default_rng(ip.VALIDATION_SEED).permutation(1000)[:100]))
  assert ip.train_size(c) == 900
  with pytest.raises(ValueError, match='split=validation needs data.validation_examples > 0'):
    ip.get_source(_data_config(), 'validation')
