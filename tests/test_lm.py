"""The byte-level decoder of ttq_jax/lm.py: by value (RMSNorm, rotary), causality, parameter count by hand, and
the rules that make its projections ternary (embedding and head full precision)."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttq_jax import lm
from ttq_jax import quant

TINY = dict(depth=2, width=16, num_heads=2, mlp_width=24)


def test_rms_norm_by_hand():
  x = jnp.float32([[3.0, 4.0]])  # mean of squares 12.5
  y = lm.RMSNorm(eps=0.0).apply({'params': {'scale': jnp.float32([1.0, 2.0])}}, x)
  np.testing.assert_allclose(y, [[3 / np.sqrt(12.5), 8 / np.sqrt(12.5)]], rtol=1e-6)


def test_rotary_by_hand_and_relative():
  """d = 4: pairs (0, 2) and (1, 3) turn by p * 1 and p * 10000^(-1/2) = p / 100. Dot products of a rotated
  query and key depend on the offset only."""
  x = jnp.float32([1.0, 0.0, 0.0, 1.0]).reshape(1, 1, 4)       # [seq 1, heads 1, d 4]
  y = lm.rotary(x, jnp.array([2]))
  a, b = 2.0, 0.02
  np.testing.assert_allclose(y.reshape(-1), [np.cos(a), -np.sin(b), np.sin(a), np.cos(b)], rtol=1e-6)
  q, k = jax.random.normal(jax.random.PRNGKey(0), (2, 1, 1, 8))
  dot = lambda i, j: float(jnp.sum(lm.rotary(q, jnp.array([i])) * lm.rotary(k, jnp.array([j]))))
  assert dot(5, 3) == pytest.approx(dot(9, 7), rel=1e-5) and dot(5, 3) != pytest.approx(dot(5, 4), rel=1e-3)


def test_causal_a_later_byte_changes_no_earlier_logit():
  model = lm.LMDecoder(**TINY)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 10), 0, 256)
  variables = model.init(jax.random.PRNGKey(1), tokens)
  out = model.apply(variables, tokens)
  assert out.shape == (2, 10, 256) and out.dtype == jnp.float32
  changed = model.apply(variables, tokens.at[:, 6].set((tokens[:, 6] + 1) % 256))
  np.testing.assert_array_equal(out[:, :6], changed[:, :6])
  assert not np.allclose(out[:, 6:], changed[:, 6:])


def test_parameter_count_by_hand():
  """embed 256 w + head w 256 + final norm w; per block: 4 w^2 (attention) + 3 w m (gated MLP) + norms
  (attention, mlp: w each; sub-norms: w and m). No biases."""
  w, m, n = TINY['width'], TINY['mlp_width'], TINY['depth']
  params = lm.LMDecoder(**TINY).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))['params']
  expected = 2 * 256 * w + w + n * (4 * w * w + 3 * w * m + 3 * w + m)
  assert sum(x.size for x in jax.tree.leaves(params)) == expected
  assert not any('bias' in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])


@pytest.mark.parametrize('method', ['ttq', 'bitnet'])
def test_rules_make_every_projection_ternary_and_keep_embed_and_head(method):
  model = quant.quantize(lm.LMDecoder(**TINY), [quant.Rule(module_path=lm.PROJECTIONS, method=method,
                                                           w_p_init=0.02, w_n_init=0.02)])
  tokens = jnp.zeros((1, 4), jnp.int32)
  layers = {l.path for l in quant.ternary_layers(model, tokens)}
  assert layers == {f'block_{i}/{p}' for i in range(2) for p in ('attention/query', 'attention/key', 'attention/value',
                                                                   'attention/out', 'mlp/gate', 'mlp/up', 'mlp/down')}
  out = model.apply(model.init(jax.random.PRNGKey(0), tokens), tokens)
  assert out.shape == (1, 4, 256) and bool(jnp.all(jnp.isfinite(out)))


def test_bad_shapes_are_named():
  with pytest.raises(ValueError, match='width=12 must split into num_heads=8'):
    lm.LMDecoder(width=12, num_heads=8).init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
  with pytest.raises(ValueError, match="activation='gelu' is unknown: allowed are silu, relu2"):
    lm.LMDecoder(**TINY, activation='gelu').init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
  assert isinstance(lm.LMDecoder(), nn.Module)


def test_generate_greedy_equals_the_argmax_of_the_unpadded_prefix():
  """Right-padding the context to seq_len changes no logit at the last real position (causal), so greedy
  generation is the argmax of a forward over the prefix alone, byte after byte."""
  model = lm.LMDecoder(**TINY)
  variables = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 8), jnp.int32))
  out = lm.generate(model.apply, variables, b'ab', num_bytes=5, seq_len=8)
  context, apply = list(b'ab'), jax.jit(model.apply)
  for _ in range(5):
    context.append(int(jnp.argmax(apply(variables, jnp.asarray([context[-8:]], jnp.int32))[0, -1])))
  assert out == bytes(context[2:])
  sampled = lm.generate(model.apply, variables, b'ab', num_bytes=5, seq_len=8, temperature=0.8)
  assert sampled == lm.generate(model.apply, variables, b'ab', num_bytes=5, seq_len=8, temperature=0.8)  # fixed seed


@pytest.mark.slow
def test_smoke_trains_resumes_exactly_evaluates_and_exports(tmp_path, text_corpus):
  """configs/lm.py:smoke on a corpus written here: bits per byte in result / eval json chosen on validation
  (lowest), the corpus recorded, samples; a run resumed from its step-3 checkpoint ends bit-identical; `--mode
  eval` and the evaluated export give the same bits per byte."""
  import shutil
  from tests.conftest import make_lm_smoke_config, metrics_rows
  from ttq_jax import evaluation, export, text, train

  config = make_lm_smoke_config(text_corpus)
  run = tmp_path / 'run'
  result = train.train_and_evaluate(config, str(run))
  assert result['step'] == 6 and result['selection_split'] == 'validation' and result['num_bytes'] > 0
  assert result['bits_per_byte'] == pytest.approx(result['loss'] / np.log(2))
  chosen = result['best_on_validation']['running']
  evals = {r['step']: r['eval_bits_per_byte'] for r in metrics_rows(run) if 'eval_bits_per_byte' in r}
  assert sorted(evals) == [3, 6] and chosen['validation_bits_per_byte'] == min(evals.values())
  assert chosen['step'] == min(evals, key=evals.get) and result['protocol']['running']['best'] == min(evals.values())
  assert result['dataset']['corpus_sha256'] == text.corpus_sha256(text_corpus)
  assert sorted(result['samples']) == sorted(f'{m} | {p}' for m in ('greedy', 't=0.8') for p in lm.PROMPTS)
  assert all(s.startswith(k.split(' | ')[1]) for k, s in result['samples'].items())

  resumed = tmp_path / 'resumed'  # as if killed after the step-3 checkpoint
  shutil.copytree(run, resumed)
  shutil.rmtree(resumed / 'checkpoints' / '6')
  (resumed / 'result.json').unlink()
  again = train.train_and_evaluate(config, str(resumed))
  assert again['bits_per_byte'] == result['bits_per_byte'] and again['samples'] == result['samples']
  kept = lambda rows: [{k: r.get(k) for k in ('step', 'train_loss', 'eval_bits_per_byte')} for r in rows]
  assert kept(metrics_rows(resumed)) == kept(metrics_rows(run))  # no row lost or repeated, the same numbers

  ev = evaluation.evaluate_workdir(None, str(run))
  assert ev['bits_per_byte'] == result['bits_per_byte'] and ev['samples'] == result['samples']
  assert (run / 'eval' / 'step_6.json').exists()
  summary = export.export_workdir(None, str(run))
  assert summary['step'] == 6
  from_file = config.copy_and_resolve_references()
  from_file.restore_from = str(run / 'export' / 'model.safetensors')
  ev_file = evaluation.evaluate_workdir(from_file, str(run))
  assert ev_file['bits_per_byte'] == pytest.approx(ev['bits_per_byte'], rel=1e-6)


@pytest.mark.parametrize('variant', ['', 'fp', 'ttq', 'twn', 'bitnet', 'paretoq', 'bitnet_a8', 'ttq_a8', 'nnx', 'smoke'])
def test_every_variant_of_configs_lm_validates_as_its_docstring_says(text_corpus, variant):
  from configs import lm as lm_config
  from ttq_jax import config_check
  config = lm_config.get_config(variant)
  config.data.data_dir = text_corpus
  config_check.validate(config)
  method = {'': 'ttq', 'smoke': 'ttq', 'nnx': 'ttq'}.get(variant, variant.removesuffix('_a8'))
  assert config.quant.method == method and config.data.name == 'python_docs'
  assert config.model.name == ('lm_decoder_nnx' if variant == 'nnx' else 'lm_decoder')
  assert config.quant.activations == ('int8' if variant.endswith('_a8') else 'float')
  assert config.weight_decay == (0.1 if method == 'fp' else 0.0) and config.optimizer == 'adamw'
  assert config.quant.full_precision_layers == 'edges'
  if method == 'paretoq':  # its own scale init (max |w| per row), per channel, in the weights' AdamW
    assert (config.quant.scale_init, config.quant.scale_granularity, config.scale_optimizer) == (None, 'channel', 'same')
  else:
    assert config.quant.scale_init == 'mean_abs' and config.quant.scale_granularity == 'tensor'
  assert 'python -m ttq_jax.main --config configs/lm.py' in lm_config.__doc__
  with pytest.raises(ValueError, match="config argument 'nope' is unknown: allowed are fp, ttq, twn"):
    lm_config.get_config('nope')


@pytest.mark.slow
@pytest.mark.parametrize('variant', ['paretoq', 'nnx'])
def test_variant_trains_evaluates_and_exports_from_the_command_line(tmp_path, text_corpus, variant):
  """configs/lm.py:paretoq and :nnx (the decoder in Flax NNX, TTQ) at the smoke size: train, `--mode eval`,
  `--mode export`, and the export evaluated with `restore_from` give the training run's bits per byte; every
  projection holds its method's scales (`alpha` per output channel for ParetoQ)."""
  import json
  import subprocess
  import sys
  from tests.conftest import ROOT
  workdir = str(tmp_path / variant)
  small = ['--config.model.depth=1', '--config.model.width=32', '--config.model.num_heads=2', '--config.model.mlp_width=64',
           '--config.data.seq_len=32', '--config.batch_size=8', '--config.eval_batch_size=64', '--config.num_train_steps=4',
           '--config.warmup_steps=1', '--config.eval_every_steps=2', '--config.checkpoint_every_steps=2',
           '--config.log_every_steps=2', '--config.mesh_shape=(1, 1)', f'--config.data.data_dir={text_corpus}']
  base = [sys.executable, '-m', 'ttq_jax.main', '--config', f'configs/lm.py:{variant}', '--workdir', workdir]
  run = lambda *extra: subprocess.run(base + list(extra), cwd=ROOT, capture_output=True, text=True, timeout=300)
  trained = run(*small)
  assert trained.returncode == 0, trained.stderr[-3000:]
  assert ' bytes/s | ' in trained.stdout and 'img/s' not in trained.stdout and 'top1' not in trained.stdout  # its words
  rows = [json.loads(l) for l in open(f'{workdir}/metrics.jsonl')]
  assert all('bytes_per_second' in r and 'images_per_second' not in r and 'train_top1_accuracy' not in r for r in rows)
  result = json.load(open(f'{workdir}/result.json'))
  rule = ({'method': 'paretoq', 'threshold': None, 'scale_granularity': 'channel'} if variant == 'paretoq' else
          {'method': 'ttq', 'threshold': 'max', 't': 0.05})
  assert json.load(open(f'{workdir}/config.json'))['model']['name'] == f'lm_decoder{"_nnx" if variant == "nnx" else ""}'
  assert len(result['layer_rules']) == 7 and all(r == rule for r in result['layer_rules'].values())
  data = f'--config.data.data_dir={text_corpus}'  # (eval may read another folder: data.data_dir is overridable)
  evaluated = run('--mode', 'eval', data)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert json.load(open(f'{workdir}/eval/step_4.json'))['bits_per_byte'] == result['bits_per_byte']
  exported = run('--mode', 'export', data)
  assert exported.returncode == 0, exported.stderr[-3000:]
  from_file = run('--mode', 'eval', data, f'--config.restore_from={workdir}/export/model.safetensors')
  assert from_file.returncode == 0, from_file.stderr[-3000:]
  ev = [json.load(open(os.path.join(workdir, 'eval', f))) for f in os.listdir(os.path.join(workdir, 'eval'))
        if f != 'step_4.json']
  assert ev and ev[0]['bits_per_byte'] == pytest.approx(result['bits_per_byte'], rel=1e-6)
  if variant == 'nnx':  # --mode sample (no --config needed): the code of the run's own samples, checkpoint or export
    from ttq_jax import sampling, workdirs
    before = sorted(os.listdir(workdir))
    given = workdirs.workdir_config(None, workdir).copy_and_resolve_references()
    given.data.data_dir, given.sample.num_bytes = text_corpus, 96
    sampled = sampling.sample_workdir(given, workdir)
    assert sampled['step'] == 4 and 'The ' + sampled['text'] == result['samples']['greedy | The ']
    printed = subprocess.run([sys.executable, '-m', 'ttq_jax.main', '--mode', 'sample', '--workdir', workdir, data,
                              f'--config.restore_from={workdir}/export/model.safetensors', '--config.sample.prompt=def ',
                              '--config.sample.temperature=0.8', '--config.sample.num_bytes=20'],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert printed.returncode == 0 and printed.stdout.startswith('def '), printed.stderr[-2000:]
    assert sorted(os.listdir(workdir)) == before  # sampling writes nothing
