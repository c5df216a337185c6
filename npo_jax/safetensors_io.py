"""Reading an HF folder's safetensors, tensor by tensor.

Tensor names, dtypes and shapes come from `safetensors.safe_open` (memory-mapped); the data is
read with a plain file read at the header's offsets. The format is a little-endian u64 header
length, a JSON header, then the raw bytes.

Folders written by `convert.orbax_to_hf` carry `npo_jax_checksums.json` (size and sha256 of each
weights file); `HFWeights` checks it before reading, so a damaged or truncated shard is an error
naming it rather than a wrong model. Folders without it (e.g. HF releases) load unchecked.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from npo_jax.errors import NpoJaxError
from npo_jax.fs import verify_checksums

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
FLOAT_DTYPES = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16, "F64": np.float64}
assert sys.byteorder == "little", "safetensors data is little-endian; big-endian hosts are not supported"


class HFWeights:
    """The tensors of an HF model folder: name -> (file, dtype, shape), read lazily."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        files = self._shard_files()
        self.verified = verify_checksums(self.folder)  # before safe_open: a damaged file is named as such
        self._handles = {}
        self._headers: dict[Path, tuple[int, dict]] = {}
        self.location: dict[str, Path] = {}
        for file in files:
            try:
                handle = safe_open(str(file), framework="np")
            except (SafetensorError, OSError) as e:
                raise NpoJaxError(f"{file}: not a readable safetensors file ({e})") from None
            self._handles[file] = handle
            for name in handle.keys():
                if name in self.location:
                    raise NpoJaxError(f"{file}: tensor '{name}' also appears in {self.location[name]}")
                self.location[name] = file
        if self._index_map is not None:
            for name, shard in self._index_map.items():
                if self.location.get(name) != self.folder / shard:
                    raise NpoJaxError(
                        f"{self.folder / INDEX_NAME}: maps tensor '{name}' to {shard}, which does not hold it"
                    )

    def _shard_files(self) -> list[Path]:
        index = self.folder / INDEX_NAME
        self._index_map = None
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise NpoJaxError(f"{index}: not a valid safetensors index ({e!r})") from None
            self._index_map = weight_map
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                if not (self.folder / shard).is_file():
                    raise NpoJaxError(f"{index}: points to missing shard file {self.folder / shard}")
            return [self.folder / shard for shard in shards]
        if (self.folder / SINGLE_NAME).is_file():
            return [self.folder / SINGLE_NAME]
        raise NpoJaxError(f"{self.folder}: no {SINGLE_NAME} or {INDEX_NAME} (is this an HF model folder?)")

    def names(self) -> set[str]:
        return set(self.location)

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype tag, shape) without reading the data."""
        sl = self._handles[self.location[name]].get_slice(name)
        return sl.get_dtype(), tuple(sl.get_shape())

    def read(self, name: str) -> np.ndarray:
        """One tensor, read into fresh memory with a plain file read.

        `safe_open` validated the file; reading through its memory map would leave every page
        read so far mapped into this process (resident as page cache: +6 GB for a 3B bf16
        model), so the bytes are read at the header's offsets instead.
        """
        file = self.location[name]
        header_len, entry = self._entry(file, name)
        begin, end = entry["data_offsets"]
        dtype = np.dtype(FLOAT_DTYPES.get(entry["dtype"], np.uint8))
        with open(file, "rb") as f:
            f.seek(8 + header_len + begin)
            data = np.fromfile(f, dtype=np.uint8, count=end - begin)
        if data.size != end - begin:
            raise NpoJaxError(f"{file}: tensor '{name}' is cut short ({data.size} of {end - begin} bytes)")
        return data.view(dtype).reshape(entry["shape"])

    def _entry(self, file: Path, name: str) -> tuple[int, dict]:
        if file not in self._headers:
            with open(file, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                self._headers[file] = (header_len, json.loads(f.read(header_len)))
        header_len, header = self._headers[file]
        return header_len, header[name]

