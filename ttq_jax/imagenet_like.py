"""A small generated stand-in for ImageNet, written as tfds writes `imagenet2012` (ArrayRecord of serialized
examples with the JPEG bytes inside), so `tfds.data_source('imagenet2012', data_dir=...)` and the real input
pipeline read it as they would read the prepared ImageNet. For tests, smoke runs of the ImageNet configs and
`experiments/benchmark_input.py`; nothing is downloaded and TensorFlow is not needed.

    from ttq_jax import imagenet_like
    imagenet_like.write('/tmp/imagenet_like', train_examples=2000, validation_examples=500)
    python -m ttq_jax.main --config configs/alexnet_imagenet.py:runlocal --config.data.data_dir=/tmp/imagenet_like ...
"""

from __future__ import annotations

import io
import os

import numpy as np

NAME = 'imagenet2012'
# (height, width) of generated images and how often each occurs: ImageNet's common shapes (most images are
# 500 pixels on the long side; a few are much larger or smaller).
SIZES = ((375, 500), (333, 500), (500, 375), (500, 333), (400, 500), (768, 1024), (180, 240))
SIZE_WEIGHTS = (0.40, 0.15, 0.15, 0.05, 0.15, 0.05, 0.05)
JPEG_QUALITY = 90


def jpeg(height: int, width: int, rng: np.random.Generator, quality: int = JPEG_QUALITY) -> bytes:
  """A JPEG of natural-image-like content: smooth colour fields (a 1/8-size random image, upsampled
  bicubically) with fine noise; ~100 KB at 500 x 375 and quality 90, as a typical ImageNet photo."""
  from PIL import Image
  coarse = rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
  smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.int16)
  pixels = np.clip(smooth + rng.integers(-20, 21, smooth.shape), 0, 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, 'JPEG', quality=quality)
  return buf.getvalue()


def write(data_dir: str, *, train_examples: int, validation_examples: int, seed: int = 0,
          sizes=SIZES, size_weights=SIZE_WEIGHTS) -> str:
  """Writes `imagenet2012` with `train_examples` / `validation_examples` generated JPEGs (labels uniform
  over the 1,000 classes) under `data_dir`; returns the version folder. Overwrites an earlier one."""
  import tensorflow_datasets as tfds
  from array_record.python import array_record_module
  from tensorflow_datasets.core import example_serializer

  builder = tfds.builder(NAME, data_dir=data_dir, file_format='array_record')
  features = builder.info.features
  serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
  out = os.path.join(data_dir, NAME, str(builder.info.version))
  os.makedirs(out, exist_ok=True)
  rng = np.random.default_rng(seed)
  splits = []
  for split, n in (('train', train_examples), ('validation', validation_examples)):
    template = tfds.core.ShardedFileTemplate(data_dir=out, template='{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}',
                                             dataset_name=NAME, split=split, filetype_suffix='array_record')
    path = template.sharded_filepaths(1)[0]
    writer = array_record_module.ArrayRecordWriter(os.fspath(path), 'group_size:1')
    num_bytes = 0
    for i in range(n):
      height, width = sizes[rng.choice(len(sizes), p=np.asarray(size_weights) / np.sum(size_weights))]
      example = {'image': io.BytesIO(jpeg(height, width, rng)), 'label': int(rng.integers(0, 1000)),
                 'file_name': f'generated_{split}_{i:07d}.JPEG'}
      record = serializer.serialize_example(features.encode_example(example))
      num_bytes += len(record)
      writer.write(record)
    writer.close()
    splits.append(tfds.core.SplitInfo(name=split, shard_lengths=[n], num_bytes=num_bytes, filename_template=template))
  builder.info.set_splits(tfds.core.SplitDict(splits))
  builder.info.write_to_directory(out)
  return out
