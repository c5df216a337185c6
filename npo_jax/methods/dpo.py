"""DPO / IdkDPO (open-unlearning `trainer/unlearn/dpo.py`, configs/trainer/DPO.yaml): the forget
answer is the "lose" and an "I don't know" refusal to the same question the "win" (the batch's
"alternate" group, `npo_jax.data.refusals`):
forget = -(2/beta) * mean log sigmoid(beta * ((log p - log p_ref)(win) - (log p - log p_ref)(lose))).
The refusal is drawn anew each time an item is used, so its reference log-prob cannot be cached
per item: DPO always runs the live (frozen) reference, and has no `reference` key."""

from npo_jax.methods.common import Scored, preference_loss

NAME = "DPO"
HPARAMS = {"beta": 0.1, "alpha": 1.0, "gamma": 1.0, "retain_loss": "NLL"}
RETAIN = True
FORGET_GROUPS = ("forget", "alternate")
REFERENCE_GROUPS = ("forget", "alternate")


def forget_loss(s: Scored, obj):
    return preference_loss(s, obj.beta, "alternate", "forget")
