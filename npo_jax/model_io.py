"""Loading params from what users point `model.path` at: an HF folder or an Orbax checkpoint.

An HF Llama folder is read tensor by tensor (`npo_jax.safetensors_io`): everything is validated
against the parameter table (`npo_jax.params`) first, then each of our (stacked) params is filled
layer by layer, cast on assignment, and optionally placed onto its sharding. The torch model is
never built. `convert.hf_to_orbax` streams the same arrays into a checkpoint.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from npo_jax.checkpoint import ParamsReader
from npo_jax.config import LlamaConfig, read_config_dict
from npo_jax.dtypes import dtype as dtype_named
from npo_jax.errors import NpoJaxError
from npo_jax.lora import RECORD as LORA_RECORD
from npo_jax.lora import adapter_shapes, check_base, merge_adapters, read_record
from npo_jax.params import IGNORED_HF_SUFFIXES, param_specs, stored_shape
from npo_jax.safetensors_io import FLOAT_DTYPES, INDEX_NAME, SINGLE_NAME, HFWeights
from npo_jax.tree_paths import get_path, set_path


@dataclasses.dataclass
class LoadedModel:
    config: LlamaConfig
    raw_config: dict
    params: dict  # numpy arrays, or jax arrays on the requested shardings
    side_files_dir: Path  # where config.json, generation_config.json and tokenizer files are
    kind: str  # "hf", "orbax", or "lora" (a LoRA run's adapters merged into their base)


class AdapterReader(ParamsReader):
    """The adapters of a LoRA run's newest checkpoint step, validated against its record."""

    def __init__(self, folder: str | Path, verify: bool = True):
        record = read_record(Path(folder))
        if record is None:
            raise NpoJaxError(f"{folder}: no {LORA_RECORD}: not the checkpoints of a LoRA run")
        self.spec, self.base_model = record
        super().__init__(folder, verify)

    def _validate(self) -> None:
        expected = adapter_shapes(self.config, self.spec)
        got = {path: tuple(leaf.shape) for path, leaf in self.metadata.items()}
        if got != expected:
            raise NpoJaxError(f"{self.item_dir}: the saved adapters do not match {LORA_RECORD} (rank "
                              f"{self.spec.rank}, targets {', '.join(self.spec.targets)}) and config.json")


def is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and ((path / SINGLE_NAME).is_file() or (path / INDEX_NAME).is_file())


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
    `dtype`, filled layer by layer from the safetensors files, and placed on its sharding
    when `shardings` is given. Everything is checked before the first tensor is read.
    """
    folder = Path(folder)
    cfg = LlamaConfig.from_folder(folder)
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


def load_model(path: str | Path, shardings_for=None) -> LoadedModel:
    """Params from an HF folder (converted on the fly) or an Orbax params/training checkpoint.

    A LoRA run's checkpoints load as their base model with the adapters merged in (float32).
    `shardings_for(config)` may return a nested dict of shardings to place params on as they load.
    """
    path = Path(path)
    if not path.is_dir():
        raise NpoJaxError(f"model.path {path}: no such folder")
    if (path / LORA_RECORD).is_file():
        return load_lora_run(path, shardings_for)
    cfg = LlamaConfig.from_folder(path)
    shardings = shardings_for(cfg) if shardings_for else None
    if is_hf_folder(path):
        _, params = load_hf_params(path, "float32", shardings)
        return LoadedModel(cfg, read_config_dict(path / "config.json"), params, path, "hf")
    reader = ParamsReader(path)
    params = reader.read_all(shardings)
    return LoadedModel(cfg, reader.raw_config, params, path, "orbax")


def load_lora_run(path: Path, shardings_for=None) -> LoadedModel:
    """A LoRA run's checkpoints as a model: the recorded base (its sha256 checked) with the newest
    adapters merged in float32, as the merged export computes them, so evaluation and the audit
    read an adapter run as they read any model. Tokenizer, config and mask record: the run's."""
    reader = AdapterReader(path)
    base_dir = check_base(reader.base_model, None, f"model.path {path}: ")
    if (base_dir / LORA_RECORD).is_file():
        raise NpoJaxError(f"model.path {path}: its base {base_dir} is itself a LoRA run's checkpoints")
    base = load_model(base_dir)
    params = merge_adapters(base.params, reader.read_all(), reader.spec.scale)
    if shardings_for is not None:
        params = jax.device_put(params, shardings_for(base.config))
    return LoadedModel(base.config, base.raw_config, params, path, "lora")
