"""The package's layout stays as its architecture says: no import circle (function-level imports included), no
import of our own modules inside a function but in main.py, no module over 350 lines, `train_and_evaluate` under
80 lines, readers' names and encodings tested in the reader table only, experiments without `sys.path` edits."""

import ast
import os
import re

import pytest

from tests.conftest import ROOT

PACKAGE = os.path.join(ROOT, 'ttq_jax')
MAX_MODULE_LINES = 350


def _modules() -> dict[str, str]:
  """{dotted module name: path} of ttq_jax."""
  out = {}
  for folder, _, names in os.walk(PACKAGE):
    for name in names:
      if name.endswith('.py'):
        path = os.path.join(folder, name)
        dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.').removesuffix('.__init__')
        out[dotted] = path
  return out


def _imports(tree: ast.AST, modules) -> set[str]:
  """Our modules that `tree` imports (`from ttq_jax import x` counts as ttq_jax.x)."""
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name in modules}
    elif isinstance(node, ast.ImportFrom) and node.module:
      found |= {m for m in [node.module, *(f'{node.module}.{a.name}' for a in node.names)] if m in modules}
  return found


def import_graph() -> dict[str, set[str]]:
  """Module -> the modules it imports, at any level; a package's own `__init__` is left out as a target of its
  submodules (importing `ttq_jax.quant.x` runs `ttq_jax.quant` first by Python's rules, not by our choice)."""
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    deps = _imports(ast.parse(open(path).read()), modules) - {name}
    graph[name] = {d for d in deps if not name.startswith(d + '.')}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state, stack = {}, []

  def visit(u):
    state[u] = 'open'
    stack.append(u)
    for v in sorted(graph.get(u, ())):
      if state.get(v) == 'open':
        return stack[stack.index(v):] + [v]
      if v not in state and (found := visit(v)):
        return found
    stack.pop()
    state[u] = 'done'
    return None

  for u in sorted(graph):
    if u not in state and (found := visit(u)):
      return found
  return None


def test_find_cycle_finds_one_and_only_one():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': set()}) is None
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']


def test_the_import_graph_has_no_circle():
  assert find_cycle(import_graph()) is None


def test_no_module_but_main_imports_our_modules_inside_a_function():
  modules = _modules()
  inner = []
  for name, path in modules.items():
    if name == 'ttq_jax.main':
      continue
    for fn in ast.walk(ast.parse(open(path).read())):
      if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        inner += [f'{name}.{fn.name}: {m}' for m in _imports(fn, modules)]
  assert not inner


def test_module_and_function_sizes():
  sizes = {name: sum(1 for _ in open(path)) for name, path in _modules().items()}
  assert {n: s for n, s in sizes.items() if s > MAX_MODULE_LINES} == {}
  (fn,) = [n for n in ast.walk(ast.parse(open(os.path.join(PACKAGE, 'train.py')).read()))
           if isinstance(n, ast.FunctionDef) and n.name == 'train_and_evaluate']
  assert fn.end_lineno - fn.lineno + 1 < 80


@pytest.mark.parametrize('pattern, allowed, folder', [
    (r'reader *(==|!=)|\.encoded', {'readers.py'}, 'ttq_jax'),  # readers are a table
    (r'sys\.path', set(), 'experiments'),                        # experiments import the installed package
])
def test_a_pattern_stays_where_it_belongs(pattern, allowed, folder):
  hits = []
  for dirpath, _, names in os.walk(os.path.join(ROOT, folder)):
    for name in names:
      if name.endswith('.py') and name not in allowed:
        text = open(os.path.join(dirpath, name)).read()
        hits += [f'{name}: {m.group(0)}' for m in re.finditer(pattern, text)]
  assert not hits
