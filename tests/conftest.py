"""Shared test settings: float32 matmuls at full precision for parity checks."""

import jax

jax.config.update("jax_default_matmul_precision", "highest")
