"""HF <-> Orbax conversion for Llama-3.x, driven by the parameter table (`npo_jax.params`).

The two directions only; reading an HF folder into params is `npo_jax.model_io` (the core never
imports this package).
"""

from convert.hf_to_orbax import hf_to_orbax
from convert.orbax_to_hf import orbax_to_hf

__all__ = ["hf_to_orbax", "orbax_to_hf"]
