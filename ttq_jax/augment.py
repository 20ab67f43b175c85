"""Per-image operations of the input pipelines: decoding (simplejpeg / OpenCV), the CIFAR-style padded
random crop and flip (vectorised over a batch), and ImageNet's crops resized as the official scripts do
(cv2.INTER_CUBIC). Pure numpy on the host; random draws come from the generator passed in.
"""

from __future__ import annotations

import functools

import numpy as np

from ttq_jax import sources
from ttq_jax.errors import DataError

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


def prepared(ex, crop, split: str, where: str) -> dict[str, np.ndarray]:
  """An ImageNet example decoded and cropped; a failure is a DataError naming the example (it reaches the
  user as one line from a worker process too)."""
  try:
    example = sources.as_example({'image': decode_image(ex['image']), 'label': ex['label']})
    example['image'] = crop(dict(ex, image=example['image']))
  except (ValueError, OSError, _cv2().error) as e:  # undecodable or unusable image data (not a bug of ours)
    file_name = ex.get('file_name', b'')
    file_name = file_name.decode() if isinstance(file_name, bytes) else str(file_name)
    raise DataError(f'{split} example at {where}{f" ({file_name})" if file_name else ""}: '
                    f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}') from None
  return dict(example, position=ex['position']) if 'position' in ex else example
