"""Orbax params (params or training checkpoint) -> HF folder transformers loads as is.

One stacked parameter is restored at a time (Orbax partial restore), each layer slice is cast,
transposed back to torch's (out, in) and streamed into the current shard, so peak memory is
about one stacked parameter plus one layer slice, whatever the model size.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from tqdm import tqdm

from convert.safetensors_writer import SafetensorsWriter
from npo_jax.checkpoint import TOKENIZER_FILES, ParamsReader, copy_side_files
from npo_jax.config import LlamaConfig, with_dtype
from npo_jax.dtypes import dtype as dtype_named
from npo_jax.errors import NpoJaxError
from npo_jax.fs import atomic_output_dir, check_output_dir, file_checksum, write_checksums
from npo_jax.mask_convention import copy_record
from npo_jax.memory import trim_host_memory
from npo_jax.params import param_specs
from npo_jax.safetensors_io import INDEX_NAME

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9 bytes (decimal units as HF's max_shard_size; KiB/MiB/GiB binary)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise NpoJaxError(f"--max-shard-size: cannot read {text!r} (e.g. 5GB, 500MB, 2GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _plan_shards(entries: list[tuple[str, np.dtype, tuple[int, ...]]], max_bytes: int) -> list[list]:
    """Greedy packing in order, as HF does: a new shard when the next tensor would overflow."""
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        nbytes = int(np.prod(entry[2], dtype=np.int64)) * entry[1].itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def _generation_config(raw: dict) -> dict:
    out = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if raw.get(key) is not None:
            out[key] = raw[key]
    return out


def _hf_tensors(reader: ParamsReader, specs, out_dtype):
    """(HF name, torch-layout tensor) in export order, restoring one stacked parameter at a time."""
    layers = reader.config.num_hidden_layers
    for spec in specs:
        array = reader.read(spec.path)
        pieces = array if spec.stacked else [array]
        for name, piece in zip(spec.hf_names(layers), pieces, strict=True):
            yield name, np.ascontiguousarray(spec.to_hf(piece).astype(out_dtype))
        del array, pieces
        trim_host_memory()


def orbax_to_hf(src: str | Path, dst: str | Path, dtype: str | None = None,
                tokenizer_from: str | Path | None = None, max_shard_size: str | int = "5GB",
                overwrite: bool = False, progress: bool = True) -> Path:
    """Export the params of checkpoint `src` as an HF Llama folder `dst`, all or nothing.

    The weights files' sizes and sha256 go to `npo_jax_checksums.json`, checked when loaded here.
    A LoRA run's checkpoints (adapters only) export merged into their base (`convert.lora_export`).
    """
    from convert.lora_export import LORA_RECORD, merged_to_hf

    if (Path(src) / LORA_RECORD).is_file():
        return merged_to_hf(src, dst, dtype, tokenizer_from, max_shard_size, overwrite, progress)
    dst = check_output_dir(dst, overwrite)
    reader = ParamsReader(src)
    out_name = export_dtype(reader.config, dtype)
    return write_hf_folder(dst, reader.raw_config, lambda specs: _hf_tensors(reader, specs, dtype_named(out_name)),
                           reader.folder, out_name, tokenizer_from, max_shard_size, overwrite, progress)


def export_dtype(cfg, dtype: str | None) -> str:
    """The requested dtype, else the source model's, else bfloat16."""
    return dtype or (cfg.dtype if cfg.dtype in ("float32", "bfloat16", "float16") else "bfloat16")


def write_hf_folder(dst: Path, raw_config: dict, tensors_for, side_dir: Path, out_name: str,
                    tokenizer_from: str | Path | None, max_shard_size: str | int, overwrite: bool,
                    progress: bool) -> Path:
    """Write an HF folder from `tensors_for(specs)`: (HF name, torch-layout array) in the specs'
    order; config.json (dtype set), generation config, tokenizer and mask record from `side_dir`."""
    cfg = LlamaConfig.from_hf_dict(raw_config)
    out_dtype = dtype_named(out_name, "--dtype")
    tok_src = Path(tokenizer_from) if tokenizer_from else side_dir
    if tokenizer_from and not any((tok_src / f).is_file() for f in TOKENIZER_FILES):
        names = ", ".join(TOKENIZER_FILES[:3])
        raise NpoJaxError(f"--tokenizer-from {tok_src}: no tokenizer files there ({names}, ...)")

    specs = param_specs(cfg)
    entries = [(name, out_dtype, spec.hf_shape) for spec in specs for name in spec.hf_names(cfg.num_hidden_layers)]
    shards = _plan_shards(entries, parse_size(max_shard_size))
    n = len(shards)
    shard_names = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]

    with atomic_output_dir(dst, overwrite) as tmp:
        weight_map, total, checksums = {}, 0, {}
        tensors = tensors_for(specs)
        bar = tqdm(total=len(entries), desc="params -> hf", unit="tensor", disable=not progress)
        for shard_name, shard_entries in zip(shard_names, shards, strict=True):
            writer = SafetensorsWriter(tmp / shard_name, shard_entries)
            for _ in shard_entries:
                name, tensor = next(tensors)
                writer.write(name, tensor)
                weight_map[name] = shard_name
                total += tensor.nbytes
                bar.update()
            checksums[shard_name] = writer.close()
        bar.close()
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        write_checksums(tmp, {**checksums, INDEX_NAME: file_checksum(tmp / INDEX_NAME)})
        (tmp / "config.json").write_text(json.dumps(with_dtype(raw_config, out_name), indent=2) + "\n")
        if not copy_side_files(side_dir, tmp, ("generation_config.json",)):
            generation = _generation_config(raw_config)
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        copy_side_files(tok_src, tmp, TOKENIZER_FILES)
        copy_record(side_dir, tmp)  # the mask convention the model was trained with
    return dst
