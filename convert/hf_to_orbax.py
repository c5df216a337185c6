"""HF Llama folder (safetensors) -> our param tree -> Orbax params checkpoint.

Tensor by tensor: each of our (stacked) params is filled layer by layer from memory-mapped
safetensors, cast on assignment, optionally placed onto its sharding, and written to the
checkpoint before the next one is read. The torch model is never built.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from convert.safetensors_io import FLOAT_DTYPES, HFWeights
from npo_jax.checkpoint import save_params_checkpoint
from npo_jax.config import LlamaConfig, read_config_dict
from npo_jax.dtypes import dtype as dtype_named
from npo_jax.errors import NpoJaxError
from npo_jax.fs import atomic_output_dir, check_output_dir
from npo_jax.params import IGNORED_HF_SUFFIXES, param_specs, stored_shape
from npo_jax.tree_paths import get_path, set_path


def validate_hf_tensors(weights: HFWeights, cfg: LlamaConfig) -> None:
    """Every expected tensor present with the right shape and a float dtype; nothing extra."""
    specs = param_specs(cfg)
    expected = {name: spec.hf_shape for spec in specs for name in spec.hf_names(cfg.num_hidden_layers)}
    for name, shape in expected.items():
        if name not in weights.location:
            raise NpoJaxError(f"{weights.folder}: missing tensor '{name}' (expected shape {list(shape)})")
        tag, got = weights.info(name)
        file = weights.location[name]
        if got != shape:
            raise NpoJaxError(f"{file}: tensor '{name}' has shape {list(got)}, expected {list(shape)}")
        if tag not in FLOAT_DTYPES:
            raise NpoJaxError(f"{file}: tensor '{name}' has dtype {tag}, expected a float dtype "
                              f"({', '.join(FLOAT_DTYPES)})")
    extra = sorted(n for n in weights.names() - expected.keys() if not n.endswith(IGNORED_HF_SUFFIXES))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        hint = " (config.json says tie_word_embeddings: true)" if extra[0] == "lm_head.weight" else ""
        raise NpoJaxError(f"{weights.location[extra[0]]}: unexpected tensor '{extra[0]}'{hint}{more}")


def read_hf_params(folder: str | Path, dtype: str = "float32", shardings: dict | None = None,
                   progress: bool = False):
    """Validate an HF Llama folder, then stream our params from it.

    Returns (config, iterator of (path, array)): each array is one of our (stacked) params in
    `dtype`, filled layer by layer from memory-mapped safetensors, and placed on its sharding
    when `shardings` is given. Everything is checked before the first tensor is read.
    """
    folder = Path(folder)
    cfg = LlamaConfig.from_hf_dict(read_config_dict(folder / "config.json"), source=str(folder / "config.json"))
    weights = HFWeights(folder)
    validate_hf_tensors(weights, cfg)
    target = dtype_named(dtype, "--dtype")

    def arrays():
        for spec in tqdm(param_specs(cfg), desc="hf -> params", unit="tensor", disable=not progress):
            array = np.empty(stored_shape(spec, cfg), target)
            if spec.stacked:
                for i, name in enumerate(spec.hf_names(cfg.num_hidden_layers)):
                    array[i] = spec.from_hf(weights.read(name))
            else:
                array[...] = spec.from_hf(weights.read(spec.hf_name))
            if shardings is not None:
                array = jax.device_put(array, get_path(shardings, spec.path))
            yield spec.path, array

    return cfg, arrays()


def load_hf_params(folder: str | Path, dtype: str = "float32", shardings: dict | None = None,
                   progress: bool = False) -> tuple[LlamaConfig, dict]:
    """Read an HF Llama folder into our nested param dict (numpy, or jax arrays on `shardings`)."""
    cfg, arrays = read_hf_params(folder, dtype, shardings, progress)
    params: dict = {}
    for path, array in arrays:
        set_path(params, path, array)
    return cfg, params


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

        cfg = LlamaConfig.from_hf_dict(read_config_dict(src / "config.json"), source=str(src / "config.json"))
        shardings = param_shardings(cfg, mesh)
    _, arrays = read_hf_params(src, dtype, shardings, progress=progress)  # validates before dst is touched
    with atomic_output_dir(dst, overwrite) as tmp:
        save_params_checkpoint(tmp, arrays, src, dtype)
    return dst
