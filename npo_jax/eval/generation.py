"""Generation for evaluation and the audit: greedy or sampled continuations of prompts.

Two ways in: prompts of their own (`generate_ids`: sorted by length, left padded to a multiple of
`PROMPT_MULTIPLE`, fixed-size batches, so generation compiles once per width and row count), or
greedy answers decoded from the KV caches a scoring prefill left (`decode_on_prompts`: right
padded prompts, positions 0..length-1 as generation gives them), which the scheduler uses so a
scored question's prompt runs once for both.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from npo_jax.data.batches import length_sorted_batches
from npo_jax.eval.batching import part_rows, prompt_width
from npo_jax.eval.lm import LoadedLM
from npo_jax.generate import decode, finished, generate
from npo_jax.model import KVCache, merge_params


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_ids", "pad_id", "unstack"))
def greedy_on_prompts(graphdef, params, prompts, rows, lengths, wanted, *, max_new_tokens, eos_ids, pad_id,
                      unstack=True):
    """Greedy answers decoded from the prompts `rows` of `teacher_forced.prefill_prompts`' output
    (right-padded prompts of `lengths` tokens, positions 0..length-1 as generation gives them);
    rows not `wanted` stay pad."""
    cache, last_hidden, mask = prompts
    model = merge_params(graphdef, params)
    cache = KVCache(cache.k[:, rows], cache.v[:, rows])
    return decode(model, cache, mask[rows], model.logits(last_hidden[rows]), lengths, jax.random.key(0), ~wanted,
                  max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id, temperature=0.0, top_p=1.0,
                  unstack=unstack)


def decode_on_prompts(lm: LoadedLM, prompts, rows: list[int], lengths: list[int], n: int, max_new_tokens: int):
    """Dispatched greedy decoding of prompt rows `rows` of `prompts` (`prefill`'s output), whose
    prompts are `lengths` tokens long; only the first `n` rows are wanted (the rest start done)."""
    return greedy_on_prompts(lm.graphdef, lm.params, prompts, np.asarray(rows, np.int32),
                             np.asarray(lengths, np.int32), np.arange(len(rows)) < n,
                             max_new_tokens=max_new_tokens, eos_ids=lm.eos_ids, pad_id=lm.pad_id,
                             unstack=lm.unstacked_decode)


def read_decoded(result, eos_ids, n: int) -> list[np.ndarray]:
    """The first `n` rows of a dispatched decode, fetched: new tokens cut after the first eos."""
    gen = finished(*jax.device_get(result), eos_ids)
    return [gen.tokens[row, : gen.lengths[row]] for row in range(n)]


def _left_padded(lm: LoadedLM, prompts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    width = prompt_width(max(len(p) for p in prompts))
    ids = np.full((len(prompts), width), lm.pad_id, np.int32)
    mask = np.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
    if lm.eot_mask_quirk:  # open-unlearning's collator: mask = ids != pad (= eos)
        mask = (ids != lm.tokenizer.eos_token_id).astype(np.int32)
    return ids, mask


def generate_ids(lm: LoadedLM, prompts: list[np.ndarray], *, batch_size: int, max_new_tokens: int, progress=None,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[np.ndarray]:
    """New tokens per prompt (cut at eos), `batch_size` prompts at a time; a part-filled last batch
    decodes as few rows as the next power of two (a compile of its own): every decode step streams
    all weights whatever the row count. Sampled batch b uses `SeedSequence([seed, b])`."""
    answers: list[np.ndarray | None] = [None] * len(prompts)
    batches = length_sorted_batches([len(p) for p in prompts], batch_size, lambda n: part_rows(n, batch_size))
    for b, (idx, padded) in enumerate(batches):
        ids, mask = _left_padded(lm, [prompts[i] for i in padded])
        batch_seed = int(np.random.SeedSequence([seed, b]).generate_state(1)[0]) if temperature > 0 else 0
        gen = generate(lm.graphdef, lm.params, ids, mask, max_new_tokens=max_new_tokens, eos_ids=lm.eos_ids,
                       pad_id=lm.pad_id, temperature=temperature, top_p=top_p, seed=batch_seed,
                       unstack_layers=lm.unstacked_decode)
        for row, i in enumerate(idx):
            answers[i] = gen.tokens[row, : gen.lengths[row]]
        if progress is not None:
            progress.update(len(idx))
    return answers
