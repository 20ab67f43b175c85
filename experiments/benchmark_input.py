r"""How fast the ImageNet input pipeline feeds an accelerator, and how many host cores one needs.

    python experiments/benchmark_input.py [--json experiments/results/input_pipeline.json]

1. Writes a generated ImageNet-like set (`ttq_jax.imagenet_like`: JPEGs at ImageNet's common sizes, quality
   90, ~95 KB each) as tfds ArrayRecord, the storage the real pipeline reads.
2. Per core, side by side on the same images in one process: today's path before this pipeline (PIL decode
   + PIL resize, bilinear and the bicubic the code used) against ours (simplejpeg decode + OpenCV
   INTER_CUBIC, the official scripts' resize), for the AlexNet train crop and the eval crop.
   Rounds alternate between the paths so that a busy machine slows both alike.
3. The train and eval pipelines (`BatchIterator` over `train_dataset` / `eval_dataset`) with 1, 2, ...
   worker processes up to the host's cores (and 0: threads of the training process), images/s after the
   workers started.
4. Next to them, what accelerators consume: the last measured GPU train-step figures
   (experiments/results/h100/scaling.json, labelled as such) and the host cores each needs.

JSON: {"train_img_s": {"1": x, ...}, "eval_img_s": {...}, "per_core_img_s": {"train": x, "eval": y}, ...}
(keys of the first two are worker counts).
"""

import argparse
import io
import json
import os
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from ttq_jax import imagenet_like  # noqa: E402
from ttq_jax import augment  # noqa: E402
from ttq_jax import datasets  # noqa: E402
from ttq_jax import input_pipeline as ip  # noqa: E402

GPU_RESULTS = os.path.join(ROOT, 'experiments', 'results', 'h100', 'scaling.json')


def _pil_decode(data: bytes) -> np.ndarray:
  from PIL import Image
  return np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))


def _pil_resize(method: str):
  from PIL import Image
  resample = {'bilinear': Image.BILINEAR, 'bicubic': Image.BICUBIC}[method]
  return lambda image, h, w: np.asarray(Image.fromarray(image).resize((w, h), resample))


def _paths():
  """name -> (decode, resize) of the per-image work compared."""
  return {'pil_bilinear': (_pil_decode, _pil_resize('bilinear')),  # the "today": PIL decode + bilinear
          'pil_bicubic': (_pil_decode, _pil_resize('bicubic')),    # what the code did before (PIL bicubic)
          'ours': (augment.decode_image, augment._resize)}                   # simplejpeg + cv2.INTER_CUBIC


def per_core(images: list[bytes], rounds: int) -> dict:
  """Images/s of one thread for decode + train crop and decode + eval crop, per path, alternating rounds."""
  paths = _paths()
  seconds = {(p, kind): [] for p in paths for kind in ('train', 'eval')}
  original = augment._resize
  try:
    for _ in range(rounds):
      for name, (decode, resize) in paths.items():
        augment._resize = resize  # the crops' geometry is the same; only decode and resize differ
        for kind in ('train', 'eval'):
          rng = np.random.default_rng(0)
          t = time.perf_counter()
          for data in images:
            image = decode(data)
            augment.imagenet_train_crop(image, rng) if kind == 'train' else augment.imagenet_eval_crop(image)
          seconds[name, kind].append(time.perf_counter() - t)
  finally:
    augment._resize = original
  out = {f'{kind}_{name}': len(images) / float(np.median(seconds[name, kind])) for name, kind in seconds}
  # decode alone, for the split of the cost
  for name, decode in (('pil', _pil_decode), ('ours', augment.decode_image)):
    t = time.perf_counter()
    for data in images:
      decode(data)
    out[f'decode_{name}'] = len(images) / (time.perf_counter() - t)
  return out


def pipeline_img_s(ds, batch: int, workers: int, batches: int, threads: int, warmup: int) -> tuple[float, float]:
  """(images/s, seconds to the first batch) of a BatchIterator over `ds`: the clock starts after `warmup`
  batches, when the workers run and what they buffered while starting (<= 8 batches) is used up."""
  with ip.BatchIterator(ds, workers=workers, threads=threads) as it:
    t0 = time.perf_counter()
    next(it)
    startup = time.perf_counter() - t0
    for _ in range(warmup - 1):
      next(it)
    t = time.perf_counter()
    for _ in range(batches):
      next(it)
    return batch * batches / (time.perf_counter() - t), startup


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--data-dir', default='', help='where the generated set is written (default: a temporary folder)')
  p.add_argument('--train-examples', type=int, default=2000)
  p.add_argument('--eval-examples', type=int, default=500)
  p.add_argument('--batch-size', type=int, default=32)
  p.add_argument('--batches', type=int, default=24, help='timed batches per pipeline measurement')
  p.add_argument('--warmup', type=int, default=10, help='batches before the clock starts')
  p.add_argument('--repeats', type=int, default=3, help='rounds over all worker counts (the median is reported)')
  p.add_argument('--workers', default='', help='comma-separated worker counts (default: 1 .. cores)')
  p.add_argument('--per-core-images', type=int, default=200)
  p.add_argument('--rounds', type=int, default=5)
  p.add_argument('--json', default='')
  args = p.parse_args()

  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  workers = [int(w) for w in args.workers.split(',')] if args.workers else list(range(1, cores + 1))
  data_dir = args.data_dir or tempfile.mkdtemp(prefix='imagenet_like_')
  t = time.perf_counter()
  imagenet_like.write(data_dir, train_examples=args.train_examples, validation_examples=args.eval_examples)
  print(f'generated {args.train_examples} + {args.eval_examples} JPEGs in {data_dir} ({time.perf_counter() - t:.0f} s)')

  import ml_collections
  data = ml_collections.ConfigDict(dict(name='imagenet2012', data_dir=data_dir, train_crop='ttq_alexnet',
                                        limit_examples=0, validation_examples=0))
  source = datasets.get_source(data, 'train')
  images = [source[i]['image'] for i in range(min(args.per_core_images, len(source)))]
  mean_kb = np.mean([len(x) for x in images]) / 1e3
  print(f'{len(images)} images, mean {mean_kb:.0f} KB; per core (one thread), {args.rounds} alternating rounds:')
  core = per_core(images, args.rounds)
  for kind in ('train', 'eval'):
    ours, bil, bic = core[f'{kind}_ours'], core[f'{kind}_pil_bilinear'], core[f'{kind}_pil_bicubic']
    print(f'  {kind:5s} decode + crop: ours {ours:6.0f} img/s | PIL + bilinear {bil:6.0f} ({ours / bil:.2f}x) | '
          f'PIL + bicubic {bic:6.0f} ({ours / bic:.2f}x)')
  print(f'  decode alone: simplejpeg {core["decode_ours"]:.0f} img/s, PIL {core["decode_pil"]:.0f} img/s')

  train_ds = ip.train_dataset(data, local_batch_size=args.batch_size, seed=0)
  # the eval split's batches, repeated so that every measurement has the same length
  eval_ds = ip.eval_dataset(data, split='test', global_batch_size=args.batch_size).repeat(None)
  runs = {(kind, str(w)): [] for kind in ('train', 'eval', 'startup') for w in [0] + workers}
  print(f'pipelines: batches of {args.batch_size}, {args.batches} timed after {args.warmup}, median of '
        f'{args.repeats} rounds over every worker count:')
  for _ in range(args.repeats):
    for w in [0] + workers:
      img_s, start = pipeline_img_s(train_ds, args.batch_size, w, args.batches, cores, args.warmup)
      runs['train', str(w)].append(img_s)
      runs['startup', str(w)].append(start)
      runs['eval', str(w)].append(pipeline_img_s(eval_ds, args.batch_size, w, args.batches, cores, args.warmup)[0])
  train, evals, startup = ({w: float(np.median(runs[kind, str(w)])) for w in map(str, [0] + workers)}
                           for kind in ('train', 'eval', 'startup'))
  for w in map(str, [0] + workers):
    print(f'  {w} worker processes{" (threads of this process)" if w == "0" else ""}: train {train[w]:6.0f} img/s, '
          f'eval {evals[w]:6.0f} img/s (first batch after {startup[w]:.1f} s; train rounds '
          f'{", ".join(f"{x:.0f}" for x in runs["train", w])})')
  scaling = {kind: {w: x[w] / x['1'] for w in x if w != '0'} for kind, x in (('train', train), ('eval', evals))}
  for kind in scaling:
    print(f'  {kind} scaling vs 1 worker: ' + ', '.join(f'{w}: {x:.2f}x' for w, x in scaling[kind].items()))

  results = {
      'host': {'cores': cores, 'cpu': _cpu_name()},
      'dataset': {'train_examples': args.train_examples, 'eval_examples': args.eval_examples,
                  'mean_jpeg_kb': mean_kb, 'batch_size': args.batch_size},
      'settings': {'threads_with_0_workers': cores, 'batches_timed': args.batches, 'warmup_batches': args.warmup,
                   'repeats': args.repeats, 'per_core_images': len(images), 'per_core_rounds': args.rounds},
      'train_img_s': train, 'eval_img_s': evals, 'startup_s': startup,
      'rounds': {f'{kind}_{w}': x for (kind, w), x in runs.items()},
      'per_core_img_s': {'train': core['train_ours'], 'eval': core['eval_ours']},  # decode + crop, one thread
      'per_worker_pipeline_img_s': {'train': train['1'], 'eval': evals['1']},
      'per_core_img_s_before': {'train_pil_bilinear': core['train_pil_bilinear'], 'train_pil_bicubic': core['train_pil_bicubic'],
                                'eval_pil_bicubic': core['eval_pil_bicubic']},
      'per_core_speedup': {'train_vs_pil_bilinear': core['train_ours'] / core['train_pil_bilinear'],
                           'train_vs_pil_bicubic': core['train_ours'] / core['train_pil_bicubic'],
                           'eval_vs_pil_bicubic': core['eval_ours'] / core['eval_pil_bicubic']},
      'decode_img_s': {'simplejpeg': core['decode_ours'], 'pil': core['decode_pil']},
      'scaling_vs_1_worker': scaling,
  }
  if os.path.exists(GPU_RESULTS):
    with open(GPU_RESULTS) as f:
      gpu = json.load(f)
    need = {}
    worker = train['1']  # what one worker process delivers through the whole pipeline (read, parse, batch)
    print(f'accelerators (last measured GPU figures: {gpu.get("device_kind")}, {os.path.relpath(GPU_RESULTS, ROOT)}):')
    for key in ('alexnet_float32_ttq', 'alexnet_bfloat16_ttq'):
      if key in gpu:
        img_s = gpu[key]['images_per_s']
        need[key] = {'gpu_img_s': img_s, 'host_cores_needed': img_s / worker,
                     'host_cores_needed_at_per_core_rate': img_s / core['train_ours']}
        print(f'  {key}: {img_s:.0f} img/s = {img_s / worker:.0f} worker processes of this host at {worker:.0f} img/s '
              f'each ({img_s / core["train_ours"]:.0f} at the bare decode + crop rate, {core["train_ours"]:.0f} img/s)')
    results['accelerators'] = {'source': os.path.relpath(GPU_RESULTS, ROOT), 'device_kind': gpu.get('device_kind'),
                               'label': 'last measured GPU train-step figures, not this host', **need}
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1)
    print(f'wrote {args.json}')


def _cpu_name() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      return next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
  except (OSError, StopIteration):
    return 'unknown'


if __name__ == '__main__':
  main()
