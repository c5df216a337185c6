"""An unlearning method's loss and gradients, ours on each multi-device path training runs and
open-unlearning's trainer `compute_loss` on the same rows, for the method parity tests.

A step here is `groups` loss groups of `GROUP` examples: each group is one open-unlearning
micro-batch (`per_device_train_batch_size` 4), and HF Trainer's loss and gradient for the step
are the means over those micro-batches. Ours come from a real `Placement` (`LAYOUTS`: one device,
a data x fsdp x tensor mesh, pmap over every device): the step's host batch built by
`step_batch`, split into accumulation micro-batches and device rows as the trainer splits it,
and the gradient the step applies (`Placement.grads_fn`).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.machinery
import importlib.util
import sys
import types

import jax
import numpy as np
import optax
import pytest
import torch
from conftest import SHARED
from flax.jax_utils import replicate
from hf_models import load_hf

from npo_jax.data.batches import StepPlan, step_batch
from npo_jax.data.tokenize import IGNORE, Example
from npo_jax.model import abstract_model, split_params
from npo_jax.model_io import load_hf_params
from npo_jax.params import param_specs
from npo_jax.placement import make_placement
from npo_jax.run_config import load_run_config
from npo_jax.train_step import accumulated_grads
from npo_jax.tree_paths import get_path

OU_SRC = SHARED / "reference" / "open-unlearning" / "src"
RTOL = 1e-4
KEYS = ("input_ids", "attention_mask", "labels")
# LLVM's optimisation of the CPU code is most of a tiny model's compile time: the tests compile
# the same XLA program without it (code generation only; XLA:CPU keeps float semantics either way)
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
GROUP = 4  # rows of one open-unlearning micro-batch: one loss group
LENGTH = 24  # the step's padded length


@dataclasses.dataclass(frozen=True)
class Layout:
    """A placement of a step of `groups` loss groups: `parallel.*` and `optim.per_device_batch`."""

    overrides: tuple[str, ...]
    groups: int


# path -> (layout whose loss groups span devices or micro-batches, layout whose device rows hold
# whole groups). On the 8 devices of conftest:
# - single: one device, one group;
# - sharded: a data=2 x fsdp=2 x tensor=2 mesh, 4 data-parallel shards: one row per device and 2
#   accumulation micro-batches (a group spans the 4 shards), or a group on each shard;
# - pmap: 8 devices, 2 rows each (a group spans 2 devices), or a group on each device.
LAYOUTS = {
    "single": (Layout(("parallel.data=1", f"optim.per_device_batch={GROUP}"), 1),) * 2,
    "sharded": (Layout(("parallel.data=2", "parallel.fsdp=2", "parallel.tensor=2", "optim.per_device_batch=1"), 2),
                Layout(("parallel.data=2", "parallel.fsdp=2", "parallel.tensor=2",
                        f"optim.per_device_batch={GROUP}"), 4)),
    "pmap": (Layout(("parallel.strategy=pmap", "optim.per_device_batch=2"), 4),
             Layout(("parallel.strategy=pmap", f"optim.per_device_batch={GROUP}"), 8)),
}


def layout(path: str, spanning: bool = True) -> Layout:
    """The `path` layout; `spanning` False for a method that refuses groups spanning units (CE-U)."""
    return LAYOUTS[path][0 if spanning else 1]


def _stub(name, **attrs):
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    mod.__dict__.update(attrs)
    return mod


def open_unlearning_trainers() -> dict:
    """open-unlearning's trainer classes by name (skips without ../shared). Its package imports
    accelerate and deepspeed, which this venv lacks and `compute_loss` never uses: stubbed only
    while importing."""
    if not OU_SRC.is_dir():
        pytest.skip(f"{OU_SRC} is absent (only the project's own checkout has ../shared)")
    stubs = {}
    if importlib.util.find_spec("accelerate") is None:
        stubs["accelerate.utils"] = _stub("accelerate.utils", is_deepspeed_available=lambda: False)
        stubs["accelerate"] = _stub("accelerate", utils=stubs["accelerate.utils"])
    if importlib.util.find_spec("deepspeed") is None:
        stubs["deepspeed"] = _stub("deepspeed")
    saved_path = list(sys.path)
    with pytest.MonkeyPatch.context() as mp:
        for name, mod in stubs.items():
            mp.setitem(sys.modules, name, mod)
        sys.path.insert(0, str(OU_SRC))
        try:
            trainer = importlib.import_module("trainer")
        finally:
            sys.path[:] = saved_path
    return trainer.TRAINER_REGISTRY


def examples(seed, n, vocab=256, prompts=None):
    """n random question-answer examples; the prompts of `prompts` (a list of Examples) if given."""
    rng = np.random.RandomState(seed)
    out = []
    for i in range(n):
        prompt = rng.randint(4, vocab, rng.randint(3, 9)) if prompts is None else \
            prompts[i].input_ids[prompts[i].labels == IGNORE]
        ids = np.concatenate([prompt, rng.randint(4, vocab, rng.randint(2, 8))]).astype(np.int32)
        labels = ids.copy()
        labels[:len(prompt)] = IGNORE
        out.append(Example(ids, labels))
    return out


class _SamePosition:
    """Retain partners and refusals by the forget item's own index: the test's rows, in step order."""

    def __init__(self, rows=None):
        self.rows = rows

    def partners(self, items, epochs):
        return items

    def examples(self, items, epochs):
        return [self.rows[i] for i in items]


def _run_config(lay: Layout):
    return load_run_config(None, ["output_dir=x", "model.path=m", f"optim.effective_batch={GROUP * lay.groups}",
                                  f"optim.loss_group={GROUP}", *lay.overrides])


def host_step(placement, obj, seed: int = 0) -> dict:
    """The step's host batch for `placement`, as the trainer builds it (all rows; one host): random
    forget rows, retain rows (if the method has a retain term) and refusals (if it has "alternate")."""
    n = placement.accum * placement.rows
    forget = examples(seed, n)
    retain = examples(seed + 1, n) if obj.uses_retain else None
    alternate = (_SamePosition(examples(seed + 2, n, prompts=forget))
                 if "alternate" in obj.module.FORGET_GROUPS else None)
    host = step_batch(StepPlan(n, n, 1, seed), 0, forget, buckets=[LENGTH], pad_id=0, eot_id=None,
                      eot_mask_quirk=False, retain=retain, pairing=_SamePosition(), alternate=alternate,
                      loss_group=placement.loss_group if placement.span > 1 else None)
    host.pop("forget_index")
    return host


def grads_on(lay: Layout, folder, ref_folder, obj, seed: int = 0):
    """(host batch, loss, aux, grads as our param tree) of one step of `lay` for the HF model in
    `folder` (`ref_folder`: the live reference, if `obj` has one), through the placement's own
    start, batch placement and gradient function."""
    placement = make_placement(_run_config(lay))
    cfg, params = load_hf_params(folder)
    ref = load_hf_params(ref_folder)[1] if obj.needs_live_reference else None
    graphdef, _ = split_params(abstract_model(cfg))
    tx = optax.sgd(0.0)
    placed = placement.start(graphdef, cfg, params, obj, tx, optax.constant_schedule(0.0))
    if ref is not None:  # start copies the trained params as the reference: the test's has other weights
        placed = placed._replace(ref_params=_like(placement, placed.state["params"], ref))
    host = host_step(placement, obj, seed)
    micro = jax.tree.map(lambda x: x.reshape(placement.accum, placement.rows, *x.shape[1:]), host)
    args = (placed.state["params"], placed.ref_params, placement.place_batch(micro))
    out = placement.grads_fn(graphdef, cfg, obj).lower(*args).compile(FAST_COMPILE)(*args)
    loss, aux, grads = jax.device_get(placement.host_state(out))
    return cfg, host, float(loss), {k: float(v) for k, v in aux.items()}, grads


def _like(placement, placed_params, host_params):
    """`host_params` laid out as `placed_params` (sharded: the same shardings; pmap: replicated)."""
    if placement.strategy == "pmap":
        return replicate(host_params, jax.local_devices())
    return jax.tree.map(lambda p, h: jax.device_put(h, p.sharding), placed_params, host_params)


def _torch(group):
    return {k: torch.tensor(np.asarray(group[k]), dtype=torch.long) for k in KEYS}


def _collated(group: dict) -> dict:
    """A micro-batch cut to its longest row, as open-unlearning's collator pads it (right padding):
    UNDIAL's forget mean runs over every padded position, and ours is exact for that length."""
    longest = int(np.asarray(group["attention_mask"]).sum(-1).max())
    return {k: np.asarray(v)[:, :longest] for k, v in group.items()}


def open_unlearning(cls, hparams, folder, ref_folder, host: dict, collate=()):
    """open-unlearning's step on `host`'s rows: the mean of its trainer's `compute_loss` over the
    micro-batches of GROUP rows, backpropagated into a fresh HF model of `folder` (returned). The
    groups in `collate` are cut to each micro-batch's longest row, as open-unlearning pads them;
    the others keep the step's padding (the retain KL's `batchmean` sees the padded length, a
    documented difference: docs/conventions.md).
    The trainer is built without HF Trainer's setup (compute_loss reads only the method's attributes)."""
    hf, ref = load_hf(folder), load_hf(ref_folder)
    trainer = cls.__new__(cls)
    ou_names = {"retain_loss": "retain_loss_type"}
    for k, v in hparams.items():
        setattr(trainer, ou_names.get(k, k), v)
    trainer.model, trainer.ref_model = hf, ref
    n = host["forget"]["input_ids"].shape[0]
    losses = []
    for lo in range(0, n, GROUP):
        rows = {k: {key: g[key][lo:lo + GROUP] for key in KEYS} for k, g in host.items()}
        rows = {k: _torch(_collated(g) if k in collate else g) for k, g in rows.items()}
        if "alternate" in rows:
            rows["forget"] = {"original": rows["forget"], "alternate": rows.pop("alternate")}
        losses.append(trainer.compute_loss(hf, rows))
    loss = torch.stack(losses).mean()
    loss.backward()
    return loss.item(), hf


def grad_differences(cfg, grads, hf, floor=1e-6):
    """Per HF parameter: max |ours - open-unlearning's| / max |open-unlearning's|, asserting RTOL
    (with an absolute floor of `floor` x the largest entry, for entries near zero)."""
    named, worst = dict(hf.named_parameters()), {}
    for spec in param_specs(cfg):
        ours = np.asarray(get_path(grads, spec.path))
        for i, name in enumerate(spec.hf_names(cfg.num_hidden_layers)):
            g = spec.to_hf(ours[i] if spec.stacked else ours)
            ref = named[name].grad.numpy()
            np.testing.assert_allclose(g, ref, rtol=RTOL, atol=floor * np.abs(ref).max() + 1e-9, err_msg=name)
            worst[name] = float(np.abs(g - ref).max() / np.abs(ref).max())
    return worst


def open_unlearning_on_batch(cls, hparams, hf, ref, batch):
    """open-unlearning's `compute_loss` on one padded micro-batch `batch` (as its collator would
    pad it, or not), backpropagated into `hf`; the loss. For tests that choose their own padding."""
    trainer = cls.__new__(cls)
    ou_names = {"retain_loss": "retain_loss_type"}
    for k, v in hparams.items():
        setattr(trainer, ou_names.get(k, k), v)
    trainer.model, trainer.ref_model = hf, ref
    inputs = {k: _torch(v) for k, v in batch.items() if k != "alternate"}
    if "alternate" in batch:
        inputs["forget"] = {"original": inputs["forget"], "alternate": _torch(batch["alternate"])}
    loss = trainer.compute_loss(hf, inputs)
    loss.backward()
    return loss.item()


def one_device(folder, ref_folder, obj, batch):
    """Our loss and gradients for one micro-batch `batch` (one loss group) on one device, through
    the step's `accumulated_grads`: (cfg, loss, grads). Asserts the method's own term is not lost
    in the total, so the comparison covers it."""
    cfg, params = load_hf_params(folder)
    _, ref_params = load_hf_params(ref_folder)
    graphdef, _ = split_params(abstract_model(cfg))
    stacked = jax.tree.map(lambda x: np.asarray(x)[None], batch)  # one micro-batch
    loss, aux, grads = accumulated_grads(graphdef, obj, params, ref_params if obj.needs_live_reference else None,
                                         stacked, units=1)
    assert abs(obj.gamma * float(aux["forget_loss"])) > 0.02 * abs(float(loss)), aux
    return cfg, float(loss), grads
