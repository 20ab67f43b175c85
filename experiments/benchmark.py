r"""Side-by-side speed and memory benchmark of ttq_jax (and, optionally, a PyTorch ResNet-20).

    python experiments/benchmark.py --model resnet20 --batch_size 128 --json OUT.json [--compare-torch]
        [--memory] [--pipeline] [--compile-cache] [--dtype bfloat16]
    python experiments/benchmark.py --model lm_decoder --seq_len 128 --batch_size 32 --no-xla-options
        [--methods fp,ttq,twn,bitnet,bitnet_a8,ttq_a8]   # configs/lm.py's decoder on python_docs-shaped bytes

Times, as medians of repeated steps after warm-up, interleaved round robin so every ratio sees one
machine state:
  - the train step and the eval step (at --eval_batch_size) of each method (fp, ttq; twn with --methods; for
    `lm_decoder` the variants of configs/lm.py, each over fp: the weight-only methods' target is <= 1.10x);
  - on CPU, each program (train, eval, BN re-estimation) with our per-program XLA options vs XLA's default;
  - --compare-torch: a PyTorch eager ResNet-20 of the same shape, train step and eval at --eval_batch_size;
  - --pipeline: steps/s with the real Fashion-MNIST pipeline vs a device-resident batch;
  - --memory: XLA's memory analysis of the train step (ResNet-20, ResNet-18, AlexNet; f32 and bf16);
  - --compile-cache: start-to-first-step of a fresh process, cold vs warm persistent compilation cache.
Ratios are printed; --json writes everything with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import base  # noqa: E402
from ttq_jax import datasets, input_pipeline, programs as programs_lib, sharding as sharding_lib, train  # noqa: E402
from ttq_jax import state as state_lib  # noqa: E402

IMAGE_SHAPES = {'cifar10': (32, 32, 3), 'fashion_mnist': (28, 28, 1), 'imagenet2012': (224, 224, 3)}


def make_config(model: str, dataset: str, method: str, batch_size: int, dtype: str = 'float32',
                ynn: str = 'auto', seq_len: int = 128):
  if model == 'lm_decoder':  # configs/lm.py:<method> (its variants: fp, ttq, twn, bitnet, bitnet_a8, ttq_a8)
    from configs import lm
    c = lm.get_config(method)
    c.data.seq_len = seq_len
  else:
    c = base.get_config()
    c.model.name, c.data.name, c.quant.method = model, dataset, method
  c.batch_size, c.dtype, c.xla_cpu_ynn_fusion = batch_size, dtype, ynn
  c.compilation_cache_dir = ''
  c.mesh_shape = (-1, 1)
  return c


def synthetic_batch(config, batch_size: int, mesh, with_mask: bool = False):
  info = datasets.dataset_info(config.data)
  rng = np.random.default_rng(0)
  if info.task == 'next_byte':
    seq_len = info.input_shape[0]
    local = {'tokens': rng.integers(0, 256, (batch_size, seq_len + 1)).astype(np.int32)}
    if with_mask:
      local['mask'] = np.ones((batch_size, seq_len), np.float32)
    return sharding_lib.global_batch(local, mesh)
  local = {'image': rng.integers(0, 255, (batch_size, *info.input_shape), dtype=np.uint8),
           'label': rng.integers(0, info.num_classes, batch_size).astype(np.int32)}
  if with_mask:
    local['mask'] = np.ones(batch_size, np.float32)
  return sharding_lib.global_batch(local, mesh)


class Runner:
  """A state + compiled programs for one (model, method, dtype, option) setting."""

  def __init__(self, config, mesh):
    self.config, self.mesh = config, mesh
    self.state = state_lib.create_train_state(config, state_lib.create_model(config), mesh)
    self.programs = train.create_programs(config, mesh, self.state)
    self.batch = synthetic_batch(config, config.batch_size, mesh)

  def train_step(self):
    self.state, m = self.programs.train(self.state, self.batch)
    jax.block_until_ready(m)

  def eval_step_fn(self, eval_batch_size: int):
    """The eval program on a resident batch of `eval_batch_size` (timed without the host)."""
    batch = synthetic_batch(self.config, eval_batch_size, self.mesh, with_mask=True)
    return lambda: jax.block_until_ready(self.programs.eval(self.state, batch))

  def moments_step(self):
    jax.block_until_ready(self.programs.moments(self.state, self.batch))

  def flops(self) -> float:
    compiled = self.programs.executable('train', self.state, self.batch)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get('flops', float('nan')))


def median_ms(fn, steps: int, warmup: int) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return 1000 * statistics.median(times)


def interleaved_ms(fns: dict, steps: int, warmup: int, block: int = 1) -> dict[str, float]:
  """Round-robin timing: each round runs every fn once, so drift hits all of them alike.

  With block > 1 each round runs every fn `block` times in a row and times only the last
  `block - 1`, so no timed step directly follows another framework's step (PyTorch's OpenMP
  threads spin-wait after each op and would bill the next JAX step on a 2-core machine).
  """
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times = {k: [] for k in fns}
  for _ in range(steps):
    for k, fn in fns.items():
      for i in range(block):
        t = time.perf_counter()
        fn()
        if block == 1 or i > 0:
          times[k].append(time.perf_counter() - t)
  return {k: 1000 * statistics.median(v) for k, v in times.items()}


# --------------------------------------------------------------------------- PyTorch reference


def torch_resnet20_steps(batch_size: int, image_shape, num_classes: int, channels_last: bool, device: str,
                         eval_batch_size: int):
  """(train_step, eval_step) of a PyTorch eager pre-activation ResNet-20 (option-A shortcuts): SGD with
  momentum, and the same net in eval mode under `torch.inference_mode()` at `eval_batch_size` (summed
  loss, top-1 and top-5 correct, as our eval step computes)."""
  import torch
  import torch.nn as tnn
  import torch.nn.functional as F

  class Block(tnn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.bn1, self.conv1 = tnn.BatchNorm2d(cin), tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn2, self.conv2 = tnn.BatchNorm2d(cout), tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.stride, self.pad = stride, cout - cin

    def forward(self, x):
      y = self.conv1(F.relu(self.bn1(x)))
      y = self.conv2(F.relu(self.bn2(y)))
      s = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
      if self.pad:
        s = F.pad(s, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
      return y + s

  class Net(tnn.Module):
    def __init__(self):
      super().__init__()
      layers, cin = [], 16
      for stage, w in enumerate((16, 32, 64)):
        for b in range(3):
          layers.append(Block(cin, w, 2 if stage and not b else 1))
          cin = w
      self.stem, self.body = tnn.Conv2d(image_shape[2], 16, 3, 1, 1, bias=False), tnn.Sequential(*layers)
      self.bn, self.fc = tnn.BatchNorm2d(64), tnn.Linear(64, num_classes)

    def forward(self, x):
      x = F.relu(self.bn(self.body(self.stem(x))))
      return self.fc(x.mean((2, 3)))

  net = Net().to(device)
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  net = net.to(memory_format=fmt)
  opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
  x = torch.randn(batch_size, image_shape[2], image_shape[0], image_shape[1], device=device).to(memory_format=fmt)
  y = torch.randint(0, num_classes, (batch_size,), device=device)

  def step():
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    opt.step()
    if device == 'cuda':
      torch.cuda.synchronize()
  xe = torch.randn(eval_batch_size, image_shape[2], image_shape[0], image_shape[1], device=device).to(memory_format=fmt)
  ye = torch.randint(0, num_classes, (eval_batch_size,), device=device)

  def eval_step():
    net.eval()
    with torch.inference_mode():
      logits = net(xe)
      loss = F.cross_entropy(logits, ye, reduction='sum')
      top5 = logits.topk(min(5, num_classes), dim=1).indices
      correct1, correct5 = (top5[:, 0] == ye).sum(), (top5 == ye[:, None]).any(1).sum()
    net.train()
    return loss.item(), correct1.item(), correct5.item()  # .item() waits for the device
  return step, eval_step


# --------------------------------------------------------------------------- sections


def bench_methods(args, mesh, results):
  """Train and eval step of each method, timed interleaved (round robin) so ratios see one machine state."""
  runners = {m: Runner(make_config(args.model, args.dataset, m, args.batch_size, args.dtype, seq_len=args.seq_len), mesh)
             for m in args.methods.split(',')}
  train_ms = interleaved_ms({m: r.train_step for m, r in runners.items()}, args.steps, args.warmup)
  eval_ms = interleaved_ms({m: r.eval_step_fn(args.eval_batch_size) for m, r in runners.items()},
                           max(3, args.steps // 2), 2)
  for method, runner in runners.items():
    flops = runner.flops()
    t, e = train_ms[method], eval_ms[method]
    results[method] = {'train_step_ms_median': t, 'eval_step_ms_median': e,
                       'train_images_per_s': args.batch_size / t * 1000,
                       'eval_images_per_s': args.eval_batch_size / e * 1000,
                       'train_gflops_per_s': flops / t / 1e6, 'train_step_gflop': flops / 1e9}
    print(f'{method:>4}: train {t:8.1f} ms ({results[method]["train_images_per_s"]:7.0f} img/s, '
          f'{results[method]["train_gflops_per_s"]:6.1f} GFLOP/s) | eval@{args.eval_batch_size} {e:8.1f} ms',
          flush=True)
  if 'fp' in results:
    results['ratios'] = {}
    for method in [m for m in runners if m != 'fp']:
      for phase in ('train', 'eval'):
        results['ratios'][f'{method}_over_fp_{phase}'] = (results[method][f'{phase}_step_ms_median'] /
                                                        results['fp'][f'{phase}_step_ms_median'])
      print(f'{method} / fp step time (interleaved): train {results["ratios"][f"{method}_over_fp_train"]:.3f}, '
            f'eval {results["ratios"][f"{method}_over_fp_eval"]:.3f}')


def bench_xla_options(args, mesh, results):
  """The per-program CPU options (`xla_cpu_ynn_fusion='auto'`) vs XLA's default ('on'), interleaved."""
  if jax.default_backend() != 'cpu':
    return
  ours = Runner(make_config(args.model, args.dataset, 'ttq', args.batch_size, args.dtype, 'auto', args.seq_len), mesh)
  default = Runner(make_config(args.model, args.dataset, 'ttq', args.batch_size, args.dtype, 'on', args.seq_len), mesh)
  t = interleaved_ms({'train_ours': ours.train_step, 'train_default': default.train_step}, args.steps, args.warmup)
  e = interleaved_ms({'eval_ours': ours.eval_step_fn(args.eval_batch_size),
                      'eval_default': default.eval_step_fn(args.eval_batch_size)},
                     max(3, args.steps // 2), 2)
  m = interleaved_ms({'moments_ours': ours.moments_step, 'moments_default': default.moments_step},
                     max(3, args.steps // 2), 2)
  res = {**t, **e, **m, 'options': {p: programs_lib.compiler_options(ours.config, p) for p in ('train', 'eval', 'moments')}}
  for p in ('train', 'eval', 'moments'):
    res[f'{p}_speedup'] = res[f'{p}_default'] / res[f'{p}_ours']
  results['xla_cpu_options'] = res
  print('CPU per-program options vs XLA default: ' + ', '.join(
      f'{p} {res[f"{p}_default"]:.1f} -> {res[f"{p}_ours"]:.1f} ms ({res[f"{p}_speedup"]:.2f}x)'
      for p in ('train', 'eval', 'moments')))


def bench_torch(args, mesh, results):
  import torch
  device = 'cuda' if jax.default_backend() == 'gpu' and torch.cuda.is_available() else 'cpu'
  info = datasets.dataset_info(args.dataset)
  ours = Runner(make_config(args.model, args.dataset, 'ttq', args.batch_size, args.dtype), mesh)
  torch_train, torch_eval = torch_resnet20_steps(args.batch_size, info.input_shape, info.num_classes, False, device,
                                                args.eval_batch_size)
  fns = {'jax_ttq': ours.train_step, 'torch_fp_nchw': torch_train}
  evals = {'jax_ttq_eval': ours.eval_step_fn(args.eval_batch_size), 'torch_fp_nchw_eval': torch_eval}
  if device == 'cpu':
    cl_train, cl_eval = torch_resnet20_steps(args.batch_size, info.input_shape, info.num_classes, True, device,
                                            args.eval_batch_size)
    fns['torch_fp_channels_last'], evals['torch_fp_channels_last_eval'] = cl_train, cl_eval
  # Blocks of 3 (the first of each untimed): see interleaved_ms.
  t = interleaved_ms(fns, max(2, args.steps // 2), args.warmup, block=3)
  e = interleaved_ms(evals, max(2, args.steps // 3), 2, block=3)
  results['torch'] = {**t, **e, 'device': device, 'torch_version': torch.__version__,
                      'torch_threads': torch.get_num_threads(), 'eval_batch_size': args.eval_batch_size,
                      'jax_ttq_over_torch_nchw': t['jax_ttq'] / t['torch_fp_nchw'],
                      'jax_ttq_eval_over_torch_nchw_eval': e['jax_ttq_eval'] / e['torch_fp_nchw_eval']}
  line = f'PyTorch {torch.__version__} ({device}) eager FP ResNet-20: NCHW {t["torch_fp_nchw"]:.1f} ms'
  if 'torch_fp_channels_last' in t:
    results['torch']['jax_ttq_over_torch_channels_last'] = t['jax_ttq'] / t['torch_fp_channels_last']
    results['torch']['jax_ttq_eval_over_torch_channels_last_eval'] = (
        e['jax_ttq_eval'] / e['torch_fp_channels_last_eval'])
    line += f', channels_last {t["torch_fp_channels_last"]:.1f} ms'
  print(f'{line} | JAX TTQ {t["jax_ttq"]:.1f} ms => JAX TTQ / torch NCHW = {results["torch"]["jax_ttq_over_torch_nchw"]:.2f}x')
  line = f'eval at batch {args.eval_batch_size}: torch NCHW {e["torch_fp_nchw_eval"]:.1f} ms'
  if 'torch_fp_channels_last_eval' in e:
    line += f', channels_last {e["torch_fp_channels_last_eval"]:.1f} ms'
  print(f'{line} | JAX TTQ {e["jax_ttq_eval"]:.1f} ms => JAX / torch NCHW = '
        f'{results["torch"]["jax_ttq_eval_over_torch_nchw_eval"]:.2f}x')


def bench_pipeline(args, mesh, results):
  """Steps/s with the real Fashion-MNIST pipeline (grain + device prefetch) vs a resident batch."""
  from configs import fashion_mnist
  config = fashion_mnist.get_config()
  config.batch_size, config.compilation_cache_dir, config.mesh_shape = args.batch_size, '', (-1, 1)
  runner = Runner(config, mesh)
  ds = input_pipeline.train_dataset(config.data, local_batch_size=args.batch_size // jax.process_count(), seed=0)
  it = input_pipeline.BatchIterator(ds, workers=input_pipeline.worker_count(config.data), threads=config.data.num_threads)
  prefetcher = sharding_lib.Prefetcher(it, mesh, config.data.prefetch_batches)

  def real():
    batch, _ = prefetcher.next()
    runner.state, m = runner.programs.train(runner.state, batch)
    return m

  def run(fn_step, n):
    m = None
    for _ in range(args.warmup):
      m = fn_step()
    jax.block_until_ready(m)
    t = time.perf_counter()
    for _ in range(n):  # no sync inside: as in the training loop
      m = fn_step()
    jax.block_until_ready(m)
    return n / (time.perf_counter() - t)

  def synthetic():
    runner.state, m = runner.programs.train(runner.state, runner.batch)
    return m
  n = max(10, args.steps)
  host = median_ms(lambda: ds[np.random.randint(1000)], 20, 2)
  real_sps, synth_sps = run(real, n), run(synthetic, n)
  results['pipeline'] = {'real_steps_per_s': real_sps, 'synthetic_steps_per_s': synth_sps,
                         'ratio': real_sps / synth_sps, 'host_batch_ms_median': host}
  print(f'pipeline: real {real_sps:.2f} steps/s vs device-resident {synth_sps:.2f} steps/s '
        f'= {real_sps / synth_sps:.3f}x (host makes a batch in {host:.1f} ms)')


MEMORY_SETTINGS = [('resnet20', 'cifar10', 128), ('resnet18', 'imagenet2012', 128), ('alexnet', 'imagenet2012', 128)]


def bench_memory(args, mesh, results):
  """Per-device argument / output / temp bytes of the compiled train step (XLA memory analysis)."""
  out = {}
  one = sharding_lib.create_mesh((1, 1), ('data', 'fsdp'))
  for model, dataset, per_device in MEMORY_SETTINGS:
    for dtype in ('float32', 'bfloat16'):
      config = make_config(model, dataset, 'ttq', per_device, dtype)
      state = jax.eval_shape(lambda: state_lib.create_train_state(config, state_lib.create_model(config), one))
      shardings = jax.tree.map(lambda _: sharding_lib.replicated(one), state)
      state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state, shardings)
      info = datasets.dataset_info(dataset)
      batch = {'image': jax.ShapeDtypeStruct((per_device, *info.input_shape), jnp.uint8),
               'label': jax.ShapeDtypeStruct((per_device,), jnp.int32)}
      # the step as training compiles it: the model called through `state.apply_fn` (train flag, dropout key)
      apply = state_lib.apply_fn(state_lib.create_model(config), config.seed)
      fn = lambda s, b: train.train_step(s, b, apply_fn=apply, info=info, dtype=state_lib.compute_dtype(config))
      t = time.perf_counter()
      compiled = jax.jit(fn, donate_argnums=(0,)).lower(state, batch).compile()
      mem = compiled.memory_analysis()
      row = {'argument_bytes': mem.argument_size_in_bytes, 'output_bytes': mem.output_size_in_bytes,
             'temp_bytes': mem.temp_size_in_bytes, 'alias_bytes': mem.alias_size_in_bytes,
             'per_device_batch': per_device, 'compile_s': time.perf_counter() - t}
      row['total_bytes'] = row['argument_bytes'] + row['output_bytes'] + row['temp_bytes'] - row['alias_bytes']
      out[f'{model}/{dtype}'] = row
      print(f'memory {model:>8} {dtype:>8} batch {per_device}/device: args {row["argument_bytes"] / 2**30:6.2f} GiB, '
            f'out {row["output_bytes"] / 2**30:6.2f} GiB (aliased {row["alias_bytes"] / 2**30:5.2f}), '
            f'temp {row["temp_bytes"] / 2**30:6.2f} GiB => {row["total_bytes"] / 2**30:6.2f} GiB', flush=True)
  results['memory'] = out


def bench_compile_cache(args, results):
  """Cold vs warm start (import + state + first train step) of a fresh process, same cache dir."""
  cache = tempfile.mkdtemp(prefix='ttq_cache_')
  code = ('import time; t=time.perf_counter();'
          'from experiments.benchmark import *; import jax;'
          'c = make_config(%r, %r, "ttq", %d); c.compilation_cache_dir = %r; programs_lib.setup_compilation_cache(c);'
          'm = sharding_lib.create_mesh((-1, 1), ("data", "fsdp")); r = Runner(c, m); r.train_step();'
          'print(time.perf_counter() - t)') % (args.model, args.dataset, args.batch_size, cache)
  times = []
  for _ in range(2):
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT)
    times.append(float(out.stdout.strip().splitlines()[-1]))
  results['compile_cache'] = {'cold_start_s': times[0], 'warm_start_s': times[1]}
  print(f'start to first step: cold {times[0]:.1f} s, warm (persistent cache) {times[1]:.1f} s')


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--model', default='resnet20')
  p.add_argument('--dataset', default='cifar10', choices=sorted(IMAGE_SHAPES))
  p.add_argument('--batch_size', type=int, default=128)
  p.add_argument('--eval_batch_size', type=int, default=512)
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  p.add_argument('--methods', default='', help='default fp,ttq; lm_decoder: fp,ttq,twn,bitnet,bitnet_a8,ttq_a8')
  p.add_argument('--seq_len', type=int, default=128, help='lm_decoder: bytes per window')
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--warmup', type=int, default=3)
  p.add_argument('--json', default='')
  p.add_argument('--compare-torch', action='store_true')
  p.add_argument('--memory', action='store_true')
  p.add_argument('--pipeline', action='store_true')
  p.add_argument('--compile-cache', action='store_true')
  p.add_argument('--no-xla-options', action='store_true')
  args = p.parse_args()
  args.methods = args.methods or ('fp,ttq,twn,bitnet,bitnet_a8,ttq_a8' if args.model == 'lm_decoder' else 'fp,ttq')
  mesh = sharding_lib.create_mesh((-1, 1), ('data', 'fsdp'))
  sharding_lib.check_batch_size(args.batch_size, mesh)
  results = {'machine': {'backend': jax.default_backend(), 'devices': [str(d.device_kind) for d in jax.devices()][:1],
                         'device_count': jax.device_count(), 'cpu_count': os.cpu_count(),
                         'processor': platform.processor() or platform.machine(), 'jax': jax.__version__},
             'settings': vars(args)}
  print(f'{args.model} batch {args.batch_size} ({args.dtype}) on {jax.device_count()} x '
        f'{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}')
  bench_methods(args, mesh, results)
  if not args.no_xla_options:
    bench_xla_options(args, mesh, results)
  if args.compare_torch:
    bench_torch(args, mesh, results)
  if args.pipeline:
    bench_pipeline(args, mesh, results)
  if args.memory:
    bench_memory(args, mesh, results)
  if args.compile_cache:
    bench_compile_cache(args, results)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=2)
    print(f'wrote {args.json}')


if __name__ == '__main__':
  main()
