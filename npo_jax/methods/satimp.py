"""SatImp (open-unlearning `trainer/unlearn/satimp.py`, `utils.compute_satimp_loss`,
configs/trainer/SatImp.yaml): WGA's token weighting with a saturation factor p_t^beta1 and an
importance factor (1 - p_t)^beta2 (no gradient through either):
forget = token mean of p_t^beta1 * (1 - p_t)^beta2 * log p_t."""

import jax
import jax.numpy as jnp

from npo_jax.methods.common import Scored, weighted_token_mean

NAME = "SatImp"
HPARAMS = {"beta1": 5.0, "beta2": 1.0, "alpha": 1.0, "gamma": 0.1, "retain_loss": "NLL"}
RETAIN = True
FORGET_GROUPS = ("forget",)
REFERENCE_GROUPS = ()


def forget_loss(s: Scored, obj):
    p = jax.lax.stop_gradient(jnp.exp(s.token_logp["forget"]))
    return weighted_token_mean(s, "forget", p ** obj.beta1 * (1 - p) ** obj.beta2)
