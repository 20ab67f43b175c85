"""Parameter paths: one format (names joined by '/', as in the params tree: `res1_0/conv1/kernel`), one
flattener and one selection function, for every setting that applies to some parameters or layers.

    flat(params)                             # {'res1_0/conv1/kernel': array, ...}, sorted by path
    select(params, lambda path: ...)         # a tree of the answers: optimizer labels, masks
    at(params, 'res1_0/conv1')               # the subtree at a path

How a setting matches stays its own: module-path rules (`quant.Rule.module_path`) and `full_precision_layers`
match the whole path (`matches`); `weight_decay_regex` searches it (`searches`, so `(kernel|w_p|w_n)$` works).
"""

from __future__ import annotations

import re
from typing import Any, Callable

import flax
import jax
from flax import traverse_util


def path_str(key_path) -> str:
  """A JAX key path (`jax.tree_util.tree_map_with_path`'s) as the '/'-joined names."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in key_path)


def flat(tree) -> dict[str, Any]:
  """{'/'-joined path: leaf} of a nested dict, sorted by path (the one flattener of parameter trees)."""
  return {'/'.join(map(str, path)): leaf
          for path, leaf in sorted(traverse_util.flatten_dict(flax.core.unfreeze(tree)).items())}


def select(tree, answer: Callable[[str], Any]) -> Any:
  """A tree shaped like `tree` holding `answer(path)` for each leaf (the one selection function: masks, labels)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: answer(path_str(p)), tree)


def at(tree, path: str):
  """The subtree (or leaf) of `tree` at the '/'-joined `path` ('' is `tree` itself)."""
  for key in filter(None, path.split('/')):
    tree = tree[key]
  return tree


def matches(regex: str, path: str) -> bool:
  """Whether `regex` matches the whole `path` (module-path rules, `full_precision_layers`)."""
  return re.fullmatch(regex, path) is not None


def searches(regex: str, path: str) -> bool:
  """Whether `regex` matches anywhere in `path` (`weight_decay_regex`)."""
  return re.search(regex, path) is not None
