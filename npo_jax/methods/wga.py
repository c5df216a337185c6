"""WGA, weighted gradient ascent (open-unlearning `trainer/unlearn/wga.py`, `utils.compute_wga_loss`,
configs/trainer/WGA.yaml): gradient ascent with each forget token's NLL weighted by its
probability to the power beta (no gradient through the weight):
forget = -(token mean of p_t^beta * NLL_t) = token mean of p_t^beta * log p_t."""

import jax
import jax.numpy as jnp

from npo_jax.methods.common import Scored, weighted_token_mean

NAME = "WGA"
HPARAMS = {"beta": 1.0, "alpha": 1.0, "gamma": 1.0, "retain_loss": "NLL"}
RETAIN = True
FORGET_GROUPS = ("forget",)
REFERENCE_GROUPS = ()


def forget_loss(s: Scored, obj):
    logp = s.token_logp["forget"]
    return weighted_token_mean(s, "forget", jax.lax.stop_gradient(jnp.exp(logp)) ** obj.beta)
