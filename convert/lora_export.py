"""A LoRA run's adapters out of its checkpoints: merged into the base model as an HF folder, or as
a PEFT adapter folder that `peft.PeftModel.from_pretrained` loads onto the HF base.

The checkpoints folder holds the adapters (newest step) and `npo_jax_lora.json` (rank, alpha,
targets, and the base model's path and sha256, checked before anything is read from the base).
Merging is PEFT's `merge_and_unload`: W + alpha/rank * B @ A in float32 for each layer, then cast
to the output dtype; one base tensor at a time, as `orbax_to_hf` streams.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from convert.orbax_to_hf import export_dtype, write_hf_folder
from npo_jax.checkpoint import ParamsReader
from npo_jax.config import read_config_dict
from npo_jax.dtypes import dtype as dtype_named
from npo_jax.fs import atomic_output_dir, check_output_dir
from npo_jax.lora import PEFT_CONFIG, PEFT_WEIGHTS, RECORD, adapter_shapes, check_base, peft_name
from npo_jax.memory import trim_host_memory
from npo_jax.model_io import AdapterReader, is_hf_folder
from npo_jax.safetensors_io import HFWeights
from npo_jax.tree_paths import get_path

LORA_RECORD = RECORD


def _base_layers(base: Path, num_layers: int):
    """spec -> the base parameter's torch-layout arrays (one per layer when stacked)."""
    if is_hf_folder(base):
        weights = HFWeights(base)
        return lambda spec: [weights.read(name) for name in spec.hf_names(num_layers)]
    reader = ParamsReader(base)

    def read(spec):
        array = reader.read(spec.path)
        return [spec.to_hf(piece) for piece in (array if spec.stacked else [array])]

    return read


def _merged_tensors(specs, base_layers, adapters: dict, scale: float, out_dtype, num_layers: int):
    for spec in specs:
        pieces = base_layers(spec)
        lora = spec.stacked and spec.path[-1] == "kernel" and _has(adapters, (*spec.path[:-1], "lora_a"))
        if lora:
            a, b = get_path(adapters, (*spec.path[:-1], "lora_a")), get_path(adapters, (*spec.path[:-1], "lora_b"))
        for i, (name, piece) in enumerate(zip(spec.hf_names(num_layers), pieces, strict=True)):
            w = np.asarray(piece, np.float32)
            if lora:  # torch layout (out, in): W + scale * B @ A = W + scale * (a @ b).T
                w = w + np.float32(scale) * (a[i].astype(np.float32) @ b[i].astype(np.float32)).T
            yield name, np.ascontiguousarray(w.astype(out_dtype))
        del pieces
        trim_host_memory()


def _has(tree: dict, path) -> bool:
    try:
        get_path(tree, path)
    except KeyError:
        return False
    return True


def merged_to_hf(src: str | Path, dst: str | Path, dtype: str | None = None, tokenizer_from=None,
                 max_shard_size: str | int = "5GB", overwrite: bool = False, progress: bool = True,
                 base: str | Path | None = None) -> Path:
    """The base model with the run's adapters merged in, as an HF folder (`orbax_to_hf`'s layout)."""
    dst = check_output_dir(dst, overwrite)
    reader = AdapterReader(src)
    base_dir = check_base(reader.base_model, base, f"{src}: ")
    adapters = reader.read_all()
    raw = read_config_dict(base_dir / "config.json")
    out_name = export_dtype(reader.config, dtype)
    layers = reader.config.num_hidden_layers
    tensors = lambda specs: _merged_tensors(specs, _base_layers(base_dir, layers), adapters,  # noqa: E731
                                            reader.spec.scale, dtype_named(out_name), layers)
    return write_hf_folder(dst, raw, tensors, reader.folder, out_name, tokenizer_from, max_shard_size, overwrite,
                           progress)


def adapter_to_peft(src: str | Path, dst: str | Path, overwrite: bool = False) -> Path:
    """The run's adapters as a PEFT LoRA folder: adapter_config.json and adapter_model.safetensors
    (lora_A (rank, in), lora_B (out, rank) per layer, float32), for the recorded base model."""
    dst = check_output_dir(dst, overwrite)
    reader = AdapterReader(src)
    spec, adapters = reader.spec, reader.read_all()
    tensors = {}
    for path in adapter_shapes(reader.config, spec):
        stacked = np.asarray(get_path(adapters, path), np.float32)
        for i in range(stacked.shape[0]):
            tensors[peft_name(path, i)] = np.ascontiguousarray(stacked[i].T)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank, "lora_alpha": spec.alpha,
              "lora_dropout": spec.dropout, "target_modules": list(spec.targets), "bias": "none",
              "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "use_rslora": False,
              "use_dora": False, "modules_to_save": None, "base_model_name_or_path": reader.base_model["path"]}
    with atomic_output_dir(dst, overwrite) as tmp:
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / RECORD).write_text((reader.folder / RECORD).read_text())
    return dst
