"""GradAscent (open-unlearning `trainer/unlearn/grad_ascent.py`): forget = -(token-mean NLL), no
retain term. open-unlearning has no weight; `gamma` (default 1) scales the forget term here too."""

from npo_jax.methods.common import Scored, group_nll

NAME = "GradAscent"
HPARAMS = {"gamma": 1.0}
RETAIN = False
FORGET_GROUPS = ("forget",)
REFERENCE_GROUPS = ()


def forget_loss(s: Scored, obj):
    return -group_nll(s, "forget")
