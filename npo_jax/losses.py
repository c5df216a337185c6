"""Unlearning and fine-tuning objectives with open-unlearning's definitions.

A step's examples are grouped into *loss groups* of `optim.loss_group` consecutive examples
(open-unlearning's device micro-batch, `per_device_train_batch_size`). Each group's loss follows
open-unlearning exactly (NPO: mean over the group's sequences; NLL: HF's token mean over the
group; KL: `batchmean` over the group's positions), and a step's loss is the mean over its
groups: HF Trainer's average over micro-batches and devices, whatever the split of the step
over devices and accumulation here.

`objective_loss` sees one micro-batch as `units` consecutive units of equal size and returns one
loss per unit; the caller averages the units of all micro-batches and devices. Two layouts:
- `span` 1: each unit is one whole loss group (the group divides `per_device_batch`).
- `span` s > 1: a group spans s units (s devices' rows, or s accumulation micro-batches). Only
  the token-mean NLL terms mix rows across a group; they then use the group's labelled-token
  count, computed on the host from the labels (`group_tokens`, one value per row), so a unit's
  NLL is `s * sum(NLL_row / group_tokens_row)`: linear in the rows, so averaging the units over
  micro-batches and devices gives exactly the mean over groups of each group's token mean, and
  its gradient. The per-sequence terms (NPO, SimNPO) and `batchmean` KL (every row padded to
  the step's length) are means over rows, the same whatever the grouping.

Sequence NLL is the sum (not mean) of token cross-entropy over labelled positions.
- NPO:     forget = -(2/beta) * mean log sigmoid(-beta * (log p(y|x) - log p_ref(y|x)))
- SimNPO:  forget = -(2/beta) * mean log sigmoid(beta * (NLL(y|x)/|y| - delta))
- GradAscent / GradDiff: forget = -(token-mean NLL)
- retain:  NLL (token mean) or KL(p_ref || p) summed over the vocabulary, mean over positions
- total:   gamma * forget + alpha * retain   (GradAscent: forget only)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from npo_jax.logprobs import kl_to_reference, sequence_logprob
from npo_jax.model import train_hidden


class Objective(NamedTuple):
    """What a step minimises: an unlearning method with its weights (`from_config`, the run
    config's `method` section), or the fine-tuning NLL of `npo-jax finetune` (`finetune()`)."""

    method: str  # NPO | SimNPO | GradAscent | GradDiff, or "finetune" (not a method.name: a command)
    beta: float = 0.1
    alpha: float = 1.0
    gamma: float = 1.0
    delta: float = 0.0
    retain_loss: str = "NLL"  # NLL | KL
    reference: str = "cached"  # cached | live

    @classmethod
    def from_config(cls, method) -> Objective:
        """The unlearning objective of a `run_config.MethodConfig`."""
        return cls(method.name, beta=method.beta, alpha=method.alpha, gamma=method.gamma, delta=method.delta,
                   retain_loss=method.retain_loss, reference=method.reference)

    @classmethod
    def finetune(cls) -> Objective:
        """Token-mean NLL of the training answers (the examples under the batch's "forget" key)."""
        return cls("finetune")

    @property
    def cached_reference(self) -> bool:
        """Whether the batch carries the starting model's forget log-probs ("forget_ref_logp")."""
        return self.method == "NPO" and self.reference == "cached"

    @property
    def needs_live_reference(self) -> bool:
        return (self.method == "NPO" and self.reference == "live") or (
            self.method != "finetune" and self.method != "GradAscent" and self.retain_loss == "KL")

    @property
    def uses_retain(self) -> bool:
        return self.method in ("NPO", "SimNPO", "GradDiff")


def _units(x, units: int):
    return x.reshape(units, -1, *x.shape[1:])


def _token_mean_nll(logp_sum, n_tokens, units, span=1, group_tokens=None):
    """HF's causal-LM loss per unit: summed token NLL over the unit / its labelled tokens; with
    `span` > 1, the unit's share of its group's token mean, times `span` (see the module doc)."""
    if span == 1:
        return -_units(logp_sum, units).sum(1) / jnp.maximum(_units(n_tokens, units).sum(1), 1)
    return -span * _units(logp_sum / jnp.maximum(group_tokens, 1), units).sum(1)


def _positions(groups):
    """The groups' label_positions stacked, or None (every position scored) if any lacks them."""
    if all("label_positions" in g for g in groups):
        return jnp.concatenate([g["label_positions"] for g in groups])
    return None


def objective_loss(model, ref_model, batch: dict, obj: Objective, units: int, span: int = 1):
    """Per-unit losses (units,) and a dict of per-unit terms, for one micro-batch.

    `batch` holds (n, L) `input_ids`, `labels`, `attention_mask` (and optionally (n, W)
    `label_positions`, the LM head then runs on those rows only) under "forget" and, for methods
    with a retain term, "retain"; cached NPO also has "forget_ref_logp" (n,). For "finetune" the
    training examples are under "forget". With `span` > 1 (a loss group spans `span` units) each
    group also has (n,) `group_tokens`: the labelled-token count of the row's loss group.
    """
    forget = batch["forget"]
    groups = [forget] + ([batch["retain"]] if obj.uses_retain else [])
    n = forget["input_ids"].shape[0]
    cat = {k: jnp.concatenate([g[k] for g in groups]) for k in ("input_ids", "attention_mask")}
    hidden = train_hidden(model, cat["input_ids"], cat["attention_mask"])
    h_retain = hidden[n:]

    # The groups that need label log-probs share one LM-head pass (one larger matmul).
    scored = groups if obj.uses_retain and obj.retain_loss == "NLL" else [forget]
    lp, nt = sequence_logprob(model.logits, hidden[:len(scored) * n],
                              jnp.concatenate([g["labels"] for g in scored]), positions=_positions(scored))
    logp, n_tok = lp[:n], nt[:n]
    aux = {}
    if obj.method in ("finetune", "GradAscent", "GradDiff"):
        nll = _token_mean_nll(logp, n_tok, units, span, forget.get("group_tokens"))
        forget_loss = nll if obj.method == "finetune" else -nll
    elif obj.method == "NPO":
        if obj.reference == "cached":
            ref_logp = batch["forget_ref_logp"]
        else:
            ref_h = train_hidden(ref_model, forget["input_ids"], forget["attention_mask"])
            ref_logp, _ = sequence_logprob(ref_model.logits, ref_h, forget["labels"], positions=_positions([forget]))
            ref_logp = jax.lax.stop_gradient(ref_logp)
        log_ratio = logp - ref_logp
        forget_loss = -(2.0 / obj.beta) * _units(jax.nn.log_sigmoid(-obj.beta * log_ratio), units).mean(1)
    elif obj.method == "SimNPO":
        per_token_nll = -logp / jnp.maximum(n_tok, 1)
        forget_loss = -(2.0 / obj.beta) * _units(
            jax.nn.log_sigmoid(obj.beta * (per_token_nll - obj.delta)), units).mean(1)
    else:
        raise ValueError(f"unknown method {obj.method!r}")
    aux["forget_loss"] = forget_loss

    if not obj.uses_retain:
        return (forget_loss if obj.method == "finetune" else obj.gamma * forget_loss), aux

    retain = batch["retain"]
    if obj.retain_loss == "NLL":
        retain_loss = _token_mean_nll(lp[n:], nt[n:], units, span, retain.get("group_tokens"))
    else:
        ref_h = train_hidden(ref_model, retain["input_ids"], retain["attention_mask"])
        kl = kl_to_reference(model.logits, h_retain, ref_model.logits, jax.lax.stop_gradient(ref_h))
        retain_loss = _units(kl, units).mean(axis=(1, 2))  # batchmean over the unit's positions
    aux["retain_loss"] = retain_loss
    return obj.gamma * forget_loss + obj.alpha * retain_loss, aux
