r"""Builds experiments/threshold_ablation.ipynb from its jupytext twin and executes it.

    TTQ_BUDGET=full python experiments/run_notebook.py            # writes the notebook with outputs
    TTQ_BUDGET=smoke python experiments/run_notebook.py --no-save  # what CI runs (tests/test_notebook.py)
"""

import argparse
import os
import sys
import time

import jupytext
import nbclient

HERE = os.path.dirname(os.path.abspath(__file__))


def execute(py_path: str, timeout: int = 3600):
  nb = jupytext.read(py_path)
  nb.metadata.setdefault('kernelspec', {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'})
  client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name='python3',
                                   resources={'metadata': {'path': HERE}})
  client.execute()
  return nb


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--no-save', action='store_true')
  p.add_argument('--timeout', type=int, default=3600)
  args = p.parse_args()
  t = time.time()
  nb = execute(os.path.join(HERE, 'threshold_ablation.py'), args.timeout)
  print(f'executed with TTQ_BUDGET={os.environ.get("TTQ_BUDGET", "smoke")} in {time.time() - t:.0f} s')
  if not args.no_save:
    out = os.path.join(HERE, 'threshold_ablation.ipynb')
    jupytext.write(nb, out)
    print(f'wrote {out}')


if __name__ == '__main__':
  sys.exit(main())
