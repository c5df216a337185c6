"""HF <-> Orbax conversion for Llama-3.x, driven by the parameter table (`npo_jax.params`)."""

from convert.hf_to_orbax import hf_to_orbax, load_hf_params
from convert.orbax_to_hf import orbax_to_hf

__all__ = ["hf_to_orbax", "load_hf_params", "orbax_to_hf"]
