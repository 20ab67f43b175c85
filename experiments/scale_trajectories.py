r"""Per-layer W_p / W_n over training for two TTQ runs side by side (as the paper's Fig. 3), and how far
each run moved its scales: the figure for README "How much the scales train".

    python experiments/scale_trajectories.py \
        --run "paper recipe=workdirs/reproduce/fashion_mnist/ttq_paper/seed_0" \
        --run "our recipe=workdirs/reproduce/fashion_mnist/ttq_ours/seed_0" \
        --out experiments/results/scale_trajectories.png

Reads each workdir's metrics.jsonl (the `w_p/<layer>` / `w_n/<layer>` scalars logged every
`log_every_steps`); rows from before the switch to ternary (the full-precision warm-up) are left out.
Prints per run: the range of the final scales, the largest W_p / W_n gap of one layer, and the mean
|change| of the scales from the switch to the end.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


from ttq_jax import reports  # noqa: E402


def trajectories(workdir: str) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
  """(steps, {layer: w_p per step}, {layer: w_n per step}) of the ternary phase."""
  rows = [r for r in reports.read_metrics(os.path.join(workdir, 'metrics.jsonl')) if any(k.startswith('w_p/') for k in r)]
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  result = json.load(open(os.path.join(workdir, 'result.json')))
  per_epoch = (result['step'] / config['num_epochs']) if config.get('num_train_steps', -1) <= 0 else 0
  start = int(config.get('fp_warmup_epochs', 0) * per_epoch)
  rows = [r for r in rows if r['step'] > start]
  layers = sorted(k[len('w_p/'):] for k in rows[0] if k.startswith('w_p/'))
  steps = np.array([r['step'] for r in rows])
  return (steps, {l: np.array([r[f'w_p/{l}'] for r in rows]) for l in layers},
          {l: np.array([r[f'w_n/{l}'] for r in rows]) for l in layers})


def summary(name: str, steps, w_p, w_n) -> dict:
  final = np.array([[w_p[l][-1], w_n[l][-1]] for l in w_p])
  first = np.array([[w_p[l][0], w_n[l][0]] for l in w_p])
  gap = max(abs(w_p[l][-1] - w_n[l][-1]) / (0.5 * (abs(w_p[l][-1]) + abs(w_n[l][-1]))) for l in w_p)
  return {'run': name, 'layers': len(w_p), 'final_min': float(final.min()), 'final_max': float(final.max()),
          'largest_wp_wn_gap': float(gap), 'mean_abs_change': float(np.mean(np.abs(final - first))),
          'from_step': int(steps[0]), 'to_step': int(steps[-1])}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--run', action='append', required=True, help='NAME=WORKDIR (repeatable)')
  p.add_argument('--out', default='experiments/results/scale_trajectories.png')
  args = p.parse_args()
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  runs = [r.split('=', 1) for r in args.run]
  fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.2), sharey=True, squeeze=False)
  stats = []
  for ax, (name, workdir) in zip(axes[0], runs):
    steps, w_p, w_n = trajectories(workdir)
    colors = plt.cm.viridis(np.linspace(0, 1, len(w_p)))
    for c, layer in zip(colors, w_p):
      ax.plot(steps, w_p[layer], color=c, lw=1)
      ax.plot(steps, -np.asarray(w_n[layer]), color=c, lw=1, ls='--')
    ax.axhline(0, color='k', lw=0.5)
    ax.set_title(f'{name} ({len(w_p)} ternary layers)', fontsize=10)
    ax.set_xlabel('step (ternary phase)')
    stats.append(summary(name, steps, w_p, w_n))
  axes[0][0].set_ylabel('W_p (solid), -W_n (dashed)')
  fig.suptitle('Per-layer scales after the switch to ternary (one line per layer)', fontsize=11)
  fig.tight_layout()
  fig.savefig(args.out, dpi=110)
  for s in stats:
    print(f'{s["run"]}: final scales {s["final_min"]:.3f} .. {s["final_max"]:.3f}; largest W_p/W_n gap of one layer '
          f'{100 * s["largest_wp_wn_gap"]:.0f}%; mean |change| since the switch {s["mean_abs_change"]:.3f} '
          f'(steps {s["from_step"]}-{s["to_step"]}, {s["layers"]} layers)')
  with open(os.path.splitext(args.out)[0] + '.json', 'w') as f:
    json.dump(stats, f, indent=2)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
