"""One optimizer step, under `jit` over a mesh (sharded) or under `pmap` (replicated).

Both strategies share `accumulated_grads`: value-and-grad of the objective for each
micro-batch, summed under a `lax.scan` over micro-batches and divided by their number. The step
batch has leaves (accum, n, ...) where n = units per micro-batch x rows per unit; under pmap a
leading device axis is added and each device's micro-batch holds `units` units. A unit is a
loss group, or with `span` > 1 a part of one (`npo_jax.losses`).

The train state is a plain dict {"params", "opt_state", "step"} that Orbax saves as is. What
"params" are is the model builder's business: the whole model (`FullModel`, a plain graphdef is
taken as one), or LoRA adapters (`npo_jax.lora.LoraModel`), whose frozen base params then come
in as the step's second argument, where a full model takes its live reference's params (or None).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from npo_jax.losses import Objective, objective_loss, retain_loss_only
from npo_jax.memory import trim_host_memory
from npo_jax.methods.common import UnitOrder
from npo_jax.model import merge_params

BATCH_AXES = ("data", "fsdp")


class FullModel:
    """Every parameter trained; the frozen params, if any, are the live reference's copy."""

    dropout = False

    def __init__(self, graphdef):
        self.graphdef = graphdef

    def models(self, params, frozen, key=None):
        del key
        return merge_params(self.graphdef, params), (
            merge_params(self.graphdef, frozen) if frozen is not None else None)


def model_builder(graphdef):
    """`graphdef` as a builder: a `FullModel` for a plain graphdef; a builder (`models`) as is."""
    return graphdef if hasattr(graphdef, "models") else FullModel(graphdef)


def dropout_key(builder, step, device=None):
    """The step's dropout key (seed, step and, under pmap, device), or None without dropout."""
    if not builder.dropout:
        return None
    key = jax.random.fold_in(jax.random.PRNGKey(builder.seed), step)
    return key if device is None else jax.random.fold_in(key, device)


def accumulated_grads(graphdef, obj: Objective, params, ref_params, batch, units: int, span: int = 1,
                      method_state=None, order: UnitOrder | None = None, key=None):
    """Mean loss, aux terms and gradients over the micro-batches of `batch` (leading axis).

    Gradients are taken w.r.t. `params` only: `ref_params` (a live reference, or a LoRA base) are
    constants. `key`: the step's dropout key, folded with the micro-batch index. A method with
    training state carries it through the micro-batches in order, from `method_state` (default:
    its initial state); the state after them is aux's "method_state"."""
    builder = model_builder(graphdef)
    if method_state is None:
        method_state = obj.initial_state()

    def loss_fn(p, micro, state, micro_key):
        model, ref_model = builder.models(p, ref_params, micro_key)
        unit_losses, aux = objective_loss(model, ref_model, micro, obj, units, span, state, order)
        state = aux.pop("method_state", None)
        return unit_losses.mean(), ({k: v.mean() for k, v in aux.items()}, state)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def body(acc, xs):
        (grads_sum, state), (micro, i) = acc, xs
        micro_key = None if key is None else jax.random.fold_in(key, i)
        (loss, (aux, state)), grads = grad_fn(params, micro, state, micro_key)
        return (jax.tree.map(jnp.add, grads_sum, grads), state), (loss, aux)

    zeros = jax.tree.map(jnp.zeros_like, params)
    n_micro = jax.tree.leaves(batch)[0].shape[0]
    (grads, method_state), (losses, auxes) = jax.lax.scan(body, (zeros, method_state), (batch, jnp.arange(n_micro)))
    accum = losses.shape[0]
    grads = jax.tree.map(lambda g: g / accum, grads)
    aux = {k: v.mean() for k, v in auxes.items()}
    if method_state is not None:
        aux["method_state"] = method_state
    return losses.mean(), aux, grads


def _apply(state, grads, loss, aux, tx, schedule, method_state=None):
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, **aux, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"])}
    new = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
    if method_state is not None:  # its values are metrics too (the same on every device: no pmean)
        new["method"] = method_state
        metrics.update({k: jnp.asarray(v, jnp.float32) for k, v in method_state.items()})
    return new, metrics


def init_state(params, tx, method_state: dict | None = None) -> dict:
    """The train state; a method with training state (`Objective.initial_state`) keeps it under "method"."""
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    if method_state is not None:
        state["method"] = method_state
    return state


def state_shardings(tx, params, p_shardings, mesh, method_state: dict | None = None) -> dict:
    """Optimizer moments sharded like their params, counters replicated.

    Left to the compiler, `tx.init`'s zeros come out replicated: a whole AdamW state (2x the
    float32 params) on every device, which alone would not fit a 3B model on a 16 GiB chip.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract = jax.eval_shape(lambda p: init_state(p, tx), params)
    opt = optax.tree_utils.tree_map_params(tx, lambda _, s: s, abstract["opt_state"], p_shardings,
                                           transform_non_params=lambda _: replicated)
    out = {"params": p_shardings, "opt_state": opt, "step": replicated}
    if method_state is not None:
        out["method"] = jax.tree.map(lambda _: replicated, method_state)
    return out


def batch_shardings(batch, mesh) -> dict:
    """Micro-batch rows split over the data and fsdp axes; the accumulation axis stays whole."""
    return jax.tree.map(lambda x: NamedSharding(mesh, PartitionSpec(None, BATCH_AXES)), batch)


def step_grads(graphdef, obj: Objective, units: int, span: int = 1, axis_name: str | None = None):
    """grads(params, ref_params, batch, method_state=None, key=None) -> (loss, aux, grads): what a step
    applies; under pmap (`axis_name`) averaged over the devices. A method with state (PDU's dual)
    gets its new state as aux["method_state"], the same on every device (not averaged). The step
    and `make_*_grads` share it, so a test of the gradients tests the step's."""

    def grads(params, ref_params, batch, method_state=None, key=None):
        order = UnitOrder(axis_name) if axis_name else None
        loss, aux, g = accumulated_grads(graphdef, obj, params, ref_params, batch, units, span, method_state, order,
                                         key)
        method = aux.pop("method_state", None)
        if axis_name:
            loss, aux, g = jax.lax.pmean((loss, aux, g), axis_name)
        return loss, ({**aux, "method_state": method} if method is not None else aux), g

    return grads


def make_sharded_step(graphdef, obj: Objective, tx, schedule, mesh, state_shardings, units: int,
                      ref_shardings=None, span: int = 1):
    """step(state, ref_params, batch) -> (state, metrics), jit over `mesh`, state donated."""
    grads_fn = step_grads(graphdef, obj, units, span)

    def step(state, ref_params, batch):
        key = dropout_key(model_builder(graphdef), state["step"])
        loss, aux, grads = grads_fn(state["params"], ref_params, batch, state.get("method"), key)
        method = aux.pop("method_state", None)
        return _apply(state, grads, loss, aux, tx, schedule, method)

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        step,
        in_shardings=(state_shardings, ref_shardings, None),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )


def make_sharded_grads(graphdef, obj: Objective, mesh, param_shardings, units: int, ref_shardings=None,
                       span: int = 1):
    """The sharded step's (loss, aux, grads) without the update: jit over `mesh`, the gradients
    sharded like their params."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(step_grads(graphdef, obj, units, span), in_shardings=(param_shardings, ref_shardings, None),
                   out_shardings=(replicated, replicated, param_shardings))


class CompiledStep:
    """A jit/pmap step compiled ahead of its first call for each batch shape.

    After compiling, the heap the compiler freed is handed back to the OS before the step first
    runs: glibc otherwise keeps it (about 350 MB for the `small` step on XLA:CPU) and the first
    step's temporaries come on top of it, which sets the run's peak resident memory. One
    executable per distinct batch shape (length bucket); an input that does not match the
    executable it was compiled for is an error, not a silent recompile.
    """

    def __init__(self, fn):
        self.fn = fn
        self.executables = {}

    def __call__(self, state, ref_params, batch):
        key = (jax.tree.structure(batch), tuple((x.shape, x.dtype) for x in jax.tree.leaves(batch)))
        exe = self.executables.get(key)
        if exe is None:
            exe = self.executables[key] = self.fn.lower(state, ref_params, batch).compile()
            trim_host_memory()
        return exe(state, ref_params, batch)


def make_pmap_step(graphdef, obj: Objective, tx, schedule, axis_name: str = "data", units: int = 1, span: int = 1):
    """step(state, ref_params, batch) -> (state, metrics) under pmap; all replicated, batch per device."""
    grads_fn = step_grads(graphdef, obj, units, span, axis_name)

    def step(state, ref_params, batch):
        key = dropout_key(model_builder(graphdef), state["step"], jax.lax.axis_index(axis_name))
        loss, aux, grads = grads_fn(state["params"], ref_params, batch, state.get("method"), key)
        method = aux.pop("method_state", None)
        return _apply(state, grads, loss, aux, tx, schedule, method)

    return jax.pmap(step, axis_name=axis_name, donate_argnums=(0,))


def make_pmap_grads(graphdef, obj: Objective, axis_name: str = "data", units: int = 1, span: int = 1):
    """The pmap step's (loss, aux, grads) without the update, replicated on every device."""
    return jax.pmap(step_grads(graphdef, obj, units, span, axis_name), axis_name=axis_name)


def make_retain_eval(graphdef, obj: Objective, units: int, span: int = 1, axis_name: str | None = None):
    """f(params, ref_params, batch) -> the mean over the batch's loss groups of the retain term, no
    gradient (an epoch-end pass, `npo_jax.methods`); `axis_name`: under pmap, averaged over devices."""

    def f(params, ref_params, batch):
        model, ref_model = model_builder(graphdef).models(params, ref_params)
        losses = jax.lax.map(lambda micro: retain_loss_only(model, ref_model, micro["retain"], obj, units, span), batch)
        mean = jax.lax.stop_gradient(losses.mean())
        return mean if axis_name is None else jax.lax.pmean(mean, axis_name)

    return jax.pmap(f, axis_name=axis_name) if axis_name else jax.jit(f)


def to_pmap_batch(batch, n_devices: int):
    """(accum, n_devices * b, ...) host arrays -> (n_devices, accum, b, ...)."""

    def split(x):
        accum, n = x.shape[:2]
        return x.reshape(accum, n_devices, n // n_devices, *x.shape[2:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)

