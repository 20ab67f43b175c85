"""Packed ternary export: `ttq-safetensors-v1` (format spec: docs/export_format.md).

Each ternary kernel is stored as 2-bit codes (4 per byte) or base-3 digits (5 per byte) plus its
shape and two float32 scales: the "nearly 16x smaller" model the TTQ paper promises (Sec. 1).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

FORMAT = 'ttq-safetensors-v1'
PACKINGS = ('2bit', 'base3')
_PER_BYTE = {'2bit': 4, 'base3': 5}
_POW3 = np.array([1, 3, 9, 27, 81], np.uint8)
_SHIFT2 = np.array([0, 2, 4, 6], np.uint8)
SUFFIXES = ('/codes', '/shape', '/w_p', '/w_n')


class ExportError(ValueError):
  """A malformed export file or bad export request (one line, names the tensor)."""


# --------------------------------------------------------------------------- codes


def codes_from_ternary(signs: np.ndarray) -> np.ndarray:
  """{-1, 0, +1} -> codes {2, 0, 1} (uint8, C order, flattened)."""
  s = np.asarray(signs).reshape(-1)
  return np.where(s > 0, 1, np.where(s < 0, 2, 0)).astype(np.uint8)


def pack(codes: np.ndarray, packing: str) -> np.ndarray:
  """Packs codes in {0, 1, 2}: '2bit' element i -> byte i//4, bits 2(i%4)..; 'base3' digit i%5 of byte i//5."""
  if packing not in PACKINGS:
    raise ExportError(f'export.packing={packing!r} is unknown: allowed are {", ".join(PACKINGS)}')
  per = _PER_BYTE[packing]
  codes = np.asarray(codes, np.uint8).reshape(-1)
  padded = np.zeros(-(-codes.size // per) * per, np.uint8)
  padded[:codes.size] = codes
  groups = padded.reshape(-1, per)
  if packing == '2bit':
    return np.bitwise_or.reduce(groups << _SHIFT2, axis=1).astype(np.uint8)
  return (groups * _POW3).sum(axis=1, dtype=np.uint16).astype(np.uint8)


def unpack(data: np.ndarray, n: int, packing: str, name: str = 'codes') -> np.ndarray:
  """Inverse of `pack` for the first n elements; rejects invalid codes (3 in 2bit, byte > 242 in base3)."""
  data = np.asarray(data, np.uint8).reshape(-1)
  per = _PER_BYTE[packing]
  if data.size != -(-n // per):
    raise ExportError(f'{name}: {data.size} bytes do not hold {n} elements in {packing} '
                      f'(expected {-(-n // per)} bytes)')
  if packing == '2bit':
    codes = (data[:, None] >> _SHIFT2) & 3
    if (codes == 3).any():
      raise ExportError(f'{name}: invalid code 3 in 2bit data at element {int(np.argmax(codes.reshape(-1) == 3))}')
  else:
    if (data > 242).any():
      raise ExportError(f'{name}: byte {int(data.max())} > 242 is not 5 base-3 digits (at byte {int(np.argmax(data > 242))})')
    codes = (data[:, None] // _POW3) % 3
  flat = codes.reshape(-1)
  if flat[n:].any():
    raise ExportError(f'{name}: padding elements after element {n} are not 0')
  return flat[:n].astype(np.uint8)


def dense_from_codes(codes: np.ndarray, shape, w_p: float, w_n: float) -> np.ndarray:
  """Code 0 -> 0, 1 -> +w_p, 2 -> -w_n, reshaped (C order), float32."""
  w_p, w_n = np.float32(w_p), np.float32(w_n)
  return np.where(codes == 1, w_p, np.where(codes == 2, -w_n, np.float32(0))).astype(np.float32).reshape(shape)


# --------------------------------------------------------------------------- tensors


def _flatten(tree, prefix: str) -> dict[str, np.ndarray]:
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out[prefix + '/'.join(str(k.key) for k in path)] = np.asarray(leaf)
  return out


def export_tensors(params, batch_stats, quant) -> dict[str, np.ndarray]:
  """{name: array} of the export: packed ternary kernels + every other variable as is."""
  from ttq_jax import quant as quant_lib
  ternary = {f'params/{p}': v for p, v in quant_lib.ternary_weights(params, quant).items()}
  tensors = {}
  for name, value in {**_flatten(params, 'params/'), **_flatten(batch_stats, 'batch_stats/')}.items():
    layer = name.rsplit('/', 1)[0]
    if name in ternary:
      continue
    if f'{layer}/kernel' in ternary and name.rsplit('/', 1)[1] in ('w_p', 'w_n'):
      continue  # stored with the kernel's codes
    tensors[name] = value
  return tensors, {p: tuple(np.asarray(x) for x in v) for p, v in ternary.items()}


def build_export(params, batch_stats, quant, packing: str) -> dict[str, np.ndarray]:
  tensors, ternary = export_tensors(params, batch_stats, quant)
  for path, (signs, w_p, w_n) in ternary.items():
    tensors[f'{path}/codes'] = pack(codes_from_ternary(signs), packing)
    tensors[f'{path}/shape'] = np.asarray(signs.shape, np.int64)
    tensors[f'{path}/w_p'] = np.asarray(w_p, np.float32).reshape(())
    tensors[f'{path}/w_n'] = np.asarray(w_n, np.float32).reshape(())
  return tensors


def save(path: str, tensors: dict[str, np.ndarray], *, packing: str, config, step: int) -> None:
  """Writes atomically (temp file + rename): a failed export leaves nothing behind."""
  from safetensors.numpy import save_file
  if packing not in PACKINGS:
    raise ExportError(f'export.packing={packing!r} is unknown: allowed are {", ".join(PACKINGS)}')
  metadata = {'format': FORMAT, 'packing': packing, 'step': str(int(step)),
              'config': config.to_json_best_effort() if hasattr(config, 'to_json_best_effort') else json.dumps(config)}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp-{os.getpid()}'
  try:
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _set(tree: dict, path: str, value) -> None:
  keys = path.split('/')
  for k in keys[:-1]:
    tree = tree.setdefault(k, {})
  tree[keys[-1]] = value


def read(path: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
  """Reads and validates an export. Returns (variables with dense ternary kernels, metadata, report)
  where report = {kernel path: {'sparsity', 'w_p', 'w_n', 'numel', 'packed_bytes'}}."""
  from safetensors import safe_open
  try:
    with safe_open(path, framework='numpy') as f:
      metadata = dict(f.metadata() or {})
      tensors = {k: f.get_tensor(k) for k in f.keys()}
  except FileNotFoundError:
    raise ExportError(f'{path}: no such export file') from None
  except Exception as e:  # truncated or tampered header / data
    raise ExportError(f'{path}: not a readable safetensors file ({type(e).__name__}: {str(e)[:160]})') from None
  if metadata.get('format') != FORMAT:
    raise ExportError(f'{path}: __metadata__ format={metadata.get("format")!r} is unknown: allowed is {FORMAT}')
  packing = metadata.get('packing')
  if packing not in PACKINGS:
    raise ExportError(f'{path}: __metadata__ packing={packing!r} is unknown: allowed are {", ".join(PACKINGS)}')
  variables: dict = {}
  report = {}
  kernels = sorted(k[:-len('/codes')] for k in tensors if k.endswith('/codes'))
  used = set()
  for kp in kernels:
    for suffix in SUFFIXES:
      if kp + suffix not in tensors:
        raise ExportError(f'{path}: tensor {kp + suffix} is missing')
      used.add(kp + suffix)
    codes, shape = tensors[kp + '/codes'], tensors[kp + '/shape']
    if codes.dtype != np.uint8 or codes.ndim != 1:
      raise ExportError(f'{path}: tensor {kp}/codes must be uint8 1-D, got {codes.dtype} {codes.shape}')
    if shape.dtype != np.int64 or shape.ndim != 1 or (shape < 0).any():
      raise ExportError(f'{path}: tensor {kp}/shape must be non-negative int64 1-D, got {shape.dtype} {shape.tolist()}')
    for s in ('/w_p', '/w_n'):
      t = tensors[kp + s]
      if t.dtype != np.float32 or t.size != 1:
        raise ExportError(f'{path}: tensor {kp}{s} must be a float32 scalar, got {t.dtype} {t.shape}')
    n = int(np.prod(shape))
    decoded = unpack(codes, n, packing, name=f'{path}: tensor {kp}/codes')
    w_p, w_n = float(tensors[kp + '/w_p'].reshape(())), float(tensors[kp + '/w_n'].reshape(()))
    _set(variables, kp, dense_from_codes(decoded, tuple(int(s) for s in shape), w_p, w_n))
    report[kp] = {'sparsity': float(np.mean(decoded == 0)) if n else 0.0, 'w_p': w_p, 'w_n': w_n, 'numel': n,
                  'packed_bytes': int(codes.nbytes + shape.nbytes + 8)}
  for name, value in tensors.items():
    if name not in used:
      _set(variables, name, value)
  return variables, metadata, report


def load(path: str):
  """(model, variables): the inference model (ternary layers as plain convs holding the dense
  ternary kernels rebuilt from the codes) and its variables, ready for `model.apply(v, x, train=False)`."""
  from ttq_jax import train
  variables, metadata, _ = read(path)
  config = ml_collections.ConfigDict(json.loads(metadata['config']))
  return train.create_model(config, quantized=False), variables


# --------------------------------------------------------------------------- --mode export


def _nbytes(tree) -> int:
  return int(sum(np.asarray(x).size * 4 for x in jax.tree.leaves(tree)))  # as float32


def export_workdir(config, workdir: str) -> dict:
  """Exports the newest (or `eval_step`) checkpoint to WORKDIR/export/model.safetensors."""
  from ttq_jax import checkpoint as ckpt
  from ttq_jax import config_check
  from ttq_jax import metric_writers
  from ttq_jax import sharding as sharding_lib
  from ttq_jax import train
  config_check.validate(config)
  packing = config.export.packing
  if config.quant.method == 'fp':
    raise ExportError('quant.method=fp has no ternary layers to pack: export a ttq or twn run')
  workdir = os.path.abspath(workdir)
  mesh = sharding_lib.create_mesh(config.mesh_shape, config.mesh_axes)
  state = train.create_train_state(config, train.create_model(config), mesh)
  manager = ckpt.create_manager(workdir, read_only=True)
  restored = ckpt.restore_latest(manager, state, None if config.eval_step < 0 else config.eval_step)
  if restored is None:
    raise ckpt.CheckpointError(f'workdir {workdir} has no checkpoints to export')
  step, state, _ = restored
  params, batch_stats = jax.device_get((state.params, state.batch_stats))
  tensors = build_export(params, batch_stats, train.quant_config(config), packing)
  path = os.path.join(workdir, 'export', 'model.safetensors')
  if jax.process_index() == 0:
    save(path, tensors, packing=packing, config=config, step=step)
  _, _, report = read(path)
  fp32_total = _nbytes(params) + _nbytes(batch_stats)
  export_bytes = os.path.getsize(path)
  ternary_fp32 = sum(r['numel'] * 4 for r in report.values())
  ternary_packed = sum(r['packed_bytes'] for r in report.values())
  summary = {'step': int(step), 'path': path, 'packing': packing, 'fp32_params_bytes': fp32_total,
             'export_bytes': export_bytes, 'ternary_fp32_bytes': ternary_fp32, 'ternary_packed_bytes': ternary_packed,
             'ternary_compression': ternary_fp32 / max(ternary_packed, 1),
             'model_compression': fp32_total / max(export_bytes, 1), 'layers': report}
  if jax.process_index() == 0:
    rows = [(k.removeprefix('params/').removesuffix('/kernel'), f'{r["numel"]:,}', f'{r["sparsity"]:.3f}',
             f'{r["w_p"]:+.4f}', f'{r["w_n"]:+.4f}') for k, r in report.items()]
    print(metric_writers.table(rows, ('layer', 'weights', 'sparsity', 'w_p', 'w_n')))
    print(f'\nexported step {step} ({packing}) to {path}\n'
          f'  ternary layers: {ternary_fp32:,} B fp32 -> {ternary_packed:,} B packed '
          f'({summary["ternary_compression"]:.2f}x smaller)\n'
          f'  whole model:    {fp32_total:,} B fp32 params -> {export_bytes:,} B file '
          f'({summary["model_compression"]:.2f}x smaller)')
  return summary
