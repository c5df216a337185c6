"""AdamW + clipping + linear warmup/decay, as the HF Trainer open-unlearning uses builds them.

- AdamW (decoupled weight decay) with weight decay off for norm weights and biases (HF's
  decay-parameter rule);
- gradients clipped to a global norm with torch's `clip_grad_norm_` formula (HF calls it before
  the step): every gradient times min(1, max_norm / (norm + 1e-6));
- lr(k) for update k = 0, 1, ...: lr * k / warmup during warmup, then a linear decay to 0 at the
  last update (HF `get_linear_schedule_with_warmup`: the first update has lr 0 when warmup > 0);
- warmup steps = int(warmup_epochs * len(forget) // effective_batch) (open-unlearning).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from npo_jax.tree_paths import iter_paths, set_path


def warmup_steps(warmup_epochs: float, dataset_len: int, effective_batch: int) -> int:
    return int(warmup_epochs * dataset_len // effective_batch)


def linear_schedule(lr: float, warmup: int, total: int):
    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        warm = lr * count / max(warmup, 1)
        decay = lr * jnp.maximum(0.0, (total - count) / max(total - warmup, 1))
        return jnp.where(count < warmup, warm, decay)

    return schedule


def decay_mask(params: dict) -> dict:
    """True where weight decay applies: kernels and embeddings, not norm scales or biases."""
    mask: dict = {}
    for path, _ in iter_paths(params):
        set_path(mask, path, path[-1] not in ("scale", "bias"))
    return mask


def clip_grad_norm(max_norm: float, eps: float = 1e-6) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_: scale by min(1, max_norm / (global norm + eps)).

    Unlike `optax.clip_by_global_norm` (a divide behind a select, without eps) this is one
    multiply by a scalar, which XLA fuses into the AdamW moment updates instead of writing the
    clipped gradients out first (on XLA:CPU one pass over every gradient less per step)."""

    def update(updates, state, params=None):
        del params
        coef = jnp.minimum(max_norm / (optax.tree.norm(updates) + eps), 1.0)
        return jax.tree.map(lambda g: g * coef.astype(g.dtype), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def keep_frozen(update_mask) -> optax.GradientTransformation:
    """Zero updates where `update_mask` (a pytree like the params; a leaf's mask broadcasts, e.g. one
    entry per layer of a stacked tensor) is False: those params stay bit-identical, no weight
    decay either, as parameters outside torch's optimizer (or without a .grad) do. Placed after
    clipping: HF clips over every parameter with a gradient, trained or not."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), updates, update_mask), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def make_optimizer(params, *, lr, total_steps, warmup, weight_decay, max_grad_norm, b1=0.9, b2=0.999,
                   eps=1e-8, update_mask=None) -> tuple[optax.GradientTransformation, callable]:
    schedule = linear_schedule(lr, warmup, total_steps)
    tx = optax.chain(
        clip_grad_norm(max_grad_norm),
        optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask(params)),
        *([keep_frozen(update_mask)] if update_mask is not None else []),
    )
    return tx, schedule

