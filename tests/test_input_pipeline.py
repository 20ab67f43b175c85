"""Input pipeline tests: IDX loading, errors, determinism, sharding, augmentation, tfds mock data, ImageNet
decoding and resizing by value, worker processes."""

import gzip
import os
import struct

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from ttq_jax import augment
from ttq_jax import datasets
from ttq_jax import errors
from ttq_jax import idx
from ttq_jax import input_pipeline as ip


def _data_config(**kw):
  """configs/base.py's `data` (every key with its default, as the pipelines read it) with `kw` set."""
  from configs import base
  c = base.get_config().data
  c.update({**dict(name='fashion_mnist', data_dir='', crop_padding=2, random_flip=True, limit_examples=0), **kw})
  return c


def test_fashion_mnist_loads_real_files():
  images, labels = datasets.load_fashion_mnist('test')
  assert images.shape == (10_000, 28, 28, 1) and images.dtype == np.uint8
  assert labels.shape == (10_000,) and set(np.unique(labels)) == set(range(10))
  assert 60 < images.mean() < 90  # real clothes, not zeros


def _write_idx(path, array):
  header = struct.pack('>HBB', 0, 0x08, array.ndim) + struct.pack('>' + 'I' * array.ndim, *array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def fake_fashion_mnist(d, n=20, corrupt=None, seed=0):
  os.makedirs(d, exist_ok=True)
  rng = np.random.default_rng(seed)
  for split, (img, lab) in idx.FASHION_MNIST_FILES.items():
    _write_idx(os.path.join(d, img), rng.integers(0, 255, (n, 28, 28)))
    _write_idx(os.path.join(d, lab), rng.integers(0, 10, (n,)))
  if corrupt:
    with gzip.open(os.path.join(d, corrupt), 'wb') as f:
      f.write(b'\x00\x00\x08\x03' + b'\x00' * 5)


def test_data_dir_is_searched_first(tmp_path, monkeypatch):
  """Three folders hold different files (sizes 20, 7, 9): an explicit data_dir wins over $TTQ_DATA_DIR and
  Debian's folder; without it $TTQ_DATA_DIR wins over Debian's. Checked by the pixels read, not only shapes."""
  fake_fashion_mnist(tmp_path / 'cfg', n=20, seed=1)
  fake_fashion_mnist(tmp_path / 'env', n=7, seed=2)
  fake_fashion_mnist(tmp_path / 'debian', n=9, seed=3)
  monkeypatch.setenv('TTQ_DATA_DIR', str(tmp_path / 'env'))
  monkeypatch.setattr(idx, 'DEBIAN_FASHION_MNIST', str(tmp_path / 'debian'))
  expected = lambda seed, n: np.random.default_rng(seed).integers(0, 255, (n, 28, 28)).astype(np.uint8)[..., None]
  images, _ = datasets.load_fashion_mnist('train', str(tmp_path / 'cfg'))
  np.testing.assert_array_equal(images, expected(1, 20))
  images, _ = datasets.load_fashion_mnist('train')
  np.testing.assert_array_equal(images, expected(2, 7))
  monkeypatch.delenv('TTQ_DATA_DIR')
  images, _ = datasets.load_fashion_mnist('train')
  np.testing.assert_array_equal(images, expected(3, 9))


def test_missing_files_error_says_where_it_looked(tmp_path, monkeypatch):
  monkeypatch.setattr(idx, 'DEBIAN_FASHION_MNIST', str(tmp_path / 'debian'))
  monkeypatch.delenv('TTQ_DATA_DIR', raising=False)
  with pytest.raises(errors.DataError) as e:
    datasets.load_fashion_mnist('train')
  msg = str(e.value)
  assert '\n' not in msg and 'debian' in msg and 'apt-get install' in msg and 'TTQ_DATA_DIR' in msg
  assert 'train-images-idx3-ubyte.gz' in msg and 't10k-labels-idx1-ubyte.gz' in msg
  monkeypatch.setenv('TTQ_DATA_DIR', str(tmp_path / 'env'))  # named by the environment: only there
  with pytest.raises(errors.DataError, match=r"not found in \$TTQ_DATA_DIR='.*env': missing train-images"):
    datasets.load_fashion_mnist('train')


def test_an_explicit_data_dir_is_the_only_place_looked(tmp_path, monkeypatch):
  """A data_dir lacking a file is an error naming the missing file, even where $TTQ_DATA_DIR has all four."""
  fake_fashion_mnist(tmp_path / 'env')
  monkeypatch.setenv('TTQ_DATA_DIR', str(tmp_path / 'env'))
  fake_fashion_mnist(tmp_path / 'cfg')
  os.remove(tmp_path / 'cfg' / 't10k-labels-idx1-ubyte.gz')
  with pytest.raises(errors.DataError) as e:
    datasets.load_fashion_mnist('train', str(tmp_path / 'cfg'))
  msg = str(e.value)
  assert '\n' not in msg and 'cfg' in msg and 'missing t10k-labels-idx1-ubyte.gz (' in msg
  assert 'train-images' not in msg.split('(looked for')[0]
  assert datasets.load_fashion_mnist('train')[0].shape == (20, 28, 28, 1)  # without data_dir: $TTQ_DATA_DIR


def test_malformed_file_is_a_data_error(tmp_path):
  fake_fashion_mnist(tmp_path, corrupt='t10k-images-idx3-ubyte.gz')
  with pytest.raises(errors.DataError, match='malformed IDX file .*t10k-images'):
    datasets.load_fashion_mnist('test', str(tmp_path))


def test_a_decoded_file_is_reused_until_the_file_changes(tmp_path):
  """A file read again is not decoded again (the same read-only array), unless it was rewritten: new contents,
  or a rewrite into a malformed file, are seen at once."""
  fake_fashion_mnist(tmp_path, n=5, seed=1)
  first, _ = datasets.load_fashion_mnist('train', str(tmp_path))
  again, _ = datasets.load_fashion_mnist('train', str(tmp_path))
  assert np.shares_memory(first, again) and not first.flags.writeable
  with pytest.raises(ValueError):
    first[0, 0, 0, 0] = 1  # nobody can change what the next reader gets
  fake_fashion_mnist(tmp_path, n=6, seed=2)  # other contents, other size
  images, _ = datasets.load_fashion_mnist('train', str(tmp_path))
  np.testing.assert_array_equal(images, np.random.default_rng(2).integers(0, 255, (6, 28, 28)).astype(np.uint8)[..., None])
  fake_fashion_mnist(tmp_path, n=6, seed=2, corrupt='train-images-idx3-ubyte.gz')
  with pytest.raises(errors.DataError, match='malformed IDX file .*train-images'):
    datasets.load_fashion_mnist('train', str(tmp_path))


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
  got = augment.random_crop_flip(images, np.random.default_rng(7), pad=2)
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


@pytest.mark.parametrize('name,size', [('cifar10', 32)])  # ImageNet: the generated ArrayRecord set below
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
  def resize(image, height, width):
    calls.append((height, width))
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
  monkeypatch.setattr(augment, '_resize', _recording_resize(calls))
  h, w = shape[:2]
  rng, replay = np.random.default_rng(0), np.random.default_rng(0)
  origins, expected = [], []
  for _ in range(200):
    crop = augment.imagenet_train_crop(np.zeros(shape, np.uint8), rng)
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
  def resize(image, height, width):
    windows.append(image.shape[:2])
    return np.zeros((height, width, 3), np.uint8)
  monkeypatch.setattr(augment, '_resize', resize)
  rng = np.random.default_rng(0)
  for _ in range(300):
    assert augment.inception_crop(np.zeros((400, 500, 3), np.uint8), rng).shape == (224, 224, 3)
  area = np.array([a * b for a, b in windows]) / (400 * 500)
  aspect = np.array([b / a for a, b in windows])
  assert area.min() >= 0.075 and area.max() <= 1.0 and area.min() < 0.15 and area.max() > 0.8
  assert aspect.min() >= 0.74 and aspect.max() <= 1.35


def test_imagenet_eval_crop_is_the_center_of_the_short_side_256(monkeypatch):
  calls = []
  monkeypatch.setattr(augment, '_resize', _recording_resize(calls))
  crop = augment.imagenet_eval_crop(np.zeros((300, 400, 3), np.uint8))
  assert calls == [(256, 341)] and crop.shape == (224, 224, 3)
  assert _origin(crop) == ((256 - 224) // 2, (341 - 224) // 2, False)
  small = np.random.default_rng(0).integers(0, 255, (10, 25, 3)).astype(np.uint8)
  monkeypatch.undo()
  assert augment.imagenet_eval_crop(small).shape == (224, 224, 3)


def test_unknown_dataset():
  with pytest.raises(ValueError, match="data.name='mnist' is unknown"):
    datasets.dataset_info('mnist')


def test_missing_tfds_dataset_is_one_line(tmp_path):
  c = _data_config(name='cifar10', data_dir=str(tmp_path))
  with pytest.raises(errors.DataError, match='tfds build cifar10 --file_format=array_record') as e:
    datasets.get_source(c, 'train')
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
  train, val, test = (datasets.get_source(c, s) for s in ('train', 'validation', 'test'))
  assert (len(train), len(val), len(test)) == (900, 100, 1000)
  full = datasets.get_source(_data_config(limit_examples=1000), 'train')
  key = lambda ex: (np.asarray(ex['image']).tobytes(), int(ex['label']))
  held, kept = {key(val[i]) for i in range(100)}, [key(train[i]) for i in range(900)]
  assert not held & set(kept) and held | set(kept) == {key(full[i]) for i in range(1000)}
  held_out, _ = datasets.validation_indices(1000, 100)
  np.testing.assert_array_equal(held_out, np.sort(np.random.default_rng(datasets.VALIDATION_SEED).permutation(1000)[:100]))
  assert datasets.train_size(c) == 900
  with pytest.raises(ValueError, match='split=validation needs data.validation_examples > 0'):
    datasets.get_source(_data_config(), 'validation')


# --------------------------------------------------------------------------- ImageNet decode, resize, workers


def _cv2_cubic_reference(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """cv2.INTER_CUBIC written out in numpy (float): source coordinate (x + 0.5) * in / out - 0.5, Keys
  kernel with a = -0.75 over 4 taps, edge pixels repeated, rows then columns, rounded and clipped."""
  def weights(out_size, in_size):
    f = (np.arange(out_size) + 0.5) * in_size / out_size - 0.5
    i0 = np.floor(f).astype(int)
    t = f - i0
    a = -0.75
    w = np.stack([((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
                  ((a + 2) * t - (a + 3)) * t * t + 1,
                  ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1], -1)
    w = np.concatenate([w, 1 - w.sum(-1, keepdims=True)], -1)
    idx = np.clip(i0[:, None] + np.arange(-1, 3)[None, :], 0, in_size - 1)
    m = np.zeros((out_size, in_size))
    np.add.at(m, (np.repeat(np.arange(out_size), 4), idx.ravel()), w.ravel())
    return m
  rows, cols = weights(height, image.shape[0]), weights(width, image.shape[1])
  out = np.einsum('oh,hwc,pw->opc', rows, image.astype(np.float64), cols)
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


@pytest.mark.parametrize('in_shape,out_shape', [
    ((40, 50), (61, 77)),    # enlarge (the crop's "at least 224")
    ((120, 90), (80, 57)),   # shrink by ~0.65 (a typical ImageNet short side 375 -> 244)
    ((64, 64), (64, 40)),    # one axis only
])
def test_resize_is_opencv_inter_cubic_as_the_official_scripts(in_shape, out_shape):
  image = np.random.default_rng(0).integers(0, 256, (*in_shape, 3)).astype(np.uint8)
  ours = augment._resize(image, *out_shape)
  reference = _cv2_cubic_reference(image, *out_shape)
  assert ours.shape == (*out_shape, 3)
  assert np.abs(ours.astype(int) - reference).max() <= 1  # cv2 works in 11-bit fixed point
  from PIL import Image  # ... and it is not PIL's antialiased bicubic
  pil = np.asarray(Image.fromarray(image).resize(out_shape[::-1], Image.BICUBIC))
  if out_shape[0] < in_shape[0]:
    assert np.abs(pil.astype(int) - reference).max() > 10


PINNED_CROPS = {  # (sum, pixel [0, 0], [100, 50], [223, 223]) of a 300 x 400 test pattern, rng seed 7
    'ttq_alexnet': (18704581, [166, 190, 14], [204, 172, 83], [34, 179, 101]),
    'inception': (19069171, [30, 135, 240], [81, 75, 53], [46, 21, 44]),
    'eval': (19110859, [80, 62, 57], [52, 185, 210], [134, 6, 220]),
}


@pytest.mark.parametrize('name', sorted(PINNED_CROPS))
def test_imagenet_crops_are_pinned_by_value(name):
  """The augmentations' pixels do not drift (a new resize, decoder or rng order would change them)."""
  r, c = np.meshgrid(np.arange(300), np.arange(400), indexing='ij')
  image = np.stack([(r * 7 + c * 3) % 256, (r * c) % 251, (r // 3 + c // 5) * 3 % 256], -1).astype(np.uint8)
  crop = augment.imagenet_eval_crop(image) if name == 'eval' else augment.TRAIN_CROPS[name](image, np.random.default_rng(7))
  total, *pixels = PINNED_CROPS[name]
  assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8
  assert int(crop.astype(np.int64).sum()) == total
  assert [crop[0, 0].tolist(), crop[100, 50].tolist(), crop[223, 223].tolist()] == pixels


def _encoded(image, fmt: str, **kw) -> bytes:
  import io
  from PIL import Image
  buf = io.BytesIO()
  (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buf, fmt, **kw)
  return buf.getvalue()


def test_decode_image_gives_the_pixels_pil_gives():
  import io
  from PIL import Image
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (37, 53, 3)).astype(np.uint8)
  cases = {'jpeg': _encoded(rgb, 'JPEG', quality=90), 'png': _encoded(rgb, 'PNG'),
           'grey jpeg': _encoded(rgb[..., 0], 'JPEG', quality=90),
           'cmyk jpeg': _encoded(Image.fromarray(rgb).convert('CMYK'), 'JPEG', quality=90)}
  for name, data in cases.items():
    ours = augment.decode_image(data)
    pil = np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))
    assert ours.shape == (37, 53, 3) and ours.dtype == np.uint8, name
    if name == 'cmyk jpeg':  # OpenCV's CMYK conversion is not PIL's: the same picture within a few levels
      assert np.abs(ours.astype(int) - pil).mean() < 3, name
    else:
      np.testing.assert_array_equal(ours, pil, err_msg=name)
  np.testing.assert_array_equal(augment.decode_image(rgb), rgb)  # decoded already
  with pytest.raises(ValueError, match='not a decodable image'):
    augment.decode_image(b'not an image at all')


@pytest.fixture(scope='module')
def imagenet_like_dir(tmp_path_factory):
  from ttq_jax import imagenet_like
  d = str(tmp_path_factory.mktemp('imagenet_like'))
  imagenet_like.write(d, train_examples=48, validation_examples=20, sizes=((75, 100), (100, 75), (60, 80)),
                      size_weights=(1, 1, 1))
  return d


def test_imagenet_like_set_is_read_as_imagenet_arrayrecord(imagenet_like_dir):
  """The generated set is what the pipeline reads for ImageNet: tfds ArrayRecord with JPEG bytes inside."""
  c = _data_config(name='imagenet2012', data_dir=imagenet_like_dir, train_crop='ttq_alexnet')
  train, test = datasets.get_source(c, 'train'), datasets.get_source(c, 'test')
  assert (len(train), len(test)) == (48, 20)
  ex = train[3]
  assert isinstance(ex['image'], bytes) and ex['image'][:2] == b'\xff\xd8'  # not decoded by tfds
  decoded = augment.decode_image(ex['image'])
  assert decoded.shape in ((75, 100, 3), (100, 75, 3), (60, 80, 3))
  # the pixels are the JPEG's: an independent decoder (PIL) agrees to within libjpeg's rounding
  import io
  from PIL import Image
  reference = np.asarray(Image.open(io.BytesIO(ex['image'])).convert('RGB'))
  assert np.abs(decoded.astype(int) - reference.astype(int)).max() <= 2 and reference.std() > 10
  # and the eval batch holds example 0 of the split, short side 256 and centre crop of its decode
  first = np.asarray(Image.open(io.BytesIO(test[0]['image'])).convert('RGB'))
  batch = ip.train_dataset(c, local_batch_size=8, seed=0)[1]
  assert batch['image'].shape == (8, 224, 224, 3) and batch['image'].dtype == np.uint8
  assert batch['label'].dtype == np.int32 and batch['label'].shape == (8,)
  evals = list(ip.eval_batches(c, global_batch_size=16))
  assert evals[0]['image'].shape == (16, 224, 224, 3) and sum(b['mask'].sum() for b in evals) == 20
  want = augment.imagenet_eval_crop(first)
  assert np.abs(evals[0]['image'][0].astype(int) - want.astype(int)).mean() < 1.0


@pytest.mark.slow
def test_worker_processes_make_the_same_batches_and_resume_anywhere(imagenet_like_dir):
  """Batch k with 2 worker processes equals ds[k] made in this process; a state saved with 2 workers
  resumes with 1 (or none) at the same batch; eval batches too."""
  c = _data_config(name='imagenet2012', data_dir=imagenet_like_dir, train_crop='ttq_alexnet')
  ds = ip.train_dataset(c, local_batch_size=8, seed=3)
  reference = [ds[k] for k in range(9)]
  with ip.BatchIterator(ds, workers=2) as it:
    got = [next(it) for _ in range(5)]  # past the first epoch (6 batches of 8) is not needed: 48 / 8 = 6
    state = it.get_state()
  assert state == {'next_index': 5}
  resumed = {}
  for workers in (1, 0):  # both resume at batch 5 and read on from there
    with ip.BatchIterator(ds, workers=workers) as it:
      it.set_state(state)
      resumed[workers] = [next(it) for _ in range(4)]
  for run in (got + resumed[1], got + resumed[0]):
    assert len(run) == 9
    for a, b in zip(reference, run):
      np.testing.assert_array_equal(a['image'], b['image'])
      np.testing.assert_array_equal(a['label'], b['label'])
  in_process = list(ip.eval_batches(c, split='test', global_batch_size=8, workers=0))
  by_workers = list(ip.eval_batches(c, split='test', global_batch_size=8, workers=2))
  assert [b['mask'].sum() for b in by_workers] == [8, 8, 4]
  for a, b in zip(in_process, by_workers):
    np.testing.assert_array_equal(a['image'], b['image'])


@pytest.mark.slow
def test_an_error_in_a_worker_names_the_example():
  good = _encoded(np.zeros((40, 50, 3), np.uint8), 'JPEG')
  source = [{'image': good, 'label': i, 'file_name': f'n{i:03d}.JPEG'} for i in range(12)]
  source[5] = dict(source[5], image=good[:100])  # truncated
  c = _data_config(name='imagenet2012')
  with pytest.raises(errors.DataError) as e:
    list(ip.eval_batches(c, split='test', global_batch_size=4, source=source, workers=2))
  assert str(e.value).startswith('test example at index 5 (n005.JPEG): ') and '\n' not in str(e.value)


def test_worker_count(monkeypatch):
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(16)), raising=False)
  assert ip.worker_count(_data_config(worker_processes=-1)) == 16 - ip.TRAINING_PROCESS_CORES
  assert ip.worker_count(_data_config(worker_processes=3)) == 3
  assert ip.worker_count(_data_config(worker_processes=0)) == 0
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0}, raising=False)
  assert ip.worker_count(_data_config(worker_processes=-1)) == 0
  with pytest.raises(ip.ConfigError, match='data.worker_processes=-2: allowed are 0'):
    ip.worker_count(_data_config(worker_processes=-2))


WORKER_SIGNALS_SCRIPT = r'''
import multiprocessing as mp, os, signal, sys, time
from ttq_jax import input_pipeline as ip

def worker():
  ip._worker_init(0, 1)
  while True:
    time.sleep(0.1)

def middle(q):  # the "training process": starts a worker, reports its pid, then waits to be killed
  p = mp.get_context('spawn').Process(target=worker)
  p.start()
  q.put(p.pid)
  time.sleep(600)

if __name__ == '__main__':
  ctx = mp.get_context('spawn')
  q = ctx.Queue()
  m = ctx.Process(target=middle, args=(q,))
  m.start()
  pid = q.get(timeout=60)
  time.sleep(2)  # the worker has run _worker_init
  for sig in (signal.SIGTERM, signal.SIGINT):
    os.kill(pid, sig)
  time.sleep(1)
  os.kill(pid, 0)  # still alive: raises if the signals ended it
  print('ALIVE AFTER SIGTERM AND SIGINT', flush=True)
  os.kill(m.pid, signal.SIGKILL)  # the training process dies without closing its workers
  deadline = time.time() + 10
  while time.time() < deadline:
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      print('WORKER EXITED WITH ITS PARENT', flush=True)
      break
    time.sleep(0.2)
  else:
    os.kill(pid, signal.SIGKILL)
'''


@pytest.mark.slow
def test_workers_ignore_sigterm_sigint_and_exit_with_their_parent(tmp_path):
  """Workers leave shutdown to the training process, and do not outlive it when it is SIGKILLed."""
  import subprocess
  import sys
  from tests.conftest import ROOT
  script = tmp_path / 'signals.py'
  script.write_text(WORKER_SIGNALS_SCRIPT)
  r = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                     env=dict(os.environ, PYTHONPATH=ROOT))
  assert 'ALIVE AFTER SIGTERM AND SIGINT' in r.stdout, r.stdout + r.stderr[-2000:]
  assert 'WORKER EXITED WITH ITS PARENT' in r.stdout, r.stdout + r.stderr[-2000:]


def test_a_data_folder_named_by_the_environment_is_the_only_place_looked(monkeypatch, tmp_path):
  """$TTQ_DATA_DIR / $TTQ_TEXT_DIR naming a folder without the data is an error naming the variable, never a quiet
  fall-back to Debian's copy."""
  from ttq_jax import datasets, text
  from ttq_jax.errors import DataError
  (tmp_path / 'empty').mkdir()
  monkeypatch.setenv('TTQ_DATA_DIR', str(tmp_path / 'empty'))
  with pytest.raises(DataError, match=r"Fashion-MNIST not found in \$TTQ_DATA_DIR='.*empty': missing train-images"):
    datasets.load_fashion_mnist('train')
  monkeypatch.setenv('TTQ_TEXT_DIR', str(tmp_path / 'empty'))
  with pytest.raises(DataError, match=r"the python_docs corpus is not in \$TTQ_TEXT_DIR='.*empty' \(no \*.rst.txt"):
    text.corpus_dir()
