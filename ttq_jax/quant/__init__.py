"""Ternary quantization (TTQ, Zhu et al. ICLR 2017; TWN, Li & Liu 2016; BitNet b1.58, Ma et al. 2024): the maths,
the method and threshold tables, the ternary weight type, `quantize(model, rules)` for any Flax model, reports."""

from ttq_jax.quant._ternary import absmax_int8
from ttq_jax.quant._ternary import bitnet_ternarize
from ttq_jax.quant._ternary import delta_from_max
from ttq_jax.quant._ternary import delta_from_mean
from ttq_jax.quant._ternary import delta_from_sparsity
from ttq_jax.quant._ternary import sum_to_shape
from ttq_jax.quant._ternary import ternarize
from ttq_jax.quant._ternary import ternarize_bwd
from ttq_jax.quant._ternary import ternarize_fwd
from ttq_jax.quant._ternary import twn_scale
from ttq_jax.quant._ternary import twn_ternarize
from ttq_jax.quant._ternary import twn_threshold_and_scale
from ttq_jax.quant.config import QuantConfig
from ttq_jax.quant.methods import ACTIVATIONS
from ttq_jax.quant.methods import Method
from ttq_jax.quant.methods import METHODS
from ttq_jax.quant.methods import Threshold
from ttq_jax.quant.methods import THRESHOLDS
from ttq_jax.quant.report import count_params
from ttq_jax.quant.report import layer_scales
from ttq_jax.quant.report import layer_rules
from ttq_jax.quant.report import layer_sparsity
from ttq_jax.quant.report import rule_settings
from ttq_jax.quant.report import ternary_kernels
from ttq_jax.quant.report import ternary_weights
from ttq_jax.quant.rules import activation_modes
from ttq_jax.quant.rules import Rule
from ttq_jax.quant.rules import quantize
from ttq_jax.quant.rules import selected_layers
from ttq_jax.quant.rules import ternary_layers
from ttq_jax.quant.rules import TernaryLayer
from ttq_jax.quant.rules import unquantized
from ttq_jax.quant.rules import with_activation_modes
from ttq_jax.quant.weights import TernaryWeights
from ttq_jax.quant.weights import threshold
