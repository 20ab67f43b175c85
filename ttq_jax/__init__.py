"""ttq_jax: Trained Ternary Quantization (Zhu et al., ICLR 2017) in JAX/Flax."""
__version__ = "0.2.0"
