"""NPO (open-unlearning `trainer/unlearn/npo.py`, configs/trainer/NPO.yaml):
forget = -(2/beta) * mean log sigmoid(-beta * (log p(y|x) - log p_ref(y|x))), a DPO loss with no win."""

from npo_jax.methods.common import Scored, preference_loss

NAME = "NPO"
HPARAMS = {"beta": 0.1, "alpha": 1.0, "gamma": 1.0, "retain_loss": "NLL", "reference": "cached"}
RETAIN = True
FORGET_GROUPS = ("forget",)
REFERENCE_GROUPS = ("forget",)  # the groups whose reference log-probs the loss needs


def forget_loss(s: Scored, obj):
    return preference_loss(s, obj.beta, None, "forget")
