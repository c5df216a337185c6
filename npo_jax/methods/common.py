"""What every method's loss sees: the scored rows of one shared forward, and the two terms
methods have in common (HF's token-mean NLL per loss group, the retain term).

Loss-group semantics (`units`, `span`, `group_tokens`) are those of `npo_jax.losses`' module doc.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Scored(NamedTuple):
    """One micro-batch's label log-probs, by batch group ("forget", "alternate", ...)."""

    logp: dict  # group -> (n,) summed log-prob of the labelled tokens under the trained model
    n_tokens: dict  # group -> (n,) labelled-token count
    group_tokens: dict  # group -> (n,) labelled tokens of the row's loss group (span > 1), or None
    ref_logp: dict  # group -> the frozen reference's summed log-prob (no gradient), REFERENCE_GROUPS only
    units: int
    span: int
    token_logp: dict  # group -> (n, W) log-prob of each scored position's label, 0 where not labelled
    batch: dict  # the micro-batch
    # per_token(group, fn): fn(logits_fn, the group's hidden states, labels, positions=) -> (values, mask),
    # a `npo_jax.logprobs` function of the group's labelled positions (another LM-head pass)
    per_token: Callable
    # teacher_per_token(group, fn, every_position): fn(logits_fn, hidden, ref_logits_fn, ref_hidden,
    # labels, positions=), the group's hidden states beside the live frozen reference's (TEACHER_GROUPS
    # methods); every_position: every t < L-1 instead of the labelled positions
    teacher_per_token: Callable | None = None


def per_unit(x, units: int):
    """(n, ...) -> (units, n / units, ...): the rows of each unit."""
    return x.reshape(units, -1, *x.shape[1:])


def token_mean_nll(logp_sum, n_tokens, units, span=1, group_tokens=None):
    """HF's causal-LM loss per unit: summed token NLL over the unit / its labelled tokens; with
    `span` > 1, the unit's share of its group's token mean, times `span` (see `npo_jax.losses`)."""
    if span == 1:
        return -per_unit(logp_sum, units).sum(1) / jnp.maximum(per_unit(n_tokens, units).sum(1), 1)
    return -span * per_unit(logp_sum / jnp.maximum(group_tokens, 1), units).sum(1)


def group_nll(s: Scored, group: str):
    """The token-mean NLL of one batch group, per unit."""
    return token_mean_nll(s.logp[group], s.n_tokens[group], s.units, s.span, s.group_tokens[group])


def weighted_token_mean(s: Scored, group: str, weights):
    """Token mean over the loss group of weights * log p(label) (weights (n, W), no gradient): a
    token-weighted gradient ascent; weights 1 give -NLL. Loss groups as `token_mean_nll`'s."""
    weighted = jnp.sum(weights * s.token_logp[group], axis=-1)
    return -token_mean_nll(weighted, s.n_tokens[group], s.units, s.span, s.group_tokens[group])


def preference_loss(s: Scored, beta: float, win: str | None, lose: str):
    """open-unlearning's `compute_dpo_loss` per unit: -(2/beta) mean log sigmoid(beta * (win log-ratio
    - lose log-ratio)), a log-ratio being log p - log p_ref of a whole sequence (no win: NPO)."""
    margin = -(s.logp[lose] - s.ref_logp[lose])
    if win is not None:
        margin = (s.logp[win] - s.ref_logp[win]) + margin
    return -(2.0 / beta) * per_unit(jax.nn.log_sigmoid(beta * margin), s.units).mean(1)


class UnitOrder(NamedTuple):
    """Where one program's units lie in the micro-batch's data order: under `jit` it sees them all
    (axis_name None); under `pmap` each device holds `units` consecutive ones, in device order."""

    axis_name: str | None = None

    def all_units(self, x):
        """(units, ...) values of this program -> the micro-batch's values of every unit, in order."""
        if self.axis_name is None:
            return x
        return jax.lax.all_gather(x, self.axis_name).reshape(-1, *x.shape[1:])

    def first(self, units: int):
        """The index of this program's first unit in the micro-batch's order."""
        return 0 if self.axis_name is None else jax.lax.axis_index(self.axis_name) * units
