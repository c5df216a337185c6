"""Teacher-forced scoring: the compiled forward passes that give each answer token's log-prob and
greedy prediction, the batches they run on, and their results read back as `Scored`.

Two ways to score a (question, answer) sequence, with the same tokens, positions and causal
attention: whole (`score_whole`: right padded to a length bucket, the LM head on the answer
positions only), or its answer on top of its prompt's KV cache (`prefill_prefix` once for the
prompts' shared first part, `prefill` per group of prompts, then `score_answers_on`). Which one,
and in what order, is the scheduler's choice (`npo_jax.eval.schedule`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from npo_jax.data.tokenize import IGNORE, Example
from npo_jax.eval.batching import PROMPT_MULTIPLE, prompt_width
from npo_jax.eval.lm import LoadedLM
from npo_jax.eval.protocol import Scored
from npo_jax.logprobs import token_logprobs_and_argmax
from npo_jax.model import KVCache, merge_params, train_hidden


@functools.partial(jax.jit, static_argnames=("graphdef",))
def score_batch(graphdef, params, batch):
    model = merge_params(graphdef, params)
    hidden = train_hidden(model, batch["input_ids"], batch["attention_mask"])
    return token_logprobs_and_argmax(model.logits, hidden, batch["labels"], positions=batch["label_positions"])


@functools.partial(jax.jit, static_argnames=("graphdef",))
def prefill_prompts(graphdef, params, ids, mask, last, prefix=None):
    """KV cache of right-padded prompts (n, P), the hidden state of each prompt's last token (it
    predicts the answer's first token) and the mask over the cache's slots.

    Positions are 0..P-1, as `train_hidden` places them. With `prefix` (the cache, mask and
    real length of the prompts' shared first tokens, prefilled once as one row), the prompts
    hold only what follows it: their slots come after the prefix's, their positions after its
    real tokens (the prefix's padding slots are masked, so positions stay those of the whole)."""
    model = merge_params(graphdef, params)
    n, p = ids.shape
    positions = jnp.broadcast_to(jnp.arange(p), ids.shape)
    cache, start = KVCache.zeros(model.config, n, p, model.compute_dtype), 0
    if prefix is not None:
        prefix_cache, prefix_mask, prefix_len = prefix
        start = prefix_mask.shape[1]
        cache = KVCache(*(jnp.concatenate([jnp.broadcast_to(c, (c.shape[0], n, *c.shape[2:])), z], axis=3)
                          for c, z in zip(prefix_cache, cache, strict=True)))
        mask = jnp.concatenate([jnp.broadcast_to(prefix_mask, (n, start)), mask], axis=1)
        positions = positions + prefix_len
    h, cache = model.hidden_states(ids, mask, positions, cache, cache_index=start)
    return cache, h[jnp.arange(n), last], mask


@functools.partial(jax.jit, static_argnames=("graphdef",))
def score_on_prompts(graphdef, params, prompts, rows, ids, mask, labels, offsets):
    """Score right-padded answers (b, A) on the prompts `rows` of `prompts` (cache, last hidden
    states, attention mask): positions continue each prompt's (`offsets`), keys are the prompt's
    cache slots, then the answer's own."""
    cache, last_hidden, prompt_mask = prompts
    model = merge_params(graphdef, params)
    b, a = ids.shape

    def with_answer_slots(c):  # (layers, b, kv_heads, P + A, head_dim)
        return jnp.concatenate([c[:, rows], jnp.zeros((c.shape[0], b, c.shape[2], a, c.shape[4]), c.dtype)], axis=3)

    h, _ = model.hidden_states(ids, jnp.concatenate([prompt_mask[rows], mask], axis=1),
                               offsets[:, None] + jnp.arange(a),
                               KVCache(with_answer_slots(cache.k), with_answer_slots(cache.v)),
                               cache_index=cache.k.shape[3])
    # hidden state t predicts token t + 1: the prompt's last state, then the answer's own
    h = jnp.concatenate([last_hidden[rows][:, None].astype(h.dtype), h], axis=1)
    labels = jnp.concatenate([jnp.full((b, 1), IGNORE, labels.dtype), labels], axis=1)
    return token_logprobs_and_argmax(model.logits, h, labels)


def prompt_split(ex: Example) -> int:
    """Where an example's answer starts: its first labelled token (at least one token each side)."""
    labelled = np.flatnonzero(ex.labels != IGNORE)
    first = int(labelled[0]) if len(labelled) else len(ex.input_ids)
    return max(1, min(first, len(ex.input_ids) - 1))


def score_whole(lm: LoadedLM, examples: list[Example], buckets) -> tuple[np.ndarray, object]:
    """(targets, dispatched result) of whole sequences, right padded to a bucket of `buckets`."""
    batch = lm.pad(examples, buckets)
    targets = np.take_along_axis(batch["labels"], np.maximum(batch["label_positions"], 0) + 1, axis=1)
    return targets, score_batch(lm.graphdef, lm.params, batch)


def prefill_prefix(lm: LoadedLM, prompts: list[np.ndarray]):
    """The prompts' longest shared first part (a chat template's system turn), prefilled once
    as one row (unpadded: every answer attends to its slots), with its real length; None
    when shorter than `PROMPT_MULTIPLE` tokens. Every prompt keeps at least one token of its own."""
    n = min(len(p) for p in prompts) - 1
    diff = np.flatnonzero(np.any(np.stack([p[:n] for p in prompts]) != prompts[0][:n], axis=0))
    shared = int(diff[0]) if len(diff) else n
    if shared < PROMPT_MULTIPLE:
        return None
    tokens = prompts[0][:shared]
    batch = lm.pad([Example(tokens, np.full(shared, IGNORE, np.int32))], (shared,))
    cache, _, mask = prefill_prompts(lm.graphdef, lm.params, batch["input_ids"],
                                     jnp.asarray(batch["attention_mask"]), np.asarray([shared - 1], np.int32))
    return cache, mask, np.int32(shared)


def prefill(lm: LoadedLM, prompts: list[Example], prefix):
    """(cache, last hidden states, slot mask) of right-padded prompts, after `prefix` if given."""
    cut = 0 if prefix is None else int(prefix[2])
    batch = lm.pad([Example(e.input_ids[cut:], e.labels[cut:]) for e in prompts],
                   (prompt_width(max(len(e.input_ids) for e in prompts) - cut),))
    last = np.asarray([len(e.input_ids) - cut - 1 for e in prompts], np.int32)
    return prefill_prompts(lm.graphdef, lm.params, batch["input_ids"], jnp.asarray(batch["attention_mask"]),
                           last, prefix)


def score_answers_on(lm: LoadedLM, prompts, answers: list[Example], rows: list[int], offsets: list[int],
                     answer_buckets) -> tuple[np.ndarray, object]:
    """(targets, dispatched result) of answers right padded to a bucket of `answer_buckets`, each
    on prompt row `rows[k]` of `prompts` (`prefill`'s output), its positions from `offsets[k]`."""
    batch = lm.pad(answers, answer_buckets)
    return batch["labels"], score_on_prompts(lm.graphdef, lm.params, prompts, np.asarray(rows, np.int32),
                                             batch["input_ids"], batch["attention_mask"], batch["labels"],
                                             np.asarray(offsets, np.int32))


def read_scores(result, targets: np.ndarray, n: int) -> list[Scored]:
    """The first `n` rows of a dispatched score batch, fetched: one `Scored` per row."""
    logp, preds, mask = jax.device_get(result)
    out = []
    for row in range(n):
        m = mask[row]  # over the row's labelled positions, in order
        lp, pred, tgt = logp[row][m], preds[row][m], targets[row][m]
        # the closing eos is dropped from the per-token arrays, as tokenwise_logprobs does
        out.append(Scored(float(-lp.sum() / max(m.sum(), 1)), lp[:-1], pred[:-1], tgt[:-1]))
    return out
