"""The config type, and every config key at its default.

`Config`: the `ml_collections.ConfigDict` every config is (configs/base.py, a workdir's saved config), whose unknown
keys are one-line errors naming close matches, in Python as on the command line (ml_collections' own message
lists every field of the config). `get_config`: every key at its default, from `config_schema.json` (written by
`configs/base.py`): what `main` parses `--config.KEY=VALUE` overrides on when `--mode eval / export / sample` get
no `--config` (the workdir's saved config then takes those values). Light: no JAX, nothing of `configs/`.
"""

import difflib
import json
import os

import ml_collections


class Config(ml_collections.ConfigDict):
  """A ConfigDict whose unknown keys (set on a locked config, or read) raise one line naming close matches."""

  def _unknown(self, key) -> str:
    close = difflib.get_close_matches(str(key), [str(k) for k in self._fields], n=3)
    return (f'config key {key!r} is unknown' + (f': did you mean {", ".join(close)}?' if close else
                                                 ' (configs/base.py lists every key)'))

  def __setitem__(self, key, value):
    if self.is_locked and key not in self._fields:
      raise KeyError(self._unknown(key))
    super().__setitem__(key, value)

  def __setattr__(self, attribute, value):
    if not attribute.startswith('_') and self.is_locked and attribute not in self._fields:
      raise AttributeError(self._unknown(attribute))
    super().__setattr__(attribute, value)

  def __getattr__(self, attribute):
    if attribute.startswith('_') or attribute in self._fields:
      return super().__getattr__(attribute)
    raise AttributeError(self._unknown(attribute))


def nested(flat: dict) -> Config:
  """{dotted key: value} as a (not yet locked) `Config` of `Config`s."""
  config = Config()
  for key, value in flat.items():
    *parents, leaf = key.split('.')
    node = config
    for part in parents:
      if part not in node:
        node[part] = Config()
      node = node[part]
    node[leaf] = as_tuples(value)
  return config


def as_tuples(value):
  """JSON lists back to the tuples every sequence-valued config key holds."""
  return tuple(as_tuples(v) for v in value) if isinstance(value, list) else value


def get_config() -> ml_collections.ConfigDict:
  with open(os.path.join(os.path.dirname(__file__), 'config_schema.json')) as f:
    schema = json.load(f)
  config = nested(schema)
  config.lock()
  return config
