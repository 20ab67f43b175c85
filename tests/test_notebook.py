"""The threshold-ablation notebook executes end to end in smoke mode (as a user would run it), with its
workdirs in a bucket (the GCS emulator of the `gcs` fixture)."""

import os

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_threshold_ablation_notebook_runs_in_smoke_mode(gcs, monkeypatch):
  import sys
  sys.path.insert(0, os.path.join(ROOT, 'experiments'))
  import run_notebook
  monkeypatch.setenv('TTQ_BUDGET', 'smoke')
  monkeypatch.setenv('TTQ_ABLATION_DIR', 'gs://ttq/ablation')
  for key in ('STORAGE_EMULATOR_HOST', 'TENSORSTORE_GCS_HTTP_URL', 'GOOGLE_AUTH_TOKEN_FOR_TESTING', 'FSSPEC_GCS_TOKEN',
              'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'GOOGLE_CLOUD_PROJECT'):
    monkeypatch.setenv(key, gcs.env[key])
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  nb = run_notebook.execute(os.path.join(ROOT, 'experiments', 'threshold_ablation.py'), timeout=600)
  outputs = [o for cell in nb.cells if cell.cell_type == 'code' for o in cell.get('outputs', [])]
  assert not [o for o in outputs if o.get('output_type') == 'error']
  images = [o for o in outputs if 'image/png' in o.get('data', {})]
  assert len(images) == 3  # accuracy vs sparsity, per-layer heat map, W_p/W_n over training
  text = ''.join(o.get('text', '') for o in outputs if o.get('output_type') == 'stream')
  assert 'full precision: validation top-1' in text and ' t  0.050' in text and 'seed noise:' in text
  runs = {name.split('/')[1] for name in gcs.objects('ablation/')}
  # fp + 2 t + 2 r + t = 0.05 on a second seed, each with its metrics in the bucket
  assert len(runs) == 6 and all(f'ablation/{r}/metrics.jsonl' in gcs.objects(f'ablation/{r}/') for r in runs), runs
  assert not os.path.exists(os.path.join(ROOT, 'experiments', 'gs:'))
