"""hyperiqa_jax: HyperIQA with a Swin Transformer backbone, in JAX/Flax."""

__version__ = "0.1.0"
