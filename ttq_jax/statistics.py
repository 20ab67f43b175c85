"""Statistics that the result tables share: mean +- standard error over seeds, paired same-seed differences with a
two-sided paired t-test (df = n - 1), and Holm's step-down adjustment over a table's comparisons.

    d = paired({0: 2.51, 1: 2.55, 2: 2.49}, {0: 2.60, 1: 2.66, 2: 2.58}, 'ttq', 'bitnet')
    tests = holm_adjusted([d, ...])          # each gets p_holm; `verdict(test)` says 'resolved' only at p_holm < 0.05

A comparison with one seed has no test (t, p, p_holm are None) and its verdict says so; prose built on these
says "resolved" or "not resolved at this budget", never more than the adjusted test does.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

ALPHA = 0.05  # family-wise level of the Holm-adjusted tests


def mean_se(values: Sequence[float]) -> dict[str, Any]:
  """{'mean', 'std' (ddof 1), 'se' (std / sqrt n), 'n'}; std and se None for one value."""
  v = np.asarray(list(values), np.float64)
  if not v.size:
    return {'mean': None, 'std': None, 'se': None, 'n': 0}
  std = float(v.std(ddof=1)) if v.size > 1 else None
  return {'mean': float(v.mean()), 'std': std, 'se': std / math.sqrt(v.size) if std is not None else None, 'n': int(v.size)}


def t_two_sided_p(t: float, df: int) -> float:
  """Two-sided p-value of Student's t with `df` degrees of freedom (scipy's survival function)."""
  from scipy import stats  # noqa: PLC0415 - scipy comes with jax; imported when a table is built
  return float(2.0 * stats.t.sf(abs(t), df))


def paired(a: Mapping[Any, float], b: Mapping[Any, float], name_a: str = 'a', name_b: str = 'b') -> dict[str, Any] | None:
  """The same-seed differences a - b ({seed: value} each; seeds in both): {'a', 'b', 'n', 'mean', 'se', 't', 'p',
  'per_seed'}. t = mean / se with df = n - 1, p two-sided (None for n < 2, or t and p for a zero se: every
  difference equal, t infinite unless the mean is 0). None when no seed is shared."""
  seeds = [s for s in a if s in b]
  if not seeds:
    return None
  d = np.asarray([a[s] - b[s] for s in seeds], np.float64)
  n, mean = len(d), float(d.mean())
  se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else None
  if se is None:
    t = p = None
  elif se == 0:
    t, p = (0.0, 1.0) if mean == 0 else (math.copysign(math.inf, mean), 0.0)
  else:
    t = mean / se
    p = t_two_sided_p(t, n - 1)
  return {'a': name_a, 'b': name_b, 'n': n, 'mean': mean, 'se': se, 't': t, 'p': p,
          'per_seed': {str(s): float(x) for s, x in zip(seeds, d)}}


def holm(p_values: Sequence[float | None]) -> list[float | None]:
  """Holm's step-down adjusted p-values (monotone, capped at 1) over the tests that have a p (None stays None)."""
  indexed = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
  m, out, running = len(indexed), [None] * len(p_values), 0.0
  for rank, (p, i) in enumerate(indexed):
    running = max(running, min(1.0, (m - rank) * p))
    out[i] = running
  return out


def holm_adjusted(tests: Sequence[dict | None]) -> list[dict]:
  """The tests (as `paired` returns them; None dropped) with `p_holm` over all of them, in order."""
  tests = [dict(t) for t in tests if t]
  for t, adjusted in zip(tests, holm([t['p'] for t in tests])):
    t['p_holm'] = adjusted
  return tests


def verdict(test: Mapping[str, Any]) -> str:
  """'resolved' (Holm-adjusted p < 0.05), 'not resolved' or 'no test (one seed)'."""
  p = test.get('p_holm', test.get('p'))
  if p is None:
    return f'no test ({test.get("n", 0)} seed{"" if test.get("n") == 1 else "s"})'
  return 'resolved' if p < ALPHA else 'not resolved'


def mean_spread(x, digits: int = 2, scale: float = 1.0, signed: bool = False) -> str:
  """'12.34 ± 0.56': the one way tables write a mean and its spread. `x`: values (mean ± std, ddof 1; None values
  dropped) or a summary dict ({'mean', 'se'} shows the se, {'mean', 'std'} the std; `mean_se`, `paired`). One value,
  or a spread of None: the mean alone; no values: '-'. `scale` multiplies both (100: fractions as percent)."""
  if x is None:
    return '-'
  if isinstance(x, Mapping):
    mean, spread = x.get('mean'), x.get('se', x.get('std'))
  else:
    summary = mean_se([v for v in x if v is not None])
    mean, spread = summary['mean'], summary['std']
  if mean is None:
    return '-'
  text = f'{scale * mean:{"+" if signed else ""}.{digits}f}'
  return text + (f' ± {scale * spread:.{digits}f}' if spread is not None else '')


def describe(test: Mapping[str, Any], digits: int = 3) -> str:
  """'-0.165 ± 0.019 (n=3, t=-8.7, p=0.013, Holm p=0.04: resolved)' for tables and prose."""
  text = mean_spread(test, digits, signed=True)
  if test.get('p') is None:
    return text + f' (n={test["n"]}, no test)'
  holm_p = test.get('p_holm')
  return (text + f' (n={test["n"]}, t={test["t"]:.2f}, p={test["p"]:.3g}'
          + (f', Holm p={holm_p:.3g}' if holm_p is not None else '') + f': {verdict(test)})')
