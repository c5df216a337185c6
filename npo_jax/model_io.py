"""Loading params from what users point `model.path` at: an HF folder or an Orbax checkpoint."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from convert.hf_to_orbax import load_hf_params
from convert.safetensors_io import INDEX_NAME, SINGLE_NAME
from npo_jax.checkpoint import ParamsReader
from npo_jax.config import LlamaConfig, read_config_dict
from npo_jax.errors import NpoJaxError


@dataclasses.dataclass
class LoadedModel:
    config: LlamaConfig
    raw_config: dict
    params: dict  # numpy arrays, or jax arrays on the requested shardings
    side_files_dir: Path  # where config.json, generation_config.json and tokenizer files are
    kind: str  # "hf" or "orbax"


def is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and ((path / SINGLE_NAME).is_file() or (path / INDEX_NAME).is_file())


def model_config(path: str | Path) -> LlamaConfig:
    path = Path(path)
    return LlamaConfig.from_hf_dict(read_config_dict(path / "config.json"), source=str(path / "config.json"))


def load_model(path: str | Path, shardings_for=None) -> LoadedModel:
    """Params from an HF folder (converted on the fly) or an Orbax params/training checkpoint.

    `shardings_for(config)` may return a nested dict of shardings to place params on as they load.
    """
    path = Path(path)
    if not path.is_dir():
        raise NpoJaxError(f"model.path {path}: no such folder")
    cfg = model_config(path)
    shardings = shardings_for(cfg) if shardings_for else None
    if is_hf_folder(path):
        _, params = load_hf_params(path, "float32", shardings)
        return LoadedModel(cfg, read_config_dict(path / "config.json"), params, path, "hf")
    reader = ParamsReader(path)
    params = reader.read_all(shardings)
    return LoadedModel(cfg, reader.raw_config, params, path, "orbax")
