"""Writing a safetensors shard as a stream (`convert.orbax_to_hf`).

Each tensor's bytes go straight to the file: `safetensors.numpy.save_file` needs a whole shard in
memory at once, which for a 5 GB shard would dominate peak memory. The format is a little-endian
u64 header length, a JSON header, then the raw bytes; files written here are read back by
`safe_open` (`npo_jax.safetensors_io`) and by transformers in the tests. Each file is hashed as it
is written, for the folder's `npo_jax_checksums.json`.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np

from npo_jax.errors import NpoJaxError
from npo_jax.safetensors_io import FLOAT_DTYPES

_DTYPE_TAGS = {np.dtype(v): k for k, v in FLOAT_DTYPES.items()}


def dtype_tag(dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype not in _DTYPE_TAGS:
        raise NpoJaxError(f"cannot write dtype {dtype} to safetensors (supported: float32, bfloat16, float16)")
    return _DTYPE_TAGS[dtype]


class SafetensorsWriter:
    """Writes one safetensors file whose tensor list (names, dtypes, shapes) is known up front."""

    def __init__(self, path: Path, entries: list[tuple[str, np.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        header: dict = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        self._expected = []
        for name, dtype, shape in entries:
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            header[name] = {"dtype": dtype_tag(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._expected.append((name, np.dtype(dtype), tuple(shape)))
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
        self._file = open(path, "wb")
        self._hash, self.size = hashlib.sha256(), 0
        self._put(struct.pack("<Q", len(blob)) + blob)
        self._next = 0
        self.path = path

    def _put(self, data) -> None:
        self._file.write(data)
        self._hash.update(data)
        self.size += len(data)

    def write(self, name: str, array: np.ndarray) -> None:
        exp_name, exp_dtype, exp_shape = self._expected[self._next]
        if (name, array.dtype, array.shape) != (exp_name, exp_dtype, exp_shape):
            got = (name, array.dtype, array.shape)
            raise AssertionError(f"writer expected {(exp_name, exp_dtype, exp_shape)}, got {got}")
        # A uint8 view of the contiguous array: its bytes go to disk without another copy.
        self._put(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        self._next += 1

    def close(self) -> dict:
        """Close the file; return its {"size", "sha256"} for the folder's checksum manifest."""
        if self._next != len(self._expected):
            raise AssertionError(f"{self.path}: {len(self._expected) - self._next} tensors were not written")
        self._file.close()
        return {"size": self.size, "sha256": self._hash.hexdigest()}
