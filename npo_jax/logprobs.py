"""Per-token log-probs (and KL to a reference) from hidden states, a chunk of positions at a time.

Full float32 logits for a batch of 128k-vocab sequences would dominate memory (32 x 512 x 128256
x 4 B = 8.4 GB); only each label's log-prob is needed. When a call's float32 logits would exceed
`LOGITS_BUDGET_BYTES`, positions are processed in chunks (at most `CHUNK_POSITIONS`, and few
enough that a chunk's logits fit the budget) under `jax.checkpoint`, so the backward
pass recomputes each chunk's logits instead of storing them (one more LM-head matmul). Below
the budget the logits are computed in one piece: the recomputation would cost time for no gain.
All functions use HF's causal shift: hidden state t predicts token t + 1.

Given a batch's `label_positions` ((batch, W), -1 padded; see `npo_jax.data.batches`), only
the hidden states that predict a label go through the LM head: for a chat-formatted example the
prompt is most of the sequence, and the LM head (vocab x hidden, the largest matrix of a small
Llama) and the log-softmax over the vocabulary dominate the loss's cost.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from npo_jax.data.tokenize import IGNORE

LOGITS_BUDGET_BYTES = 256 << 20
CHUNK_POSITIONS = 128


def _chunked(fn, arrays, chunk: int | None, logits_fn):
    """Apply fn to position chunks of (batch, positions, ...) arrays and concatenate along positions;
    in one piece when the whole call's float32 logits fit LOGITS_BUDGET_BYTES."""
    b, t = arrays[0].shape[:2]
    vocab = jax.eval_shape(logits_fn, arrays[0][:, :1]).shape[-1]
    if b * t * vocab * 4 <= LOGITS_BUDGET_BYTES:
        return fn(*arrays)
    if chunk is None:  # as many positions as keep one chunk's logits within the budget too
        fit = LOGITS_BUDGET_BYTES // (b * vocab * 4)
        chunk = max(1, min(CHUNK_POSITIONS, fit - fit % 8 if fit >= 8 else fit))
    chunk = min(chunk, t)
    n = -(-t // chunk)
    pad = n * chunk - t

    def split(x):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

    body = jax.checkpoint(fn)
    out = jax.lax.map(lambda xs: body(*xs), tuple(split(x) for x in arrays))
    return jnp.moveaxis(out, 0, 1).reshape(b, n * chunk, *out.shape[3:])[:, :t]


def labelled(hidden, labels, positions=None):
    """(hidden states, target ids (0 where masked), mask) for the positions that predict a label.

    Without `positions`: every t < T-1, shapes (batch, T-1[, hidden]). With `positions`
    (batch, W): those positions only, in their order, shapes (batch, W[, hidden]).
    """
    target = labels[:, 1:]
    if positions is None:
        h = hidden[:, :-1]
    else:
        idx = jnp.maximum(positions, 0)
        # a per-row gather (batch dims explicit), so a batch-sharded step stays row-local
        take = jax.vmap(lambda x, i: jnp.take(x, i, axis=0, mode="clip"))
        h = take(hidden, idx)
        target = jnp.where(positions >= 0, take(target, idx), IGNORE)
    mask = target != IGNORE
    return h, jnp.where(mask, target, 0), mask


def token_logprobs(logits_fn, hidden, labels, chunk: int | None = None, positions=None):
    """(log p(label_{t+1} | ..t), mask) at the positions `labelled` picks; mask is labels != -100."""
    h, safe, mask = labelled(hidden, labels, positions)

    def chunk_logp(h_c, y_c):
        logits = logits_fn(h_c)  # float32 (batch, chunk, vocab)
        label_logit = jnp.take_along_axis(logits, y_c[..., None], axis=-1)[..., 0]
        return label_logit - jax.nn.logsumexp(logits, axis=-1)

    logp = _chunked(chunk_logp, (h, safe), chunk, logits_fn)
    return jnp.where(mask, logp, 0.0), mask


def kl_to_reference(logits_fn, hidden, ref_logits_fn, ref_hidden, chunk: int | None = None):
    """KL(p_ref || p_model) summed over the vocabulary at every position: (batch, T)."""

    def chunk_kl(h_c, r_c):
        logp = jax.nn.log_softmax(logits_fn(h_c), axis=-1)
        ref_logp = jax.nn.log_softmax(ref_logits_fn(r_c), axis=-1)
        return jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1)

    return _chunked(chunk_kl, (hidden, ref_hidden), chunk, logits_fn)


def label_suppressed_cross_entropy(logits_fn, hidden, labels, chunk: int | None = None, positions=None):
    """CE-U's per-token loss at the positions `labelled` picks, and the mask: the cross-entropy of
    the model's distribution against its own (no gradient) with the label's logit set to -inf,
    lse(z) - sum_v q_v z_v with q = softmax(z | z_label = -inf)."""
    h, safe, mask = labelled(hidden, labels, positions)

    def chunk_ce(h_c, y_c):
        logits = logits_fn(h_c)
        is_label = jnp.arange(logits.shape[-1]) == y_c[..., None]
        q = jax.nn.softmax(jnp.where(is_label, -jnp.inf, jax.lax.stop_gradient(logits)), axis=-1)
        return -jnp.sum(q * jax.nn.log_softmax(logits, axis=-1), axis=-1)

    ce = _chunked(chunk_ce, (h, safe), chunk, logits_fn)
    return jnp.where(mask, ce, 0.0), mask


def distillation_cross_entropy(logits_fn, hidden, ref_logits_fn, ref_hidden, labels, beta: float,
                               wrapped_ignore_index: bool = False, chunk: int | None = None, positions=None):
    """UNDIAL's per-token loss at the positions `labelled` picks, and the label mask: the
    cross-entropy of the model's distribution against softmax(teacher logits - beta * onehot(label)),
    the teacher (the frozen reference, no gradient) on `ref_hidden`. Values at every picked
    position, labelled or not: where unlabelled the teacher is left as is, or with
    `wrapped_ignore_index` the logit of token vocab - 100 is lowered (open-unlearning indexes its
    one-hot by the label -100). Both logits of a chunk are alive at once, as `kl_to_reference`'s."""
    h, safe, mask = labelled(hidden, labels, positions)
    r = labelled(ref_hidden, labels, positions)[0]

    def chunk_ce(h_c, r_c, y_c, m_c):
        logits, teacher = logits_fn(h_c), jax.lax.stop_gradient(ref_logits_fn(r_c))
        vocab = teacher.shape[-1]
        target = jnp.where(m_c, y_c, vocab - 100 if wrapped_ignore_index else -1)
        q = jax.nn.softmax(teacher - beta * (jnp.arange(vocab) == target[..., None]), axis=-1)
        return -jnp.sum(q * jax.nn.log_softmax(logits, axis=-1), axis=-1)

    return _chunked(chunk_ce, (h, r, safe, mask), chunk, logits_fn), mask


def sequence_logprob(logits_fn, hidden, labels, chunk: int | None = None, positions=None):
    """Summed log-prob of each sequence's labelled tokens, and their count: (batch,), (batch,)."""
    logp, mask = token_logprobs(logits_fn, hidden, labels, chunk, positions)
    return logp.sum(-1), mask.sum(-1)


def _two_stage_argmax(logits, width: int):
    """(the largest of each `width` logits, the first argmax over the vocabulary if no logit is NaN)."""
    v = logits.shape[-1]
    blocks = logits.reshape(*logits.shape[:-1], v // width, width)
    block_max = blocks.max(axis=-1)
    block = jnp.argmax(block_max, axis=-1)
    within = jnp.argmax(jnp.take_along_axis(blocks, block[..., None, None], axis=-2)[..., 0, :], axis=-1)
    return block_max, block * width + within


def first_argmax(logits, width: int = 128):
    """`jnp.argmax(logits, -1)` (the first maximum; a NaN counts as the maximum), in two stages:
    the largest of each `width` logits, the argmax over those, then over the winning `width`.
    XLA:CPU runs a whole-vocabulary argmax as a slow variadic reduction (56 ms for 768 x 32768
    float32 logits against 4 ms this way); its max reduction also skips NaNs, hence the fallback."""
    if logits.shape[-1] % width:
        return jnp.argmax(logits, axis=-1)
    _, pred = _two_stage_argmax(logits, width)
    return jax.lax.cond(jnp.isnan(logits).any(), lambda: jnp.argmax(logits, axis=-1).astype(pred.dtype),
                        lambda: pred)


def logsumexp_and_argmax(logits, width: int = 128):
    """(`jax.nn.logsumexp(logits, -1)`, `first_argmax(logits)`), reading the logits twice (block
    maxima, then the sum of exponentials) instead of four times (logsumexp's max and sum, the
    argmax's block maxima and NaN check): the vocabulary's maximum is the largest block maximum,
    and a NaN logit makes the sum, so the logsumexp, NaN, which sends the argmax to its fallback."""
    if logits.shape[-1] % width:
        return jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1)
    block_max, pred = _two_stage_argmax(logits, width)
    top = block_max.max(axis=-1)
    shift = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))  # as jax.nn.logsumexp
    lse = shift + jnp.log(jnp.sum(jnp.exp(logits - shift[..., None]), axis=-1))
    pred = jax.lax.cond(jnp.isnan(lse).any(), lambda: jnp.argmax(logits, axis=-1).astype(pred.dtype), lambda: pred)
    return lse, pred


def token_logprobs_and_argmax(logits_fn, hidden, labels, chunk: int | None = None, positions=None):
    """(log p(label), argmax prediction, mask) at the positions `labelled` picks."""
    h, safe, mask = labelled(hidden, labels, positions)

    def chunk_fn(h_c, y_c):
        logits = logits_fn(h_c)
        label_logit = jnp.take_along_axis(logits, y_c[..., None], axis=-1)[..., 0]
        lse, pred = logsumexp_and_argmax(logits)
        return jnp.stack([label_logit - lse, pred.astype(jnp.float32)], axis=-1)

    out = _chunked(chunk_fn, (h, safe), chunk, logits_fn)
    return jnp.where(mask, out[..., 0], 0.0), out[..., 1].astype(jnp.int32), mask


def logit_margin_squared(logits_fn, hidden, labels, chunk: int | None = None, positions=None, shift: bool = True):
    """PDU's per-token forget loss (max_v z - mean_v z)^2 of the logits z, and the mask. With
    `shift` the logits at the positions `labelled` picks (hidden state t for label t + 1); without,
    open-unlearning's form: the logits at t itself wherever labels[t] != -100 (with `positions`,
    the positions after them: a label at position 0, never one in a chat, is then not seen)."""
    if shift:
        h, _, mask = labelled(hidden, labels, positions)
    elif positions is None:
        h, mask = hidden, labels != IGNORE
    else:
        take = jax.vmap(lambda x, i: jnp.take(x, i, axis=0, mode="clip"))
        h, mask = take(hidden, jnp.maximum(positions, 0) + 1), positions >= 0

    def chunk_margin(h_c):
        logits = logits_fn(h_c)
        return (logits.max(axis=-1) - logits.mean(axis=-1)) ** 2

    margin = _chunked(chunk_margin, (h,), chunk, logits_fn)
    return jnp.where(mask, margin, 0.0), mask
