"""Batched generation with a KV cache: one jit-compiled prefill plus a `while_loop` decode.

Prompts are left padded. Positions follow the attention mask (`cumsum - 1`) as HF's `generate`
does, so a padded prompt produces the same tokens as the unpadded one. Finished rows (any of
the config's eos ids) are filled with `pad_id`, and the loop stops once every row is done.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from npo_jax.logprobs import first_argmax
from npo_jax.model import KVCache, merge_params


class Generation(NamedTuple):
    tokens: np.ndarray  # (batch, max_new_tokens), pad_id after a row finished
    lengths: np.ndarray  # generated tokens per row, the eos included
    steps: int  # decode steps taken (HF's output would have this many new columns)


def sample_next(logits, rng, temperature: float, top_p: float):
    """Greedy when temperature == 0, else temperature + nucleus (top-p) sampling."""
    if temperature == 0.0:
        return first_argmax(logits)
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        cutoff_index = jnp.sum(mass_before < top_p, axis=-1, keepdims=True) - 1
        threshold = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1)


def decode(model, cache: KVCache, mask, logits, positions, rng, done, *, max_new_tokens, eos_ids, pad_id,
           temperature, top_p, unstack: bool = True):
    """The decode loop after a prefill: `cache` (stacked) holds the prompts in its slots, `mask`
    (b, slots) marks their real ones (left or right padded alike), `logits` (b, vocab) predict
    each row's first new token, which gets position `positions` (b,). Rows `done` from the start
    only produce `pad_id` (and do not keep the loop going). Returns (tokens (b, max_new), steps).

    `unstack` copies the layers' weights out of the stack once, before the loop (faster steps);
    without it each step reads them from the stack (no copy: what a host holding a 3B model in
    float32 next to little free memory wants)."""
    b, p = mask.shape
    cache = KVCache(*(jnp.concatenate([c, jnp.zeros((*c.shape[:3], max_new_tokens, c.shape[4]), c.dtype)], axis=3)
                      for c in cache))
    cache = cache.unstacked() if unstack else cache
    mask = jnp.concatenate([mask, jnp.zeros((b, max_new_tokens), mask.dtype)], axis=1)
    layers = model.unstacked_layers() if unstack else None
    eos = jnp.asarray(eos_ids, jnp.int32)

    def cond(state):
        i, _, _, _, done, _, _, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, logits, cache, mask, done, out, pos, rng = state
        rng, step_rng = jax.random.split(rng)
        tok = sample_next(logits, step_rng, temperature, top_p).astype(jnp.int32)
        tok = jnp.where(done, pad_id, tok)
        out = out.at[:, i].set(tok)
        done = done | jnp.isin(tok, eos)
        mask = mask.at[:, p + i].set(1)
        h, cache = model.hidden_states(tok[:, None], mask, pos[:, None], cache, cache_index=p + i, layers=layers)
        return i + 1, model.logits(h[:, -1]), cache, mask, done, out, pos + 1, rng

    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
    state = (jnp.int32(0), logits, cache, mask, done, out, positions, rng)
    steps, _, _, _, _, out, _, _ = jax.lax.while_loop(cond, body, state)
    return out, steps


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_ids", "pad_id",
                                             "temperature", "top_p", "cache_dtype", "unstack"))
def _generate(params, input_ids, attention_mask, rng, *, graphdef, max_new_tokens, eos_ids, pad_id,
              temperature, top_p, cache_dtype, unstack=True):
    model = merge_params(graphdef, params)
    b, p = input_ids.shape
    positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
    cache = KVCache.zeros(model.config, b, p, cache_dtype)
    h, cache = model.hidden_states(input_ids, attention_mask, positions, cache, cache_index=0)
    return decode(model, cache, attention_mask, model.logits(h[:, -1]), jnp.sum(attention_mask, axis=-1), rng,
                  jnp.zeros((b,), bool), max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id,
                  temperature=temperature, top_p=top_p, unstack=unstack)


def generate(graphdef, params, input_ids, attention_mask, *, max_new_tokens: int, eos_ids=None,
             pad_id: int | None = None, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             cache_dtype=None, unstack_layers: bool = True) -> Generation:
    """Generate up to `max_new_tokens` for left-padded prompts (batch, prompt_len); `unstack_layers`
    as `decode`'s `unstack`."""
    model = merge_params(graphdef, params)  # on the host, only to read static settings
    cfg = model.config
    eos_ids = tuple(cfg.eos_token_ids if eos_ids is None else eos_ids)
    if pad_id is None:
        pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    input_ids = jnp.asarray(input_ids, jnp.int32)
    attention_mask = jnp.asarray(attention_mask, jnp.int32)
    if bool(jnp.any(attention_mask[:, -1] == 0)):
        raise ValueError("prompts must be left padded: the last column of attention_mask must be 1")
    out, steps = _generate(
        params, input_ids, attention_mask, jax.random.key(seed), graphdef=graphdef,
        max_new_tokens=int(max_new_tokens), eos_ids=eos_ids or (-1,), pad_id=int(pad_id),
        temperature=float(temperature), top_p=float(top_p),
        cache_dtype=jnp.dtype(cache_dtype or model.compute_dtype), unstack=bool(unstack_layers),
    )
    return finished(out, steps, eos_ids)


def finished(out, steps, eos_ids) -> Generation:
    """`decode`'s output on the host, with each row's length (up to its first eos, included)."""
    out = np.asarray(out)
    ended = np.isin(out, eos_ids)
    lengths = np.where(ended.any(1), ended.argmax(1) + 1, int(steps))
    return Generation(out, lengths, int(steps))

