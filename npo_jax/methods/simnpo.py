"""SimNPO (open-unlearning `trainer/unlearn/simnpo.py`, configs/trainer/SimNPO.yaml): NPO without
a reference, on the length-normalised NLL with a margin:
forget = -(2/beta) * mean log sigmoid(beta * (NLL(y|x)/|y| - delta))."""

import jax
import jax.numpy as jnp

from npo_jax.methods.common import Scored, per_unit

NAME = "SimNPO"
HPARAMS = {"delta": 0.0, "beta": 4.5, "alpha": 1.0, "gamma": 0.125, "retain_loss": "NLL"}
RETAIN = True
FORGET_GROUPS = ("forget",)
REFERENCE_GROUPS = ()


def forget_loss(s: Scored, obj):
    per_token_nll = -s.logp["forget"] / jnp.maximum(s.n_tokens["forget"], 1)
    return -(2.0 / obj.beta) * per_unit(jax.nn.log_sigmoid(obj.beta * (per_token_nll - obj.delta)), s.units).mean(1)
