"""Fine-tuning (`npo-jax finetune`; open-unlearning's `finetune` trainer): the token-mean NLL of
the training answers, which the batch carries under "forget". Not an unlearning `method.name`."""

from npo_jax.methods.common import Scored, group_nll

NAME = "finetune"
HPARAMS = {}
RETAIN = False
FORGET_GROUPS = ("forget",)
REFERENCE_GROUPS = ()


def forget_loss(s: Scored, obj):
    return group_nll(s, "forget")
