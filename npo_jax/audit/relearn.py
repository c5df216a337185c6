"""A few fine-tuning steps on a copy of the model, for the relearning probe (and test fixtures).

Unlearning that only hides facts is undone by a little fine-tuning on related data; relearning
on half of the forget set and measuring the other half shows it. Loss and optimizer are those of
`npo-jax finetune` (token-mean NLL of the answer and closing eos, `npo_jax.losses`; AdamW with its
default weight decay and gradient clipping, `npo_jax.optim`), with the learning rate decaying
linearly from `lr` to 0 over the steps and no warmup; each step takes `batch_size` examples in a
seeded order, cycling over the data. One jit-compiled step per length bucket.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from npo_jax.data.tokenize import Example, encode_qa_pairs
from npo_jax.eval.scoring import Scorer
from npo_jax.losses import Objective, objective_loss
from npo_jax.model import merge_params
from npo_jax.optim import make_optimizer
from npo_jax.run_config import OptimConfig

FINETUNE = Objective.finetune()


@functools.partial(jax.jit, static_argnames=("graphdef", "tx"), donate_argnums=(1, 2))
def _step(graphdef, params, opt_state, batch, tx):
    def loss_fn(p):
        loss, _ = objective_loss(merge_params(graphdef, p), None, {"forget": batch}, FINETUNE, units=1)
        return loss.mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


@functools.lru_cache(maxsize=8)
def _optimizer(lr: float, steps: int, treedef) -> optax.GradientTransformation:
    """`npo-jax finetune`'s optimizer, without warmup; one object per setting, so `_step` compiles once."""
    defaults = OptimConfig()
    template = jax.tree.unflatten(treedef, [0] * treedef.num_leaves)
    tx, _ = make_optimizer(template, lr=lr, total_steps=steps, warmup=0, weight_decay=defaults.weight_decay,
                           max_grad_norm=defaults.max_grad_norm, b1=defaults.b1, b2=defaults.b2, eps=defaults.eps)
    return tx


def finetune_examples(scorer: Scorer, examples: list[Example], *, steps: int, lr: float, batch_size: int = 8,
                      seed: int = 0) -> tuple[Scorer, list[float]]:
    """The scorer on the fine-tuned params (the original is untouched) and the per-step losses.
    Batches are padded to the scorer's length buckets with its model's mask convention."""
    lm = scorer.lm
    params = jax.tree.map(lambda x: jnp.array(x, jnp.float32), lm.params)  # a copy: donated below
    tx = _optimizer(float(lr), steps, jax.tree.structure(params))
    opt_state = tx.init(params)
    order = np.random.default_rng(seed).permutation(len(examples))
    losses = []
    for step in range(steps):
        chosen = [examples[order[(step * batch_size + j) % len(examples)]] for j in range(batch_size)]
        params, opt_state, loss = _step(lm.graphdef, params, opt_state, lm.pad(chosen, scorer.buckets), tx)
        losses.append(float(loss))
    return scorer.with_params(params), losses


def finetune(scorer: Scorer, pairs: list[tuple[str, str]], **kwargs) -> tuple[Scorer, list[float]]:
    """`finetune_examples` on (question, answer) pairs in the evaluator's chat format."""
    examples = encode_qa_pairs(scorer.tokenizer, pairs, scorer.fmt, scorer.buckets[-1])
    return finetune_examples(scorer, examples, **kwargs)
