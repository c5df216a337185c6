"""HF Llama folder (safetensors) -> Orbax params checkpoint.

The folder is validated and read tensor by tensor (`npo_jax.model_io.read_hf_params`): each of
our (stacked) params is filled layer by layer, cast on assignment, optionally placed onto its
sharding, and written to the checkpoint before the next one is read. The torch model is never
built.
"""

from __future__ import annotations

from pathlib import Path

from npo_jax.checkpoint import save_params_checkpoint
from npo_jax.config import LlamaConfig
from npo_jax.fs import atomic_output_dir, check_output_dir
from npo_jax.model_io import read_hf_params


def hf_to_orbax(src: str | Path, dst: str | Path, dtype: str = "float32", overwrite: bool = False,
                progress: bool = True, mesh=None) -> Path:
    """Convert an HF folder into an Orbax params checkpoint folder `dst`, all or nothing.

    With a `mesh`, each tensor is placed onto its sharding (`npo_jax.sharding`) as it is read,
    so no host ever holds more than one full tensor, and Orbax writes the shards.
    """
    src, dst = Path(src), check_output_dir(dst, overwrite)
    shardings = None
    if mesh is not None:
        from npo_jax.sharding import param_shardings

        shardings = param_shardings(LlamaConfig.from_folder(src), mesh)
    _, arrays = read_hf_params(src, dtype, shardings, progress=progress)  # validates before dst is touched
    with atomic_output_dir(dst, overwrite) as tmp:
        save_params_checkpoint(tmp, arrays, src, dtype)
    return dst
