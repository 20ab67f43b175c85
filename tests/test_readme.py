"""Every Python block of README.md runs as written (or is marked `<!-- sketch -->` on the line before it and
is only compiled), with the project's Python, from a folder outside the checkout: what a user pastes works."""

import os
import re
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT

SKETCH = '<!-- sketch -->'
# What the runnable blocks print, checked by value: the notebook block's ternary steps (12 steps, 6 of them the
# FP warm-up), its checkpoint's step, and the quantizer on w = [-1, -0.2, 0.01, 0.3, 0.9] with delta = 0.05 * 1.
PRINTED = ('6 12 [-0.5 -0.5  0.   1.5  1.5]',
           'export scores eval: True',  # the export's predictor on raw test images: `--mode eval`'s accuracy
           "['blocks/0'] (32,) True")  # the NNX block: its ternary layer, per-channel w_p gradients, the export's
                                      # accuracy from the raw test images equal to training's


def python_blocks() -> list[tuple[int, str, bool]]:
  """(line number, code, is a sketch) of every ```python block of README.md."""
  text = open(os.path.join(ROOT, 'README.md')).read()
  out = []
  for m in re.finditer(r'```python\n(.*?)```', text, re.S):
    line = text[:m.start()].count('\n') + 1
    before = text[:m.start()].rstrip('\n').rsplit('\n', 1)[-1].strip()
    out.append((line, m.group(1), before == SKETCH))
  return out


def test_every_block_compiles():
  blocks = python_blocks()
  assert len(blocks) >= 2
  for line, code, _ in blocks:
    compile(code, f'README.md:{line}', 'exec')


@pytest.mark.slow
def test_runnable_blocks_run_outside_the_checkout(tmp_path):
  """One process (JAX starts once), each block in a fresh namespace, in a folder outside the checkout, with
  nothing of the checkout on the path: `from configs import ...` must come from the installed package."""
  runnable = [(line, code) for line, code, sketch in python_blocks() if not sketch]
  assert runnable
  driver = tmp_path / 'run_readme.py'
  driver.write_text(textwrap.dedent('''
      import sys
      blocks = %r
      for line, code in blocks:
        print(f'--- README.md:{line}', flush=True)
        exec(compile(code, f'README.md:{line}', 'exec'), {'__name__': '__main__'})
      print('all blocks ran')
  ''') % runnable)
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  p = subprocess.run([sys.executable, str(driver)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0 and 'all blocks ran' in p.stdout, p.stdout[-3000:] + p.stderr[-5000:]
  lines = [line.strip() for line in p.stdout.splitlines()]
  for printed in PRINTED:
    assert printed in lines, (printed, p.stdout[-3000:])
