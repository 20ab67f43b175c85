"""What a results file records about how it was made: the git commit and whether the tree was clean, the command,
each run's config (and its SHA-256), wall times, the host. Used by the experiment tables (`experiments/`)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
from typing import Any


RESULTS_DIR = 'experiments/results/'  # what runs write: a change there leaves the code as committed


def git_state(root: str) -> dict[str, Any]:
  """{'commit': HEAD's sha (None outside a git checkout), 'clean': no tracked file outside experiments/results/
  differs from HEAD (the tables there are rewritten while their runs go on)}."""
  def git(*args):
    return subprocess.run(['git', '-C', root, *args], capture_output=True, text=True, timeout=30)
  head = git('rev-parse', 'HEAD')
  if head.returncode:
    return {'commit': None, 'clean': None}
  status = git('status', '--porcelain', '--untracked-files=no')
  changed = [line[3:] for line in status.stdout.splitlines() if line.strip()]
  return {'commit': head.stdout.strip(),
          'clean': status.returncode == 0 and not [p for p in changed if not p.startswith(RESULTS_DIR)]}


def command() -> str:
  """The command line of this process, as a shell would take it."""
  return ' '.join(shlex.quote(a) for a in [os.path.basename(sys.executable)] + sys.argv)


def config_record(config) -> dict[str, Any]:
  """{'config': the config as JSON, 'sha256': of its canonical JSON}: what a run was trained with."""
  as_json = json.loads(config.to_json_best_effort()) if hasattr(config, 'to_json_best_effort') else dict(config)
  digest = hashlib.sha256(json.dumps(as_json, sort_keys=True).encode()).hexdigest()
  return {'config': as_json, 'sha256': digest}


def machine() -> dict[str, Any]:
  import jax  # noqa: PLC0415
  return {'cpu_count': os.cpu_count(), 'processor': platform.processor() or platform.machine(),
          'backend': jax.default_backend(), 'device': str(jax.devices()[0].device_kind), 'jax': jax.__version__}


def record(root: str) -> dict[str, Any]:
  """The provenance of a results file written now: git state, command, machine."""
  return {**git_state(root), 'command': command(), 'machine': machine()}
