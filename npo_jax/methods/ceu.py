"""CE-U, cross-entropy unlearning (open-unlearning `trainer/unlearn/ceu.py`, configs/trainer/CEU.yaml):
each forget token's cross-entropy against the model's own distribution (no gradient) with the
label's logit set to -inf, a token mean over the loss group; the first
`ignore_first_n_answer_tokens` labelled tokens of each row are left out. No retain term, no weight.
"""

import jax.numpy as jnp

from npo_jax.errors import NpoJaxError
from npo_jax.logprobs import label_suppressed_cross_entropy
from npo_jax.methods.common import Scored, per_unit

NAME = "CEU"
HPARAMS = {"ignore_first_n_answer_tokens": 1}
RETAIN = False
FORGET_GROUPS = ("forget",)
REFERENCE_GROUPS = ()


def forget_loss(s: Scored, obj):
    if s.span > 1:  # the host's group_tokens count every labelled token, not CE-U's
        raise NpoJaxError("method.name=CEU: optim.loss_group must not exceed optim.per_device_batch")
    ce, mask = s.per_token("forget", label_suppressed_cross_entropy)
    labels = s.batch["forget"]["labels"]
    # open-unlearning counts labelled tokens from position 0 of the unshifted labels
    rank = jnp.cumsum(mask, axis=-1) + (labels[:, :1] != -100)
    keep = mask & (rank > obj.ignore_first_n_answer_tokens)
    total = per_unit(jnp.sum(jnp.where(keep, ce, 0.0), axis=-1), s.units).sum(1)
    return total / jnp.maximum(per_unit(keep.sum(-1), s.units).sum(1), 1)
