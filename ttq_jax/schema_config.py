"""Every config key at its default, from `config_schema.json` (written by `configs/base.py`): what `main` parses
`--config.KEY=VALUE` overrides on when `--mode eval / export / sample` get no `--config` (the workdir's saved
config then takes those values). Light: no JAX, nothing of `configs/`."""

import json
import os

import ml_collections


def _tuples(value):
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def get_config() -> ml_collections.ConfigDict:
  with open(os.path.join(os.path.dirname(__file__), 'config_schema.json')) as f:
    schema = json.load(f)
  config = ml_collections.ConfigDict()
  for key, value in schema.items():
    *parents, leaf = key.split('.')
    node = config
    for part in parents:
      if part not in node:
        node[part] = ml_collections.ConfigDict()
      node = node[part]
    node[leaf] = _tuples(value)
  config.lock()
  return config
