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

Sequence NLL is the sum (not mean) of token cross-entropy over labelled positions. Each method's
forget term is its module's (`npo_jax.methods`, one per open-unlearning trainer); the rest is shared:
- retain:  NLL (token mean) or KL(p_ref || p) summed over the vocabulary, mean over positions
- total:   gamma * forget + alpha * retain   (methods without a retain term: gamma * forget;
           fine-tuning: the NLL, gamma being 1)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from npo_jax import methods
from npo_jax.logprobs import kl_to_reference, token_logprobs
from npo_jax.methods.common import Scored, UnitOrder, per_unit, token_mean_nll
from npo_jax.model import train_hidden


class Objective(NamedTuple):
    """What a step minimises: an unlearning method with its weights (`from_config`, the run
    config's `method` section), or the fine-tuning NLL of `npo-jax finetune` (`finetune()`)."""

    method: str  # a `npo_jax.methods` name, or "finetune" (not a method.name: a command)
    beta: float = 0.1
    alpha: float = 1.0
    gamma: float = 1.0
    delta: float = 0.0
    retain_loss: str = "NLL"  # NLL | KL | EMBED_DIFF (RMU)
    reference: str = "cached"  # cached | live
    beta1: float = 5.0  # SatImp
    beta2: float = 1.0  # SatImp
    ignore_first_n_answer_tokens: int = 1  # CEU
    all_positions_mean: bool = True  # UNDIAL: open-unlearning's mean over every padded position
    wrapped_ignore_index: bool = True  # UNDIAL: open-unlearning's penalty on token vocab-100 where unlabelled
    retain_loss_eps: float = 0.0  # PDU (required in a config)
    primal_dual: bool = True  # PDU
    dual_step_size: float = 1.0  # PDU
    dual_update_upon: str = "step"  # PDU: step | epoch
    dual_warmup_epochs: int = 5  # PDU
    logit_shift_quirk: bool = True  # PDU: open-unlearning's unshifted forget logits
    rmu_broadcast_quirk: bool = True  # RMU: open-unlearning's activation-loss reduction
    rmu_layer: int = -1  # RMU: the decoder layer steered (from module_regex, `npo_jax.methods.rmu.prepare`)
    control_vec: tuple = ()  # RMU: the control vector, hidden_size floats (`npo_jax.methods.rmu.prepare`)

    @classmethod
    def from_config(cls, method) -> Objective:
        """The unlearning objective of a `run_config.MethodConfig` (RMU's layer and control vector
        are set once the model is known: `npo_jax.methods.rmu.prepare`)."""
        fields = cls._fields[1:]  # every hyperparameter the config section has (not RMU's derived ones)
        return cls(method.name, **{f: getattr(method, f) for f in fields if hasattr(method, f)})

    @classmethod
    def finetune(cls) -> Objective:
        """Token-mean NLL of the training answers (the examples under the batch's "forget" key)."""
        return cls("finetune")

    @property
    def module(self):
        return methods.get(self.method)

    @property
    def reference_source(self) -> str | None:
        """Where the method's reference log-probs come from: "cached", "live", or None (it needs
        none). A method without a `reference` hyperparameter always runs the live reference."""
        if not self.module.REFERENCE_GROUPS:
            return None
        return self.reference if "reference" in self.module.HPARAMS else "live"

    @property
    def cached_reference(self) -> bool:
        """Whether the batch carries the starting model's log-probs of the method's reference groups
        ("forget_ref_logp", ...)."""
        return self.reference_source == "cached"

    @property
    def needs_live_reference(self) -> bool:
        return (self.reference_source == "live" or (self.uses_retain and self.retain_loss in ("KL", "EMBED_DIFF"))
                or bool(getattr(self.module, "TEACHER_GROUPS", ())))

    @property
    def uses_retain(self) -> bool:
        return self.module.RETAIN

    def initial_state(self) -> dict | None:
        """The method's training state at the start (None: it has none), `npo_jax.methods`."""
        init = getattr(self.module, "initial_state", None)
        return init(self) if init is not None else None


def _positions(groups):
    """The groups' label_positions stacked, or None (every position scored) if any lacks them."""
    if all("label_positions" in g for g in groups):
        return jnp.concatenate([g["label_positions"] for g in groups])
    return None


def _label_logprobs(model, hidden, groups: list[dict]):
    """Per-token label log-probs (0 where not labelled) and labelled-token counts of `groups`, the
    first rows of `hidden`, in one LM-head pass (one larger matmul)."""
    rows = sum(g["input_ids"].shape[0] for g in groups)
    logp, mask = token_logprobs(model.logits, hidden[:rows], jnp.concatenate([g["labels"] for g in groups]),
                                positions=_positions(groups))
    return logp, mask.sum(-1)


def _reference_logprobs(ref_model, batch: dict, obj: Objective, names) -> dict:
    """The frozen reference's summed log-prob of each group in `names`: from the batch (cached:
    "NAME_ref_logp") or one live forward over them all."""
    if not names:
        return {}
    if obj.reference_source == "cached":
        return {k: batch[f"{k}_ref_logp"] for k in names}
    groups = [batch[k] for k in names]
    ref_h = train_hidden(ref_model, jnp.concatenate([g["input_ids"] for g in groups]),
                         jnp.concatenate([g["attention_mask"] for g in groups]))
    lp = jax.lax.stop_gradient(_label_logprobs(ref_model, ref_h, groups)[0].sum(-1))
    n = groups[0]["input_ids"].shape[0]
    return {k: lp[i * n:(i + 1) * n] for i, k in enumerate(names)}


def objective_loss(model, ref_model, batch: dict, obj: Objective, units: int, span: int = 1, state=None,
                   order: UnitOrder | None = None):
    """Per-unit losses (units,) and a dict of per-unit terms, for one micro-batch.

    A method with training state (`Objective.initial_state`) gets `state` (the state before this
    micro-batch) and `order`, and returns the state after it as the terms' "method_state".

    `batch` holds (n, L) `input_ids`, `labels`, `attention_mask` (and optionally (n, W)
    `label_positions`, the LM head then runs on those rows only) under "forget" (and the method's
    other FORGET_GROUPS) and, for methods with a retain term, "retain"; a cached reference adds
    "NAME_ref_logp" (n,) for each of the method's REFERENCE_GROUPS. For "finetune" the training
    examples are under "forget". With `span` > 1 (a loss group spans `span` units) each group also
    has (n,) `group_tokens`: the labelled-token count of the row's loss group.
    """
    method = obj.module
    if hasattr(method, "objective"):  # a method that does not score label log-probs (RMU: activations)
        return method.objective(model, ref_model, batch, obj, units, span)
    names = list(method.FORGET_GROUPS) + (["retain"] if method.RETAIN else [])
    groups = [batch[k] for k in names]
    n = batch["forget"]["input_ids"].shape[0]
    hidden = train_hidden(model, *(jnp.concatenate([g[k] for g in groups]) for k in ("input_ids", "attention_mask")))

    # the groups that need label log-probs share one LM-head pass
    scored = names if method.RETAIN and obj.retain_loss == "NLL" else list(method.FORGET_GROUPS)
    tlp, nt = _label_logprobs(model, hidden, [batch[k] for k in scored])
    lp = tlp.sum(-1)
    split = {k: slice(i * n, (i + 1) * n) for i, k in enumerate(scored)}

    def per_token(group, fn):
        g = batch[group]
        return fn(model.logits, hidden[names.index(group) * n:][:n], g["labels"], positions=g.get("label_positions"))

    def teacher_per_token(group, fn, every_position=False):
        g = batch[group]
        ref_h = jax.lax.stop_gradient(train_hidden(ref_model, g["input_ids"], g["attention_mask"]))
        return fn(model.logits, hidden[names.index(group) * n:][:n], ref_model.logits, ref_h, g["labels"],
                  positions=None if every_position else g.get("label_positions"))

    s = Scored({k: lp[split[k]] for k in scored}, {k: nt[split[k]] for k in scored},
               {k: batch[k].get("group_tokens") for k in scored},
               _reference_logprobs(ref_model, batch, obj, method.REFERENCE_GROUPS), units, span,
               {k: tlp[split[k]] for k in scored}, batch, per_token, teacher_per_token)
    forget_loss = method.forget_loss(s, obj)
    aux = {"forget_loss": forget_loss}
    if not method.RETAIN:
        return obj.gamma * forget_loss, aux

    retain = batch["retain"]
    if obj.retain_loss == "NLL":
        retain_loss = token_mean_nll(s.logp["retain"], s.n_tokens["retain"], units, span, retain.get("group_tokens"))
    else:
        retain_loss = _kl_retain(model, ref_model, hidden[-n:], retain, units)
    aux["retain_loss"] = retain_loss
    if state is not None:
        losses, aux["method_state"] = method.total_loss(forget_loss, retain_loss, obj, state, order or UnitOrder())
        return losses, aux
    return obj.gamma * forget_loss + obj.alpha * retain_loss, aux


def retain_loss_only(model, ref_model, retain: dict, obj: Objective, units: int, span: int = 1):
    """The retain term per unit of one micro-batch's retain rows alone (a forward with no forget
    rows): what an epoch-end pass over the retain batches measures."""
    hidden = train_hidden(model, retain["input_ids"], retain["attention_mask"])
    if obj.retain_loss == "NLL":
        logp, n = _label_logprobs(model, hidden, [retain])
        return token_mean_nll(logp.sum(-1), n, units, span, retain.get("group_tokens"))
    return _kl_retain(model, ref_model, hidden, retain, units)


def _kl_retain(model, ref_model, hidden, retain: dict, units: int):
    """KL(p_ref || p) of the retain rows, `batchmean` over each unit's positions (open-unlearning's
    `kl_div(..., "batchmean")`), the reference's forward without gradient."""
    ref_h = jax.lax.stop_gradient(train_hidden(ref_model, retain["input_ids"], retain["attention_mask"]))
    return per_unit(kl_to_reference(model.logits, hidden, ref_model.logits, ref_h), units).mean(axis=(1, 2))
