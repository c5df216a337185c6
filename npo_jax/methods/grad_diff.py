"""GradDiff (open-unlearning `trainer/unlearn/grad_diff.py`, configs/trainer/GradDiff.yaml):
gamma * -(token-mean NLL of forget) + alpha * retain term."""

from npo_jax.methods.common import Scored, group_nll

NAME = "GradDiff"
HPARAMS = {"gamma": 1.0, "alpha": 1.0, "retain_loss": "NLL"}
RETAIN = True
FORGET_GROUPS = ("forget",)
REFERENCE_GROUPS = ()


def forget_loss(s: Scored, obj):
    return -group_nll(s, "forget")
