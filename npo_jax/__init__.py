"""npo-jax: NPO unlearning for Llama-3.x on TOFU, in JAX/Flax."""

__version__ = "0.1.0"
