r"""Reproduction harness: run (config, method) rows, collect their eval JSON, write a markdown table.

    python experiments/reproduce.py --table fashion_mnist [--epochs 4]   # our table (CPU, offline)
    python experiments/reproduce.py --table paper                        # the paper's rows + FP twins

Each row runs as `python -m ttq_jax.main` in its own workdir (re-running resumes or just re-reads a
finished row), then `--mode eval` (and `--mode export` for ternary rows, for the model size). Rows
whose data or accelerator is missing are listed with what they need instead of being run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Row:
  name: str
  config: str                      # PATH[:ARG]
  overrides: tuple[str, ...] = ()
  paper_error: str = ''            # the paper's number, as printed
  needs_data: str = ''             # tfds dataset name
  needs_accelerator: bool = False
  init_from_row: str = ''          # fine-tune from this row's workdir


def paper_rows() -> list[Row]:
  rows = []
  cifar = {20: ('8.23', '8.87'), 32: ('7.67', '7.63'), 44: ('7.18', '7.02'), 56: ('6.80', '6.44')}
  for n, (fp, ttq) in cifar.items():
    cfg = f'configs/resnet{n}_cifar10.py'
    rows.append(Row(f'ResNet-{n} CIFAR-10 FP', f'{cfg}:fp', paper_error=fp, needs_data='cifar10', needs_accelerator=True))
    rows.append(Row(f'ResNet-{n} CIFAR-10 TTQ', cfg, paper_error=ttq, needs_data='cifar10', needs_accelerator=True,
                    init_from_row=f'ResNet-{n} CIFAR-10 FP'))
  rows += [
      Row('AlexNet ImageNet FP', 'configs/alexnet_imagenet.py:fp', paper_error='42.8 / 19.7', needs_data='imagenet2012',
          needs_accelerator=True),
      Row('AlexNet ImageNet TWN', 'configs/alexnet_imagenet.py:twn', paper_error='45.5 / 23.2',
          needs_data='imagenet2012', needs_accelerator=True),
      Row('AlexNet ImageNet TTQ', 'configs/alexnet_imagenet.py', paper_error='42.5 / 20.3', needs_data='imagenet2012',
          needs_accelerator=True),
      Row('ResNet-18 ImageNet FP', 'configs/resnet18_imagenet.py:fp', paper_error='30.4 / 10.8',
          needs_data='imagenet2012', needs_accelerator=True),
      Row('ResNet-18 ImageNet TWN', 'configs/resnet18_imagenet.py:twn', paper_error='34.7 / -',
          needs_data='imagenet2012', needs_accelerator=True),
      Row('ResNet-18 ImageNet TTQ', 'configs/resnet18_imagenet.py', paper_error='33.4 / 12.8',
          needs_data='imagenet2012', needs_accelerator=True),
  ]
  return rows


def fashion_mnist_rows(epochs: float) -> list[Row]:
  common = (f'--config.num_epochs={epochs}',)
  return [
      Row('ResNet-20 Fashion-MNIST FP', 'configs/fashion_mnist.py:fp', common),
      Row('ResNet-20 Fashion-MNIST TTQ (t=0.05)', 'configs/fashion_mnist.py', common),
      Row('ResNet-20 Fashion-MNIST TWN', 'configs/fashion_mnist.py', common + ('--config.quant.method=twn',)),
  ]


def _slug(name: str) -> str:
  return ''.join(c if c.isalnum() else '_' for c in name.lower()).strip('_')


def missing_requirements(row: Row, allow_cpu: bool) -> str:
  needs = []
  if row.needs_data:
    try:
      import tensorflow_datasets as tfds
      tfds.data_source(row.needs_data, split='train')
    except Exception:  # noqa: BLE001 - any failure means the data is not prepared
      needs.append(f'{row.needs_data} as ArrayRecord (README, "Datasets")')
  if row.needs_accelerator and not allow_cpu:
    import jax
    if jax.default_backend() == 'cpu':
      needs.append('an accelerator (hundreds of epochs; --allow-cpu forces a CPU run)')
  return ('needs ' + ' and '.join(needs)) if needs else ''


def _main_cmd(row: Row, workdir: str, mode: str, extra=()) -> list[str]:
  return [sys.executable, '-m', 'ttq_jax.main', '--config', row.config, '--workdir', workdir, f'--mode={mode}',
          *row.overrides, *extra]


def run_row(row: Row, workdir: str, init_from: str | None, log) -> dict:
  extra = (f'--config.init_from={init_from}',) if init_from else ()
  t0 = time.time()
  for mode in ('train', 'eval'):
    r = subprocess.run(_main_cmd(row, workdir, mode, extra), cwd=ROOT, capture_output=True, text=True)
    log.write(r.stdout + r.stderr)
    if r.returncode:
      raise RuntimeError(f'{row.name}: {mode} failed: {(r.stderr.strip().splitlines() or ["?"])[-1]}')
  evals = sorted(os.listdir(os.path.join(workdir, 'eval')), key=lambda f: int(f.split('_')[-1].split('.')[0])
                 if f.startswith('step_') else -1)
  result = json.load(open(os.path.join(workdir, 'eval', [f for f in evals if f.startswith('step_')][-1])))
  result['wall_s'] = time.time() - t0
  is_fp = row.config.endswith(':fp')
  if not is_fp:
    r = subprocess.run(_main_cmd(row, workdir, 'export', extra), cwd=ROOT, capture_output=True, text=True)
    log.write(r.stdout + r.stderr)
    path = os.path.join(workdir, 'export', 'model.safetensors')
    if r.returncode == 0 and os.path.exists(path):
      result['model_bytes'] = os.path.getsize(path)
  else:
    result['model_bytes'] = result.get('params_bytes_fp32')
  return result


def markdown(rows: list[Row], results: dict, missing: dict, with_paper: bool) -> str:
  head = '| row | test error (%) | top-1 acc (%) | mean sparsity | model bytes |'
  sep = '|---|---|---|---|---|'
  if with_paper:
    head += ' paper error (%) |'
    sep += '---|'
  lines = [head, sep]
  for row in rows:
    if row.name in results:
      r = results[row.name]
      err = 100 * (1 - r['top1_accuracy'])
      if 'top5_accuracy' in r and r.get('num_examples', 0) and row.needs_data == 'imagenet2012':
        err_s = f'{err:.2f} / {100 * (1 - r["top5_accuracy"]):.2f}'
      else:
        err_s = f'{err:.2f}'
      sp = r.get('sparsity') or {}
      mean_sp = f'{sum(sp.values()) / len(sp):.3f}' if sp else '-'
      cells = [row.name, err_s, f'{100 * r["top1_accuracy"]:.2f}', mean_sp, f'{r.get("model_bytes", 0):,}']
    else:
      cells = [row.name, f'not run: {missing.get(row.name, "?")}', '-', '-', '-']
    if with_paper:
      cells.append(row.paper_error or '-')
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--table', choices=['fashion_mnist', 'paper'], default='fashion_mnist')
  p.add_argument('--epochs', type=float, default=4.0, help='fashion_mnist: epochs of every row')
  p.add_argument('--workdir_root', default='workdirs/reproduce')
  p.add_argument('--results', default='', help='markdown output (default experiments/results/<table>.md)')
  p.add_argument('--allow-cpu', action='store_true')
  p.add_argument('--only', default='', help='comma-separated substrings: run only matching rows')
  args = p.parse_args()
  rows = paper_rows() if args.table == 'paper' else fashion_mnist_rows(args.epochs)
  out = args.results or os.path.join(ROOT, 'experiments', 'results', f'{args.table}.md')
  os.makedirs(os.path.dirname(out), exist_ok=True)
  results, missing, workdirs = {}, {}, {}
  log_path = os.path.join(args.workdir_root, 'reproduce.log')
  os.makedirs(args.workdir_root, exist_ok=True)
  with open(log_path, 'a') as log:
    for row in rows:
      if args.only and not any(s in row.name for s in args.only.split(',')):
        missing[row.name] = 'skipped (--only)'
        continue
      need = missing_requirements(row, args.allow_cpu)
      if need:
        missing[row.name] = need
        print(f'[skip] {row.name}: {need}', flush=True)
        continue
      workdir = os.path.join(args.workdir_root, _slug(row.name))
      workdirs[row.name] = workdir
      init_from = workdirs.get(row.init_from_row) if row.init_from_row else None
      if row.init_from_row and init_from is None:
        missing[row.name] = f'needs the row "{row.init_from_row}" first'
        continue
      print(f'[run ] {row.name} in {workdir}', flush=True)
      try:
        results[row.name] = run_row(row, workdir, init_from, log)
        r = results[row.name]
        print(f'       top-1 {100 * r["top1_accuracy"]:.2f}% in {r["wall_s"] / 60:.1f} min', flush=True)
      except RuntimeError as e:
        missing[row.name] = str(e)
        print(f'[fail] {e}', flush=True)
  import jax
  header = (f'# {args.table} results\n\nMeasured by `python experiments/reproduce.py --table {args.table}'
            f'{f" --epochs {args.epochs:g}" if args.table == "fashion_mnist" else ""}` on {os.cpu_count()} CPU cores '
            f'({jax.default_backend()}, jax {jax.__version__}), {time.strftime("%Y-%m-%d")}.\n\n')
  text = header + markdown(rows, results, missing, args.table == 'paper') + '\n'
  with open(out, 'w') as f:
    f.write(text)
  with open(out.replace('.md', '.json'), 'w') as f:
    json.dump({k: {kk: vv for kk, vv in v.items()} for k, v in results.items()}, f, indent=2)
  print(text)
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
