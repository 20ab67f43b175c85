"""The results tables' kit (`experiments/`): run a table's run or reuse its finished result, the paired tests of a
table, its results JSON with the markdown beside it, and its README block.

Each generated table stands in README.md between `<!-- NAME:start -->` and `<!-- NAME:end -->`, and a test compares
the block with the table its results file makes. Means and spreads are written by `statistics.mean_spread`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import time
from typing import Iterable, Mapping, Sequence

from ttq_jax import errors
from ttq_jax import statistics
from ttq_jax import train

RESULT = 'result.json'
RUN_LOG = 'run.log'


def run_or_reuse(workdir: str, *, config=None, command: Sequence[str] | None = None, cwd: str | None = None,
                 quiet: bool = False, collect_only: bool = False, label: str = '', log=print) -> dict | None:
  """A run's result.json: re-read when the run finished; else trained, resuming whatever WORKDIR holds.

  `config`: trained in this process (`train.train_and_evaluate`; its console goes to WORKDIR/run.log when `quiet`);
  `command`: as a subprocess (argv, run in `cwd`; output appended to WORKDIR/run.log). A failed run raises
  RuntimeError naming the run (`label`, else the workdir) and the last line of its log. `collect_only`: None for an unfinished run.
  A run that trains is announced through `log` ('[run ] LABEL in WORKDIR', then '[done] LABEL in N min').
  """
  path = os.path.join(workdir, RESULT)
  if not os.path.exists(path):
    if collect_only:
      return None
    if (config is None) == (command is None):
      raise ValueError('run_or_reuse: give config= (this process) or command= (a subprocess), not both or neither')
    os.makedirs(workdir, exist_ok=True)
    log_path = os.path.join(workdir, RUN_LOG)
    log(f'[run ] {label or workdir} in {workdir}')
    started = time.perf_counter()
    if command is not None:
      env = {**os.environ, 'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'}  # processes may share one accelerator
      with open(log_path, 'a') as out:
        p = subprocess.run(list(command), cwd=cwd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
      if p.returncode:
        tail = (open(log_path).read().strip().splitlines() or ['?'])[-1]
        raise RuntimeError(f'{label or workdir}: exit {p.returncode}: {tail} (log: {log_path})')
    else:
      _train_in_process(config, workdir, log_path if quiet else None, label)
    log(f'[done] {label or workdir} in {(time.perf_counter() - started) / 60:.1f} min')
  with open(path) as f:
    return json.load(f)


def _train_in_process(config, workdir: str, log_path: str | None, label: str) -> None:
  if log_path is None:
    train.train_and_evaluate(config, workdir)
    return
  with open(log_path, 'a') as out, contextlib.redirect_stdout(out):  # progress, logging, the final table
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter('%(asctime)s %(module)s.py:%(lineno)d] %(message)s'))
    logging.getLogger().addHandler(handler)
    try:
      train.train_and_evaluate(config, workdir)
    except errors.USER_ERRORS as e:
      raise RuntimeError(f'{label or workdir}: {e} (log: {log_path})') from e
    finally:
      logging.getLogger().removeHandler(handler)


def paired_tests(by_seed: Mapping[str, Mapping], comparisons: Iterable[tuple[str, str]]) -> list[dict]:
  """The same-seed differences a - b of `comparisons` ({row: {seed: value}}; a pair with a row absent is left
  out), each a two-sided paired t (`statistics.paired`), Holm-adjusted over all of them together."""
  tests = [statistics.paired(by_seed[a], by_seed[b], a, b) for a, b in comparisons if a in by_seed and b in by_seed]
  return statistics.holm_adjusted(tests)


def write_results(path: str, data: dict, markdown: str | None = None, indent: int = 1) -> None:
  """The results JSON at `path` and, given, its markdown beside it (`.md`)."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path, 'w') as f:
    json.dump(data, f, indent=indent)
  if markdown is not None:
    with open(os.path.splitext(path)[0] + '.md', 'w') as f:
      f.write(markdown.rstrip('\n') + '\n')


def markers(name: str) -> tuple[str, str]:
  return f'<!-- {name}:start -->', f'<!-- {name}:end -->'


def readme_block(readme: str, name: str) -> str:
  """The generated table `name` as it stands in `readme` (between its markers)."""
  start, end = markers(name)
  return readme[readme.index(start) + len(start):readme.index(end)].strip('\n')


def with_readme_block(readme: str, name: str, body: str) -> str:
  """`readme` with the block `name` replaced by `body`."""
  start, end = markers(name)
  return readme[:readme.index(start) + len(start)] + '\n' + body.strip('\n') + '\n' + readme[readme.index(end):]


def update_readme(readme_path: str, name: str, body: str) -> None:
  """Rewrites the block `name` of the README at `readme_path` with `body`."""
  with open(readme_path) as f:
    readme = f.read()
  with open(readme_path, 'w') as f:
    f.write(with_readme_block(readme, name, body))
