r"""Scale-out benchmark: the same global batch on 1 vs N devices, and images/s at float32 / bfloat16.

    python experiments/benchmark_scaling.py [--devices 8] [--json OUT.json]

On a CPU host it simulates N devices (`jax_num_cpu_devices`) and reports the step time of the sharded
program against the 1-device program, side by side in one run: the overhead of sharding when all
"devices" share the same cores. With a GPU/TPU it reports images/s of ResNet-20 (CIFAR shapes) and
AlexNet (ImageNet shapes) at float32 and bfloat16 on the devices present.
"""

import argparse
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _has_accelerator() -> bool:
  import importlib.util
  return any(importlib.util.find_spec(m) for m in ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'libtpu'))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--devices', type=int, default=8)
  p.add_argument('--batch_size', type=int, default=128)
  p.add_argument('--steps', type=int, default=8)
  p.add_argument('--json', default='')
  args = p.parse_args()
  import jax
  if os.environ.get('JAX_PLATFORMS', '') == 'cpu' or not _has_accelerator():
    jax.config.update('jax_num_cpu_devices', args.devices)  # before the first JAX computation
  from experiments.benchmark import Runner, interleaved_ms, make_config, median_ms
  from ttq_jax import sharding as sharding_lib
  results = {'backend': jax.default_backend(), 'device_kind': jax.devices()[0].device_kind,
             'device_count': jax.device_count()}
  if jax.default_backend() == 'cpu':
    one = sharding_lib.create_mesh((1, 1), ('data', 'fsdp'))
    many = sharding_lib.create_mesh((args.devices, 1), ('data', 'fsdp'))
    for method in ('fp', 'ttq'):
      r1 = Runner(make_config('resnet20', 'cifar10', method, args.batch_size), one)
      rn = Runner(make_config('resnet20', 'cifar10', method, args.batch_size), many)
      t = interleaved_ms({'1_device': r1.train_step, f'{args.devices}_devices': rn.train_step}, args.steps, 2)
      t['sharded_over_single'] = t[f'{args.devices}_devices'] / t['1_device']
      results[f'resnet20_{method}'] = t
      print(f'resnet20 {method}: 1 device {t["1_device"]:.1f} ms vs {args.devices} simulated devices '
            f'{t[f"{args.devices}_devices"]:.1f} ms per step of {args.batch_size} => {t["sharded_over_single"]:.2f}x',
            flush=True)
  else:
    mesh = sharding_lib.create_mesh((-1, 1), ('data', 'fsdp'))
    for model, dataset in (('resnet20', 'cifar10'), ('alexnet', 'imagenet2012')):
      for dtype in ('float32', 'bfloat16'):
        for method in ('fp', 'ttq'):
          r = Runner(make_config(model, dataset, method, args.batch_size * jax.device_count(), dtype), mesh)
          ms = median_ms(r.train_step, args.steps, 3)
          ips = r.config.batch_size / ms * 1000
          results[f'{model}_{dtype}_{method}'] = {'train_step_ms_median': ms, 'images_per_s': ips}
          print(f'{model:>8} {dtype:>8} {method:>3}: {ms:7.2f} ms/step, {ips:9.0f} img/s', flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  main()
