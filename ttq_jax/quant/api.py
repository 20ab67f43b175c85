"""`quantize` and `ternary_layers` for any Flax model: Linen (`rules.py`) or NNX (`nnx_rules.py`), the same rules."""

from __future__ import annotations

from typing import Sequence

from ttq_jax.quant import nnx_rules
from ttq_jax.quant import rules as linen_rules
from ttq_jax.quant.rules import Rule, TernaryLayer


def quantize(model, rules: Sequence[Rule]):
  """`model` (a Flax Linen module or an NNX module) with the layers that `rules` select made ternary by their
  methods: a Linen module class for Linen (`rules.quantize`), a copy of the model for NNX (`nnx_rules.quantize`)."""
  for r in rules:
    if not isinstance(r, Rule):
      raise TypeError(f'quantize: rules must be ttq_jax.quant.Rule, got {type(r).__name__}')
  if nnx_rules.is_nnx(model):
    return nnx_rules.quantize(model, rules)
  return linen_rules.quantize(model, rules)


def ternary_layers(model, *example_args, **example_kwargs) -> tuple[TernaryLayer, ...]:
  """Every layer whose kernel is ternary, sorted by path: traced from a Linen model's rules (with example inputs),
  read from an NNX model's layers."""
  if nnx_rules.is_nnx(model):
    return nnx_rules.ternary_layers(model)
  return linen_rules.ternary_layers(model, *example_args, **example_kwargs)
