"""PDU, primal-dual unlearning (open-unlearning `trainer/unlearn/pdu.py`, configs/trainer/PDU.yaml;
Entesari et al. 2025): forget = token mean over the loss group of (max_v z - mean_v z)^2, the
squared margin of the top logit over the mean logit (flattening the output distribution);
loss = gamma * forget + alpha_i * (retain - retain_loss_eps), alpha the dual variable.

The dual is training state ("retain_preference"; `initial_state`): with `primal_dual` and
`dual_update_upon: step`, after each loss group i (open-unlearning's compute_loss call, data
order) alpha <- max(0, alpha + dual_step_size * (retain_i - eps)), once updates are enabled;
the new value weighs the next group, in this step or the next. With `epoch`, the update uses the
mean retain loss of a no-gradient pass over the epoch's retain batches (`epoch_end`). Updates are
enabled from the start with `dual_warmup_epochs` 0, else after the epoch whose count reaches it.
`logit_shift_quirk` (open-unlearning's form, default): the forget term reads the logits at the
labelled positions themselves, not one before as every other loss (docs/methods.md).
"""

import jax
import jax.numpy as jnp

from npo_jax.errors import NpoJaxError
from npo_jax.logprobs import logit_margin_squared
from npo_jax.methods import REQUIRED
from npo_jax.methods.common import Scored, UnitOrder, per_unit, token_mean_nll

NAME = "PDU"
HPARAMS = {"retain_loss_eps": REQUIRED, "primal_dual": True, "dual_step_size": 1.0, "dual_update_upon": "step",
           "dual_warmup_epochs": 5, "gamma": 1.0, "alpha": 1.0, "loss_names": ["forget_loss", "retain_loss"],
           "retain_loss": "NLL", "logit_shift_quirk": True}
RETAIN = True
FORGET_GROUPS = ("forget",)
REFERENCE_GROUPS = ()


def check_config(method, where: str) -> None:
    """open-unlearning asserts one name per loss; its names label its log, ours keep the record's."""
    if len(method.loss_names) != 2:
        raise NpoJaxError(f"{where}: method.loss_names={list(method.loss_names)} must name the two losses "
                          "(forget, retain)")


def forget_loss(s: Scored, obj):
    if s.span > 1 and _step_updates(obj):  # the dual is updated per loss group: one group, one unit
        raise NpoJaxError("method.name=PDU with dual_update_upon=step: optim.loss_group must not exceed "
                          "optim.per_device_batch")
    g = s.batch["forget"]
    margin, mask = s.per_token("forget", lambda *a, **k: logit_margin_squared(
        *a, **k, shift=not obj.logit_shift_quirk))
    rows = jnp.sum(margin, axis=-1)
    if s.span == 1:
        return per_unit(rows, s.units).sum(1) / jnp.maximum(per_unit(mask.sum(-1), s.units).sum(1), 1)
    return -token_mean_nll(-rows, None, s.units, s.span, g["group_tokens"])


def initial_state(obj) -> dict:
    """open-unlearning's `preferences[1]` (alpha) and `can_update` (set when dual_warmup_epochs is 0)."""
    return {"retain_preference": jnp.asarray(obj.alpha, jnp.float32),
            "dual_updates": jnp.asarray(obj.dual_warmup_epochs == 0, jnp.int32)}


def _step_updates(obj) -> bool:
    return obj.primal_dual and obj.dual_update_upon == "step"


def total_loss(forget, retain, obj, state: dict, order: UnitOrder):
    """Per-unit gamma * forget + alpha_i * (retain - eps), alpha_i the dual after the units before i
    (their retain values, no gradient), and the state after the micro-batch's last unit."""
    shifted = retain - obj.retain_loss_eps
    alpha = state["retain_preference"]
    if not _step_updates(obj):
        return obj.gamma * forget + alpha * shifted, state
    on = state["dual_updates"] > 0

    def update(a, r):
        new = jnp.where(on, jnp.maximum(0.0, a + obj.dual_step_size * r), a)
        return new, a

    final, alphas = jax.lax.scan(update, alpha, order.all_units(jax.lax.stop_gradient(shifted)))
    mine = jax.lax.dynamic_slice_in_dim(alphas, order.first(forget.shape[0]), forget.shape[0])
    return obj.gamma * forget + mine * shifted, {**state, "retain_preference": final}


def epoch_end(obj, state: dict, epochs_done: int, retain_mean) -> dict:
    """open-unlearning's `DualOptimizationCallback.on_epoch_end` (state.epoch = epochs_done)."""
    if not obj.primal_dual or epochs_done < obj.dual_warmup_epochs:
        return state
    state = {**state, "dual_updates": 1}
    if obj.dual_update_upon == "epoch":
        alpha = float(state["retain_preference"]) + obj.dual_step_size * (retain_mean() - obj.retain_loss_eps)
        state["retain_preference"] = max(0.0, alpha)
    return state

