# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Threshold ablation: TTQ on Fashion-MNIST
#
# The TTQ paper (Zhu et al., ICLR 2017, Sec. 5) sets the threshold with one factor,
# `delta = t * max|w|` (t = 0.05), and also tries a constant sparsity `r` per layer; it reports that
# the `t` rule does better because each layer finds its own sparsity. This notebook sweeps both rules.
# Every point fine-tunes the **same** full-precision checkpoint (the paper's recipe), so the threshold
# is the only thing that changes. Everything comes from the library: `train.train_and_evaluate`, the
# configs, and each run's `metrics.jsonl`.
#
# `TTQ_BUDGET=smoke` (CI, < 3 min on 2 cores) uses a tiny model on 512 images; `TTQ_BUDGET=full` is
# what the committed outputs and the README figures come from.

# %%
import json
import os
import sys

ROOT = os.path.abspath(os.path.join(os.getcwd(), '..')) if os.path.basename(os.getcwd()) == 'experiments' else os.getcwd()
sys.path.insert(0, ROOT)


import matplotlib.pyplot as plt
import numpy as np

from configs import fashion_mnist
from ttq_jax import train

BUDGET = os.environ.get('TTQ_BUDGET', 'smoke')
assert BUDGET in ('smoke', 'full'), f'TTQ_BUDGET={BUDGET!r}: allowed are smoke, full'
WORKDIR = os.environ.get('TTQ_ABLATION_DIR', os.path.join(ROOT, 'workdirs', f'threshold_ablation_{BUDGET}'))

if BUDGET == 'smoke':
  T_VALUES, R_VALUES = [0.0, 0.05, 0.2], [0.0, 0.25, 0.5]
else:
  T_VALUES, R_VALUES = [0.0, 0.025, 0.05, 0.1, 0.15, 0.2], [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]


def base_config():
  config = fashion_mnist.get_config('smoke' if BUDGET == 'smoke' else '')
  config.fp_warmup_epochs = 0.0
  config.log_every_steps = 2 if BUDGET == 'smoke' else 25
  config.eval_every_steps = 0
  config.target_accuracy = 0.0
  config.ternary_kernel_lr_multiplier = 1.0  # the paper's optimizer (the committed outputs used it)
  config.mesh_shape = (1, 1)
  if BUDGET == 'full':
    config.num_epochs = 0.25      # ternary fine-tuning per point (117 steps)
    config.learning_rate = 0.02
  return config


print(f'budget {BUDGET}: {len(T_VALUES)} values of t, {len(R_VALUES)} of r, workdir {WORKDIR}')

# %% [markdown]
# ## 1. The shared full-precision start

# %%
fp_config = base_config()
fp_config.quant.method = 'fp'
if BUDGET == 'full':
  fp_config.num_epochs = 1.0
  fp_config.learning_rate = 0.1
fp_dir = os.path.join(WORKDIR, 'fp')
fp_result = train.train_and_evaluate(fp_config, fp_dir)
print(f'full precision: top-1 {fp_result["top1_accuracy"]:.2%}')

# %% [markdown]
# ## 2. The sweep: `t` (delta = t * max|w|) and constant sparsity `r`

# %%
def run_point(rule, value):
  config = base_config()
  config.init_from = fp_dir
  if rule == 't':
    config.quant.threshold, config.quant.t = 'max', value
  else:
    config.quant.threshold, config.quant.sparsity = 'sparsity', value
  workdir = os.path.join(WORKDIR, f'{rule}_{value:g}')
  result = train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    history = [json.loads(line) for line in f]
  return {'rule': rule, 'value': value, 'top1': result['top1_accuracy'], 'sparsity': result['sparsity'],
          'mean_sparsity': float(np.mean(list(result['sparsity'].values()))), 'history': history}


points = [run_point('t', t) for t in T_VALUES] + [run_point('r', r) for r in R_VALUES]
print(f'{"rule":>4} {"value":>6} {"top-1":>7} {"sparsity":>8}')
for p in points:
  print(f'{p["rule"]:>4} {p["value"]:6.3f} {p["top1"]:7.2%} {p["mean_sparsity"]:8.3f}')

# %% [markdown]
# ## 3. Test accuracy vs sparsity for both rules

# %%
fig, ax = plt.subplots(figsize=(6, 4))
for rule, label, marker in (('t', 'delta = t * max|w|', 'o'), ('r', 'constant sparsity r', 's')):
  pts = sorted((p for p in points if p['rule'] == rule), key=lambda p: p['mean_sparsity'])
  ax.plot([p['mean_sparsity'] for p in pts], [100 * p['top1'] for p in pts], marker=marker, label=label)
  for p in pts:
    ax.annotate(f'{p["value"]:g}', (p['mean_sparsity'], 100 * p['top1']), textcoords='offset points',
                xytext=(3, 3), fontsize=7)
ax.axhline(100 * fp_result['top1_accuracy'], color='gray', ls='--', label='full precision')
ax.set_xlabel('mean sparsity of the ternary layers (fraction of zeros)')
ax.set_ylabel('test top-1 accuracy (%)')
ax.set_title(f'Fashion-MNIST, {fp_config.model.name}, budget {BUDGET}')
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 4. Per-layer sparsity under each rule
# With `t`, each layer finds its own sparsity; with `r`, all layers share one.

# %%
layers = [k.rsplit('/', 1)[0] for k in points[0]['sparsity']]
grid = np.array([[p['sparsity'][k] for k in points[0]['sparsity']] for p in points])
fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(layers)), 0.35 * len(points) + 1.5))
im = ax.imshow(grid, aspect='auto', cmap='viridis', vmin=0, vmax=max(0.6, grid.max()))
ax.set_yticks(range(len(points)), [f'{p["rule"]}={p["value"]:g}' for p in points])
ax.set_xticks(range(len(layers)), [l.replace('PreActBlock_', 'B').replace('/TernaryConv_', '.c') for l in layers],
              rotation=90, fontsize=7)
fig.colorbar(im, ax=ax, label='fraction of zeros')
ax.set_title('per-layer sparsity')
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 5. W_p and W_n during training (t = 0.05)

# %%
ref = next(p for p in points if p['rule'] == 't' and abs(p['value'] - 0.05) < 1e-9)
steps = [row['step'] for row in ref['history']]
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
for ax, scale in zip(axes, ('w_p', 'w_n')):
  for key in [k for k in ref['history'][0] if k.startswith(scale + '/')]:
    ax.plot(steps, [row[key] for row in ref['history']], lw=1, label=key.split('/', 1)[1])
  ax.set_title(scale)
  ax.set_xlabel('step')
axes[0].set_ylabel('scale')
axes[1].legend(fontsize=6, ncol=2)
fig.tight_layout()
plt.show()
