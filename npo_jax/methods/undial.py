"""UNDIAL, self-distillation with adjusted logits (open-unlearning `trainer/unlearn/undial.py`,
`utils.compute_undial_loss`, configs/trainer/UNDIAL.yaml): each forget position's cross-entropy
against softmax(teacher logits - beta * onehot(label)), the teacher being the frozen reference
(live: full-vocabulary logits cannot be cached per item); + alpha * GradDiff's retain term.

open-unlearning averages over every position t < L-1 of its micro-batch, padded to its longest
row (prompt and padding included; its label -100 lowers the teacher's logit of token vocab-100
there). `all_positions_mean` reproduces that mean: per row, the positions t < L_group - 1 of its
loss group's open-unlearning length L_group (the longest forget row of the group), over
b * (L_group - 1), whatever our bucket padding; off, a token mean over the loss group's labelled
positions, as every other token mean here. `wrapped_ignore_index` reproduces the vocab-100
penalty (it matters only with `all_positions_mean`: otherwise no unlabelled position counts).
"""

import functools

import jax.numpy as jnp

from npo_jax.errors import NpoJaxError
from npo_jax.logprobs import distillation_cross_entropy
from npo_jax.methods.common import Scored, per_unit, token_mean_nll

NAME = "UNDIAL"
HPARAMS = {"beta": 10.0, "gamma": 1.0, "alpha": 0.0, "retain_loss": "NLL", "all_positions_mean": True,
           "wrapped_ignore_index": True}
RETAIN = True
FORGET_GROUPS = ("forget",)
REFERENCE_GROUPS = ()
TEACHER_GROUPS = ("forget",)


def row_lengths(group: dict):
    """(n,) each right-padded row's length: one past its last token that is visible or labelled
    (open-unlearning's eot mask hides a row's closing <|eot_id|>, which is labelled)."""
    real = (group["attention_mask"] > 0) | (group["labels"] != -100)
    return jnp.max(jnp.where(real, jnp.arange(real.shape[1]) + 1, 0), axis=1)


def group_lengths(s: Scored):
    """(n,) the length open-unlearning pads each row's loss group to: its longest forget row; a
    group spanning units takes it from the host (`group_length`)."""
    g = s.batch["forget"]
    if s.span == 1:
        longest = per_unit(row_lengths(g), s.units).max(1, keepdims=True)
        return jnp.broadcast_to(longest, (s.units, g["labels"].shape[0] // s.units)).reshape(-1)
    if "group_length" not in g:
        raise NpoJaxError("method.name=UNDIAL with method.all_positions_mean: a loss group spanning units needs "
                          "the batch's forget group_length (npo_jax.data.batches.step_batch with loss_group)")
    return g["group_length"]


def forget_loss(s: Scored, obj):
    fn = functools.partial(distillation_cross_entropy, beta=obj.beta, wrapped_ignore_index=obj.wrapped_ignore_index)
    ce, mask = s.teacher_per_token("forget", fn, every_position=obj.all_positions_mean)
    if not obj.all_positions_mean:
        return token_mean_nll(-jnp.sum(jnp.where(mask, ce, 0.0), axis=-1), mask.sum(-1), s.units, s.span,
                               s.group_tokens["forget"])
    length = group_lengths(s)
    keep = jnp.arange(ce.shape[1]) < (length[:, None] - 1)
    rows = jnp.sum(jnp.where(keep, ce, 0.0), axis=-1) / jnp.maximum(length - 1, 1)
    return per_unit(rows, s.units).mean(1)  # / b: the unit's rows
