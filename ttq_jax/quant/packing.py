"""Packing ternary codes into bytes: 2 bits per weight ('2bit') or 5 base-3 digits per byte ('base3').

Codes: 0 for 0, 1 for +w_p, 2 for -w_n. Pure numpy; the file format around it is `ttq_jax.export_format`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from ttq_jax.errors import ExportError

_POW3 = np.array([1, 3, 9, 27, 81], np.uint8)
_SHIFT2 = np.array([0, 2, 4, 6], np.uint8)


def codes_from_ternary(signs: np.ndarray) -> np.ndarray:
  """{-1, 0, +1} -> codes {2, 0, 1} (uint8, C order, flattened)."""
  s = np.asarray(signs).reshape(-1)
  return np.where(s > 0, 1, np.where(s < 0, 2, 0)).astype(np.uint8)


def _pack_2bit(groups: np.ndarray) -> np.ndarray:
  return np.bitwise_or.reduce(groups << _SHIFT2, axis=1).astype(np.uint8)


def _unpack_2bit(data: np.ndarray, name: str) -> np.ndarray:
  codes = (data[:, None] >> _SHIFT2) & 3
  if (codes == 3).any():
    raise ExportError(f'{name}: invalid code 3 in 2bit data at element {int(np.argmax(codes.reshape(-1) == 3))}')
  return codes


def _pack_base3(groups: np.ndarray) -> np.ndarray:
  return (groups * _POW3).sum(axis=1, dtype=np.uint16).astype(np.uint8)


def _unpack_base3(data: np.ndarray, name: str) -> np.ndarray:
  if (data > 242).any():
    raise ExportError(f'{name}: byte {int(data.max())} > 242 is not 5 base-3 digits (at byte {int(np.argmax(data > 242))})')
  return (data[:, None] // _POW3) % 3


@dataclasses.dataclass(frozen=True)
class Packing:
  per_byte: int
  pack: Callable[[np.ndarray], np.ndarray]          # [bytes, per_byte] codes -> [bytes] uint8
  unpack: Callable[[np.ndarray, str], np.ndarray]   # [bytes] uint8 -> [bytes, per_byte] codes (validated)


# '2bit': element i at bits 2(i%4).. of byte i//4; 'base3': digit i%5 (base 3) of byte i//5.
PACKINGS: dict[str, Packing] = {'2bit': Packing(4, _pack_2bit, _unpack_2bit),
                                'base3': Packing(5, _pack_base3, _unpack_base3)}


def check_packing(packing: str) -> Packing:
  if packing not in PACKINGS:
    raise ExportError(f'export.packing={packing!r} is unknown: allowed are {", ".join(PACKINGS)}')
  return PACKINGS[packing]


def pack(codes: np.ndarray, packing: str) -> np.ndarray:
  """Packs codes in {0, 1, 2} with `PACKINGS[packing]` (the last byte zero-padded)."""
  per = check_packing(packing).per_byte
  codes = np.asarray(codes, np.uint8).reshape(-1)
  padded = np.zeros(-(-codes.size // per) * per, np.uint8)
  padded[:codes.size] = codes
  return PACKINGS[packing].pack(padded.reshape(-1, per))


def unpack(data: np.ndarray, n: int, packing: str, name: str = 'codes') -> np.ndarray:
  """Inverse of `pack` for the first n elements; rejects invalid codes (3 in 2bit, byte > 242 in base3)."""
  data = np.asarray(data, np.uint8).reshape(-1)
  spec = check_packing(packing)
  if data.size != -(-n // spec.per_byte):
    raise ExportError(f'{name}: {data.size} bytes do not hold {n} elements in {packing} '
                      f'(expected {-(-n // spec.per_byte)} bytes)')
  flat = spec.unpack(data, name).reshape(-1)
  if flat[n:].any():
    raise ExportError(f'{name}: padding elements after element {n} are not 0')
  return flat[:n].astype(np.uint8)
