"""Reference log-probs of the forget set, computed once from the starting params and cached.

NPO's reference term log p_ref(y|x) is a fixed function of fixed data, so a second copy of the
model is not needed during training. The cache key covers the model files, the tokenized forget
set, the mask convention and the compute dtype; the values are the summed label log-probs under
the same padding, positions and mask as the training step uses.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import jax
import numpy as np

from npo_jax.data.batches import bucket_length, length_sorted_batches, pad_examples
from npo_jax.data.tokenize import Example
from npo_jax.logprobs import sequence_logprob
from npo_jax.model import merge_params, train_hidden


def _files_stamp(path: Path) -> list:
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def cache_key(model_path: str | Path, examples: list[Example], *, compute_dtype: str, eot_mask_quirk: bool) -> str:
    h = hashlib.sha256()
    model_path = Path(model_path).resolve()
    h.update(json.dumps([str(model_path), _files_stamp(model_path), compute_dtype, eot_mask_quirk]).encode())
    for ex in examples:
        h.update(ex.input_ids.tobytes())
        h.update(ex.labels.tobytes())
    return h.hexdigest()[:24]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _batch_logprob(graphdef, params, batch):
    model = merge_params(graphdef, params)
    hidden = train_hidden(model, batch["input_ids"], batch["attention_mask"])
    return sequence_logprob(model.logits, hidden, batch["labels"], positions=batch.get("label_positions"))[0]


def reference_logprobs(graphdef, params, examples: list[Example], *, buckets: list[int], pad_id: int,
                       eot_id: int | None, eot_mask_quirk: bool, batch_size: int = 16) -> np.ndarray:
    """Summed label log-prob of each example (float32), batched by length bucket."""
    out = np.zeros(len(examples), np.float32)
    for idx, filled in length_sorted_batches([len(e.input_ids) for e in examples], batch_size):
        chunk = [examples[i] for i in filled]  # fixed batch shape: one compile per bucket
        length = bucket_length(max(len(e.input_ids) for e in chunk), buckets)
        batch = pad_examples(chunk, length, pad_id, eot_id, eot_mask_quirk)
        out[idx] = np.asarray(_batch_logprob(graphdef, params, batch))[: len(idx)]
    return out


# The name train.py imports until it moves to `reference_logprobs` (`logprobs.sequence_logprob` is
# the per-batch function; this was too close to it). Remove with that import.


def cached_reference_logprobs(cache_dir: Path, key: str, compute) -> tuple[np.ndarray, bool]:
    """(values, hit): read `cache_dir/key.npy`, or compute and store it atomically."""
    path = Path(cache_dir) / f"{key}.npy"
    if path.is_file():
        return np.load(path), True
    values = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}.npy")
    np.save(tmp, values)
    os.replace(tmp, path)
    return values, False
