"""Random-access sources and the example format: in-memory arrays, subsets of a source by index, one example as
the pipelines hand it on ({'image': uint8 or float32 HWC, 'label': int32}), and examples stacked into a batch."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


def as_example(ex) -> dict[str, np.ndarray]:
  image = np.asarray(ex['image'])
  image = image if image.dtype == np.uint8 else image.astype(np.float32)  # uint8 leaves the host as is
  if image.ndim == 2:
    image = image[..., None]
  return {'image': image, 'label': np.int32(ex['label'])}


def stack(examples: Sequence[dict]) -> dict[str, np.ndarray]:
  return {'image': np.stack([e['image'] for e in examples]), 'label': np.asarray([e['label'] for e in examples], np.int32)}


@dataclasses.dataclass
class ArraySource:
  """Random-access source over in-memory arrays (grain's RandomAccessDataSource protocol)."""
  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i):
    return {'image': self.images[i], 'label': self.labels[i]}


@dataclasses.dataclass
class Subset:
  """The examples of a random-access source at `indices`, in that order."""
  source: object
  indices: np.ndarray

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[int(self.indices[i])]
