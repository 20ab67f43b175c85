r"""Export goals, measured: ternary-layer compression (2bit >= 15x, base3 >= 19x) and export / load time.

    python experiments/export_sizes.py [--workdir WORKDIR] [--json experiments/results/export_sizes.json]

WORKDIR: a trained quickstart (`configs/fashion_mnist.py`) workdir; without it, a freshly initialised
quickstart ResNet-20 (the sizes depend only on the shapes: 2 bits or log2(3) bits per ternary weight).

Prints, for each packing: bytes of the ternary layers in float32 vs packed, the whole model (fp32 params
and BN statistics vs the file), and the median wall time of export (pack + write) and load (read +
validate + decode to dense kernels), both for ResNet-20.
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import fashion_mnist  # noqa: E402
from ttq_jax import export, export_format, state as state_lib, workdirs  # noqa: E402


def _variables(workdir):
  """(config, variables, the model's ternary layers, what it is)."""
  config = fashion_mnist.get_config()
  if workdir:
    _, step, state, _ = workdirs.restore(config, workdir, mesh_shape=(1, 1))
    return (config, jax.device_get({'params': state.params, 'batch_stats': state.batch_stats}), state.ternary,
            f'{workdir} step {step}')
  model = state_lib.create_model(config)
  layers = state_lib.ternary_layers(model, (28, 28, 1))
  return (config, jax.device_get(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)), train=False)), layers,
          'random ResNet-20')


def timed(fn, n=5):
  times = []
  for _ in range(n):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--workdir', default='')
  p.add_argument('--json', default='', help='write the measurements here')
  args = p.parse_args()
  config, variables, layers, what = _variables(args.workdir)
  fp32 = sum(np.asarray(x).size * 4 for x in jax.tree.leaves(variables))
  print(f'{what}: {fp32:,} B of float32 parameters and BN statistics')
  out = {'model': what, 'config': 'configs/fashion_mnist.py', 'machine': f'{os.cpu_count()} CPU cores, {platform.machine()}',
         'fp32_params_and_bn_bytes': fp32, 'packings': {}}
  for packing in ('2bit', 'base3'):
    path = os.path.join(tempfile.mkdtemp(), 'model.safetensors')

    def do_export():
      tensors = export_format.build_export(variables['params'], variables['batch_stats'], layers, packing)
      export_format.save(path, tensors, packing=packing, config=config, step=0)
    t_export = timed(do_export)
    t_load = timed(lambda: export.load(path))
    _, _, report = export_format.read(path)
    ternary_fp32 = sum(r['numel'] * 4 for r in report.values())
    packed = sum(r['packed_bytes'] for r in report.values())
    size = os.path.getsize(path)
    print(f'{packing:>5}: ternary layers {ternary_fp32:,} B -> {packed:,} B ({ternary_fp32 / packed:.2f}x); '
          f'file {size:,} B, whole model {fp32 / size:.2f}x smaller; export {t_export * 1000:.0f} ms, '
          f'load {t_load * 1000:.0f} ms (median of 5)')
    out['packings'][packing] = {'ternary_fp32_bytes': ternary_fp32, 'ternary_packed_bytes': packed,
                                'ternary_compression': ternary_fp32 / packed, 'file_bytes': size,
                                'model_compression': fp32 / size, 'export_s_median': t_export, 'load_s_median': t_load}
  if args.json:
    from ttq_jax import provenance
    out['provenance'] = provenance.record(ROOT)
    with open(args.json, 'w') as f:
      json.dump(out, f, indent=1)
    print(f'wrote {args.json}')


if __name__ == '__main__':
  main()
