"""Ternary quantization (TTQ, Zhu et al. ICLR 2017; TWN, Li & Liu 2016; BitNet b1.58, Ma et al. 2024; ParetoQ, Liu
et al. 2025): the maths, the method and threshold tables, the ternary weight type, `quantize(model, rules)` for any
Flax model, reports."""

from ttq_jax.quant import nnx_rules  # noqa: F401  (quantize for NNX models: `quant.nnx_rules.params`, ...)

from ttq_jax.quant._ternary import absmax_int8
from ttq_jax.quant._ternary import bitnet_ternarize
from ttq_jax.quant._ternary import delta_from_max
from ttq_jax.quant._ternary import delta_from_mean
from ttq_jax.quant._ternary import delta_from_sparsity
from ttq_jax.quant._paretoq import paretoq_bwd
from ttq_jax.quant._paretoq import paretoq_fwd
from ttq_jax.quant._paretoq import paretoq_ternarize
from ttq_jax.quant._ternary import sum_to_shape
from ttq_jax.quant._ternary import ternarize
from ttq_jax.quant._ternary import ternarize_bwd
from ttq_jax.quant._ternary import ternarize_fwd
from ttq_jax.quant._ternary import twn_scale
from ttq_jax.quant._ternary import twn_ternarize
from ttq_jax.quant._ternary import twn_threshold_and_scale
from ttq_jax.quant.config import QuantConfig
from ttq_jax.quant.config import SCALE_GRANULARITIES
from ttq_jax.quant.methods import ACTIVATIONS
from ttq_jax.quant.methods import Method
from ttq_jax.quant.methods import METHODS
from ttq_jax.quant.methods import SCALE_INITS
from ttq_jax.quant.methods import scale_params
from ttq_jax.quant.methods import Threshold
from ttq_jax.quant.methods import THRESHOLDS
from ttq_jax.quant.report import count_params
from ttq_jax.quant.report import flip_rates
from ttq_jax.quant.report import near_threshold
from ttq_jax.quant.report import layer_reports
from ttq_jax.quant.report import LayerReport
from ttq_jax.quant.report import layer_scales
from ttq_jax.quant.report import layer_rules
from ttq_jax.quant.report import layer_sparsity
from ttq_jax.quant.report import rule_settings
from ttq_jax.quant.report import ternary_kernels
from ttq_jax.quant.report import ternary_weights
from ttq_jax.quant.rules import activation_modes
from ttq_jax.quant.rules import Rule
from ttq_jax.quant.api import quantize
from ttq_jax.quant.rules import selected_layers
from ttq_jax.quant.api import ternary_layers
from ttq_jax.quant.rules import TernaryLayer
from ttq_jax.quant.rules import unquantized
from ttq_jax.quant.rules import with_activation_modes
from ttq_jax.quant.weights import TernaryWeights
from ttq_jax.quant.weights import threshold
