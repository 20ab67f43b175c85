"""The packed ternary file format `ttq-safetensors-v2` (spec: docs/export_format.md): codes, packing,
writing and reading. The export job (`--mode export`) is `ttq_jax.export`.

Each ternary kernel is stored as 2-bit codes (4 per byte) or base-3 digits (5 per byte) plus its
shape and two float32 scales: the "nearly 16x smaller" model the TTQ paper promises (Sec. 1).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from ttq_jax import files
from ttq_jax import paths
from ttq_jax import quant as quant_lib
from ttq_jax.errors import ExportError
from ttq_jax.quant.packing import PACKINGS, check_packing

FORMAT = 'ttq-safetensors-v2'
FORMATS = ('ttq-safetensors-v1', FORMAT)  # v1: per-tensor scales only (read as such)
# The BN statistics a file carries (metadata `bn_statistics`; files without it carry `running`)
BN_STATISTICS = {'reestimated': 're-estimated on clean training batches at export time (the headline evaluation)',
                 'running': "training's running averages (what the checkpoint holds)"}
REQUIRED_SUFFIXES = ('/codes', '/shape', '/w_p', '/w_n')
SUFFIXES = REQUIRED_SUFFIXES + ('/scale_shape',)  # scale_shape (v2): only for per-channel scales


# --------------------------------------------------------------------------- tensors


def _flatten(tree, prefix: str) -> dict[str, np.ndarray]:
  """{prefix + '/'-joined path: array}, in the order of the sorted paths."""
  return {prefix + path: np.asarray(leaf) for path, leaf in paths.flat(tree).items()}


def export_tensors(params, batch_stats, layers) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """({name: array} of every variable stored as is, {kernel path: TernaryWeights} of the ternary layers
  (`quant.ternary_layers`), whose latent kernels and scales are stored packed instead)."""
  ternary = {f'params/{p}': tw for p, tw in quant_lib.ternary_weights(params, layers).items()}
  packed_with_codes = {f'params/{p}' for layer in layers for p in layer.scale_paths}  # the method's trained scales
  tensors = {name: value for name, value in {**_flatten(params, 'params/'), **_flatten(batch_stats, 'batch_stats/')}.items()
             if name not in ternary and name not in packed_with_codes}
  return tensors, ternary


def build_export(params, batch_stats, layers, packing: str) -> dict[str, np.ndarray]:
  tensors, ternary = export_tensors(params, batch_stats, layers)
  for path, tw in ternary.items():
    scale_shape = np.shape(tw.w_p)
    tensors[f'{path}/codes'] = tw.pack(packing)
    tensors[f'{path}/shape'] = np.asarray(np.shape(tw.codes), np.int64)
    for name, scale in (('w_p', tw.w_p), ('w_n', tw.w_n)):  # stored 1-D per channel, else a scalar
      tensors[f'{path}/{name}'] = np.asarray(scale, np.float32).reshape(-1 if scale_shape else ())
    if scale_shape:
      tensors[f'{path}/scale_shape'] = np.asarray(scale_shape, np.int64)
  return tensors


def save(path: str, tensors: dict[str, np.ndarray], *, packing: str, config, step: int,
         bn_statistics: str = 'running', activations: dict[str, str] | None = None,
         input_spec: dict | None = None) -> None:
  """Writes atomically (`files.write_bytes`, local or a bucket): a failed export leaves nothing behind.
  `bn_statistics`: which BN statistics `tensors` carry (a key of `BN_STATISTICS`); `activations`: {module path:
  mode} of the layers whose input the model quantizes (`quant.activation_modes`; metadata `activations`, JSON,
  written only when not empty); `input_spec`: what the model takes (metadata `input`, JSON: the dataset's facts,
  `datasets.DatasetInfo`: input shape, dtype, normalisation mean / std, task; files without it still load)."""
  from safetensors.numpy import save
  check_packing(packing)
  if bn_statistics not in BN_STATISTICS:
    raise ExportError(f'bn_statistics={bn_statistics!r} is unknown: allowed are {", ".join(BN_STATISTICS)}')
  metadata = {'format': FORMAT, 'packing': packing, 'step': str(int(step)), 'bn_statistics': bn_statistics,
              'config': config.to_json_best_effort() if hasattr(config, 'to_json_best_effort') else json.dumps(config)}
  if input_spec is not None:
    metadata['input'] = json.dumps(input_spec, sort_keys=True)
  if activations:
    unknown = sorted(set(activations.values()) - set(quant_lib.ACTIVATIONS))
    if unknown:
      raise ExportError(f'activations={unknown[0]!r} is unknown: allowed are {", ".join(quant_lib.ACTIVATIONS)}')
    metadata['activations'] = json.dumps(activations, sort_keys=True)
  files.write_bytes(path, save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata))


def _set(tree: dict, path: str, value) -> None:
  keys = path.split('/')
  for k in keys[:-1]:
    tree = tree.setdefault(k, {})
  tree[keys[-1]] = value


def read(path: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
  """Reads and validates an export (`ttq-safetensors-v2`, or v1). Returns (variables with dense ternary kernels,
  decoded through `quant.TernaryWeights`, metadata, report) where report = {kernel path:
  `quant.LayerReport(...).as_dict()`: numel, sparsity, w_p, w_n, per_channel, packed_bytes}."""
  from safetensors import safe_open
  try:
    with files.local_copy(path) as local, safe_open(local, framework='numpy') as f:
      metadata = dict(f.metadata() or {})
      tensors = {k: f.get_tensor(k) for k in f.keys()}
  except FileNotFoundError:
    raise ExportError(f'{path}: no such export file') from None
  except Exception as e:  # truncated or tampered header / data
    raise ExportError(f'{path}: not a readable safetensors file ({type(e).__name__}: {str(e)[:160]})') from None
  if metadata.get('format') not in FORMATS:
    raise ExportError(f'{path}: __metadata__ format={metadata.get("format")!r} is unknown: allowed are {", ".join(FORMATS)}')
  metadata.setdefault('bn_statistics', 'running')  # files written before the key carried training's statistics
  if metadata['bn_statistics'] not in BN_STATISTICS:
    raise ExportError(f'{path}: __metadata__ bn_statistics={metadata["bn_statistics"]!r} is unknown: allowed are '
                      f'{", ".join(BN_STATISTICS)}')
  packing = metadata.get('packing')
  if packing not in PACKINGS:
    raise ExportError(f'{path}: __metadata__ packing={packing!r} is unknown: allowed are {", ".join(PACKINGS)}')
  variables: dict = {}
  report = {}
  kernels = sorted(k[:-len('/codes')] for k in tensors if k.endswith('/codes'))
  used = set()
  for kp in kernels:
    for suffix in REQUIRED_SUFFIXES:
      if kp + suffix not in tensors:
        raise ExportError(f'{path}: tensor {kp + suffix} is missing')
    used.update(kp + suffix for suffix in SUFFIXES)
    codes, shape = tensors[kp + '/codes'], tensors[kp + '/shape']
    if codes.dtype != np.uint8 or codes.ndim != 1:
      raise ExportError(f'{path}: tensor {kp}/codes must be uint8 1-D, got {codes.dtype} {codes.shape}')
    if shape.dtype != np.int64 or shape.ndim != 1 or (shape < 0).any():
      raise ExportError(f'{path}: tensor {kp}/shape must be non-negative int64 1-D, got {shape.dtype} {shape.tolist()}')
    if kp + '/scale_shape' in tensors and metadata['format'] != FORMAT:
      raise ExportError(f'{path}: tensor {kp}/scale_shape (per-channel scales) needs format {FORMAT}')
    scale_shape = tuple(int(d) for d in tensors.get(kp + '/scale_shape', np.zeros(0, np.int64)))
    if scale_shape and (len(scale_shape) != len(shape) or any(d not in (1, k) for d, k in zip(scale_shape, shape))):
      raise ExportError(f'{path}: tensor {kp}/scale_shape {list(scale_shape)} does not broadcast to shape {shape.tolist()}')
    for s in ('/w_p', '/w_n'):
      t = tensors[kp + s]
      if t.dtype != np.float32 or t.size != int(np.prod(scale_shape)):
        raise ExportError(f'{path}: tensor {kp}{s} must be float32 with {int(np.prod(scale_shape))} values '
                          f'(scale_shape {list(scale_shape)}), got {t.dtype} {t.shape}')
    w_p, w_n = tensors[kp + '/w_p'], tensors[kp + '/w_n']
    weights = quant_lib.TernaryWeights.unpack(codes, tuple(int(s) for s in shape), w_p.reshape(scale_shape),
                                              w_n.reshape(scale_shape), packing, name=f'{path}: tensor {kp}/codes')
    _set(variables, kp, np.asarray(weights.dense(), np.float32))
    packed = codes.nbytes + shape.nbytes + w_p.nbytes + w_n.nbytes + tensors.get(kp + '/scale_shape', np.zeros(0, np.int64)).nbytes
    report[kp] = quant_lib.LayerReport.of(weights, packed_bytes=packed).as_dict()
  for name, value in tensors.items():
    if name not in used:
      _set(variables, name, value)
  return variables, metadata, report
