"""Where the train state and the batches live: one interface, a sharded and a pmap implementation.

A `Placement` owns the layout of a run (the effective batch as units per micro-batch x
accumulation steps, how the loss groups of `optim.loss_group` examples lie on them, and the
mesh), puts params, optimizer state and a live reference on the devices, compiles the step, says
which rows of a micro-batch this host feeds and places them, and gives the host view and the
abstract (restore target) of the state. The trainer and its checkpoints talk to this interface
only, so neither has a branch per strategy; a new layout is a subclass and a case in `make_placement`.

- `ShardedPlacement`: `jit` over a `Mesh` ("data", "fsdp", "tensor"); params and optimizer
  state follow the partition rules (`npo_jax.sharding`), batch rows are split over data x fsdp,
  and each host builds only the rows its devices hold.
- `PmapPlacement`: the state replicated on every local device, each device `per_device_batch`
  rows of each micro-batch, gradients averaged with `pmean`.

Loss groups (`npo_jax.losses`): a group of g = `optim.loss_group` consecutive examples of the
step (default `per_device_batch`). When g divides `per_device_batch`, every device's rows hold
whole groups: the units are the groups (`span` 1). When `per_device_batch` divides g, a group
spans g / per_device_batch devices or accumulation micro-batches: the units are the devices'
rows and `span` says how many make a group. Any other pair is an error.
"""

from __future__ import annotations

import abc
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.jax_utils import replicate
from jax.sharding import NamedSharding, PartitionSpec

from npo_jax.errors import NpoJaxError
from npo_jax.lora import adapter_shardings
from npo_jax.losses import Objective
from npo_jax.run_config import RunConfig
from npo_jax.sharding import make_mesh, param_shardings
from npo_jax.train_step import (
    BATCH_AXES,
    CompiledStep,
    batch_shardings,
    init_state,
    make_pmap_grads,
    make_pmap_step,
    make_retain_eval,
    make_sharded_grads,
    make_sharded_step,
    state_shardings,
    to_pmap_batch,
)


class Placed(NamedTuple):
    """A run's device-side start: the train state, the live reference params (or None), the step."""

    state: dict
    ref_params: dict | None
    step: CompiledStep


def loss_grouping(shards: int, per_device_batch: int, loss_group: int) -> tuple[int, int]:
    """(units per micro-batch, span) for `shards` data-parallel shards of `per_device_batch` rows
    and loss groups of `loss_group` examples (0: per_device_batch)."""
    g = loss_group or per_device_batch
    if per_device_batch % g == 0:
        return shards * (per_device_batch // g), 1
    if g % per_device_batch == 0:
        return shards, g // per_device_batch
    raise NpoJaxError(f"config optim: loss_group {g} and per_device_batch {per_device_batch}: one must divide the "
                      "other (a device's rows hold whole loss groups, or a loss group spans whole device batches)")


class Placement(abc.ABC):
    """How the effective batch maps onto devices: `shards` x `per_device_batch` rows per
    micro-batch, `accum` micro-batches; the loss groups as `units` per micro-batch and `span`."""

    strategy: str

    def __init__(self, shards: int, optim):
        self.n_devices = jax.device_count()
        self.shards = shards  # data-parallel shards: per_device_batch rows each per micro-batch
        effective_batch, per_device_batch = optim.effective_batch, optim.per_device_batch
        per_step = per_device_batch * shards
        if effective_batch % per_step:
            raise NpoJaxError(f"config optim: effective_batch {effective_batch} is not a multiple of "
                              f"per_device_batch {per_device_batch} x {shards} data-parallel devices")
        self.accum = effective_batch // per_step
        self.rows = effective_batch // self.accum  # rows of one micro-batch, all hosts together
        self.loss_group = optim.loss_group or per_device_batch
        if effective_batch % self.loss_group:
            raise NpoJaxError(f"config optim: effective_batch {effective_batch} is not a multiple of "
                              f"loss_group {self.loss_group}")
        self.units, self.span = loss_grouping(shards, per_device_batch, optim.loss_group)

    @abc.abstractmethod
    def param_shardings(self, config) -> dict | None:
        """Shardings to load params onto (a `load_model` `shardings_for`), or None: host arrays."""

    @abc.abstractmethod
    def start(self, graphdef, config, params, obj: Objective, tx, schedule, base=None) -> Placed:
        """The initial state from float32 `params`, a live reference if `obj` needs one, the step.

        With LoRA, `graphdef` is an `npo_jax.lora.LoraModel`, `params` the adapters and `base`
        the frozen base params: they take the reference's place (the reference is the base model)."""

    @abc.abstractmethod
    def grads_fn(self, graphdef, config, obj: Objective):
        """fn(params, ref_params, batch) -> (loss, aux, grads), placed as `start`'s state["params"],
        ref_params and `place_batch`'s output: the gradient the step applies, for checking it
        (`host_state` turns the result into one copy)."""

    @abc.abstractmethod
    def local_rows(self, n: int) -> np.ndarray:
        """Which rows of an n-row micro-batch this process's devices hold (all of them on one host)."""

    @abc.abstractmethod
    def place_batch(self, host: dict):
        """This host's rows, (accum, local rows, ...) numpy arrays, as the step's input."""

    @abc.abstractmethod
    def retain_eval(self, graphdef, obj: Objective):
        """f(state, ref_params, placed batch) -> the batch's mean retain term (a host float)."""

    @abc.abstractmethod
    def with_method_state(self, state: dict, method_state: dict) -> dict:
        """`state` with its "method" entry replaced by `method_state` (host values)."""

    @abc.abstractmethod
    def host_state(self, state: dict) -> dict:
        """The state as one copy of every array (what a checkpoint holds)."""

    @abc.abstractmethod
    def abstract_state(self, state: dict) -> dict:
        """A restore target like `state`: shapes, dtypes and, where they are placed, shardings."""

    @abc.abstractmethod
    def place_restored(self, state: dict) -> dict:
        """A restored state (laid out as `abstract_state`) as the step takes it."""


class ShardedPlacement(Placement):
    strategy = "sharded"

    def __init__(self, cfg: RunConfig):
        p = cfg.parallel
        data = p.data if p.data > 0 else jax.device_count() // (p.fsdp * p.tensor)
        try:
            self.mesh = make_mesh(data, p.fsdp, p.tensor)
        except ValueError as e:
            raise NpoJaxError(f"config parallel: {e}") from None
        super().__init__(data * p.fsdp, cfg.optim)

    def param_shardings(self, config) -> dict:
        return param_shardings(config, self.mesh)

    def start(self, graphdef, config, params, obj: Objective, tx, schedule, base=None) -> Placed:
        p_shardings = self.param_shardings(config)
        method_state = obj.initial_state()
        live = obj.needs_live_reference or base is not None
        ref_params = base if base is not None else jax.tree.map(jnp.copy, params) if live else None
        if base is not None:
            base_specs = jax.tree.map(lambda s: s.spec, p_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
            p_shardings, ref_shardings = adapter_shardings(base_specs, graphdef.spec, self.mesh), p_shardings
        else:
            ref_shardings = p_shardings
        shardings = state_shardings(tx, params, p_shardings, self.mesh, method_state)
        state = jax.jit(lambda p: init_state(p, tx, method_state), out_shardings=shardings)(params)
        step = make_sharded_step(graphdef, obj, tx, schedule, self.mesh, shardings, self.units,
                                 ref_shardings if live else None, span=self.span)
        return Placed(state, ref_params, CompiledStep(step))

    def grads_fn(self, graphdef, config, obj: Objective):
        p_shardings = self.param_shardings(config)
        return make_sharded_grads(graphdef, obj, self.mesh, p_shardings, self.units,
                                  p_shardings if obj.needs_live_reference else None, span=self.span)

    def local_rows(self, n: int) -> np.ndarray:
        if jax.process_count() == 1:
            return np.arange(n)
        sharding = NamedSharding(self.mesh, PartitionSpec(None, BATCH_AXES))
        spans = {idx[1].indices(n)[:2] for idx in sharding.addressable_devices_indices_map((1, n)).values()}
        return np.concatenate([np.arange(lo, hi) for lo, hi in sorted(spans)])

    def place_batch(self, host: dict):
        shardings = batch_shardings(host, self.mesh)
        return jax.tree.map(
            lambda x, s: jax.make_array_from_process_local_data(s, x, (self.accum, self.rows, *x.shape[2:])),
            host, shardings)

    def retain_eval(self, graphdef, obj: Objective):
        f = make_retain_eval(graphdef, obj, self.units, self.span)
        return lambda state, ref_params, batch: float(f(state["params"], ref_params, batch))

    def with_method_state(self, state: dict, method_state: dict) -> dict:
        replicated = NamedSharding(self.mesh, PartitionSpec())
        new = jax.tree.map(lambda old, v: jax.device_put(np.asarray(v, old.dtype), replicated), state["method"],
                           method_state)
        return {**state, "method": new}

    def host_state(self, state: dict) -> dict:
        return state

    def abstract_state(self, state: dict) -> dict:
        # the state's leaves carry the shardings `start` gave them: a restore lands on them
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)

    def place_restored(self, state: dict) -> dict:
        return state


class PmapPlacement(Placement):
    strategy = "pmap"

    def __init__(self, cfg: RunConfig):
        super().__init__(jax.device_count(), cfg.optim)

    def param_shardings(self, config) -> None:
        return None

    def start(self, graphdef, config, params, obj: Objective, tx, schedule, base=None) -> Placed:
        devices = jax.local_devices()
        host = jax.device_get(params)
        state = replicate(init_state(host, tx, jax.device_get(obj.initial_state())), devices)
        if base is not None:
            ref_params = replicate(jax.device_get(base), devices)
        else:
            ref_params = replicate(host, devices) if obj.needs_live_reference else None
        step = make_pmap_step(graphdef, obj, tx, schedule, units=self.device_units, span=self.span)
        return Placed(state, ref_params, CompiledStep(step))

    @property
    def device_units(self) -> int:
        return self.units // self.shards

    def grads_fn(self, graphdef, config, obj: Objective):
        return make_pmap_grads(graphdef, obj, units=self.device_units, span=self.span)

    def local_rows(self, n: int) -> np.ndarray:
        if jax.process_count() == 1:
            return np.arange(n)
        b, n_local = n // self.n_devices, jax.local_device_count()  # device d takes rows [d*b, (d+1)*b)
        lo = jax.process_index() * n_local
        return np.arange(lo * b, (lo + n_local) * b)

    def place_batch(self, host: dict):
        return to_pmap_batch(host, jax.local_device_count())

    def retain_eval(self, graphdef, obj: Objective):
        f = make_retain_eval(graphdef, obj, self.units // self.shards, self.span, axis_name="data")
        return lambda state, ref_params, batch: float(f(state["params"], ref_params, batch)[0])

    def with_method_state(self, state: dict, method_state: dict) -> dict:
        host = jax.tree.map(lambda old, v: np.asarray(v, old.dtype), state["method"], method_state)
        return {**state, "method": replicate(host, jax.local_devices())}

    def host_state(self, state: dict) -> dict:
        return jax.tree.map(lambda x: x[0], state)

    def abstract_state(self, state: dict) -> dict:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), state)

    def place_restored(self, state: dict) -> dict:
        return replicate(jax.device_get(state), jax.local_devices())


PLACEMENTS = {p.strategy: p for p in (ShardedPlacement, PmapPlacement)}


def make_placement(cfg: RunConfig) -> Placement:
    """The placement `parallel.strategy` names, laid out for `cfg`'s batch and mesh."""
    return PLACEMENTS[cfg.parallel.strategy](cfg)
