"""RMU, representation misdirection (open-unlearning `trainer/unlearn/rmu.py`, configs/trainer/RMU.yaml).

The residual stream after decoder layer k (HF's output of `model.layers.k`, the module
`module_regex` matches) is pulled toward a fixed random control vector c on the forget rows:
forget = activation_loss(h_k, c); the retain term is EMBED_DIFF, activation_loss(h_k, h_k of the
frozen reference) on the retain rows, or GradDiff's NLL / KL; loss = gamma * forget + alpha * retain.

activation_loss: the squared difference averaged over the hidden dimension, summed over the
positions whose (unshifted) label is not -100 (the row sum s_i), over the row's count n_i.
open-unlearning divides the (b,) sums by the (b, 1) counts, which broadcasts to (b, b): its loss is
mean_i(s_i) * mean_i(1 / n_i) over the loss group, not mean_i(s_i / n_i). `rmu_broadcast_quirk`
(default true: open-unlearning's published RMU numbers were computed with it) picks that form;
false picks the per-sequence mean.

Only layers 0..k run for the activations (a scan over the first k + 1 stacked layers); with
EMBED_DIFF nothing above layer k runs at all. The reference's activations come from the live
frozen copy: they are (rows, length, hidden) per example, too large to cache the way the forget
log-probs are (a 3B model's layer output is 6 KiB per token).

`prepare` resolves what depends on the model: the layer, the control vector (from
`control_vec_path`, else drawn from the run seed), and which parameter slices the optimizer
updates: those `trainable_params_regex` selects that have a gradient path. PyTorch's AdamW skips a
parameter whose .grad is None (with EMBED_DIFF: the layers above k, the final norm, an untied
lm_head), weight decay included, so those stay unchanged here too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from npo_jax.data.tokenize import IGNORE
from npo_jax.errors import NpoJaxError
from npo_jax.fs import atomic_write
from npo_jax.losses import retain_loss_only
from npo_jax.methods.common import per_unit
from npo_jax.model import train_layer_output
from npo_jax.params import param_specs

NAME = "RMU"
HPARAMS = {"gamma": 1.0, "alpha": 1.0, "retain_loss": "EMBED_DIFF", "steering_coeff": 2.0,
           "module_regex": r"model\.layers\.7", "trainable_params_regex": [".*"], "control_vec_path": None,
           "rmu_broadcast_quirk": True}
RETAIN = True
RETAIN_LOSSES = ("EMBED_DIFF", "NLL", "KL")
FORGET_GROUPS = ("forget",)
REFERENCE_GROUPS = ()
CONTROL_VEC_FILE = "control_vec.npy"  # in the run folder: the vector the run used


def activation_loss(act, target, labels, units: int, quirk: bool):
    """Per unit: open-unlearning's `compute_activation_loss` (quirk) or the per-sequence mean.
    A row without labelled tokens counts 1 token (open-unlearning divides by zero)."""
    sq = jnp.mean(jnp.square(act.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)  # (n, L)
    mask = labels != IGNORE
    sums = jnp.sum(jnp.where(mask, sq, 0.0), axis=-1)
    counts = jnp.maximum(mask.sum(-1), 1).astype(jnp.float32)
    if quirk:
        return per_unit(sums, units).mean(1) * per_unit(1.0 / counts, units).mean(1)
    return per_unit(sums / counts, units).mean(1)


def objective(model, ref_model, batch: dict, obj, units: int, span: int = 1):
    """Per-unit losses and terms for one micro-batch (`npo_jax.losses.objective_loss`'s contract)."""
    if obj.rmu_layer < 0 or not obj.control_vec:
        raise ValueError("the RMU objective needs its layer and control vector: npo_jax.methods.rmu.prepare")
    if span > 1 and obj.rmu_broadcast_quirk:  # mean(1/n) over a group spanning units is not host-computed
        raise NpoJaxError("method.name=RMU with method.rmu_broadcast_quirk=true: optim.loss_group must not exceed "
                          "optim.per_device_batch (or set method.rmu_broadcast_quirk=false)")
    forget, retain, k = batch["forget"], batch["retain"], obj.rmu_layer
    n = forget["input_ids"].shape[0]

    def loss(act, target, group):
        return activation_loss(act, target, group["labels"], units, obj.rmu_broadcast_quirk)

    if obj.retain_loss == "EMBED_DIFF":  # one forward of layers 0..k over forget and retain rows
        acts = train_layer_output(model, *(jnp.concatenate([forget[key], retain[key]])
                                           for key in ("input_ids", "attention_mask")), k)
        forget_act = acts[:n]
        ref_act = train_layer_output(ref_model, retain["input_ids"], retain["attention_mask"], k)
        retain_loss = loss(acts[n:], jax.lax.stop_gradient(ref_act), retain)
    else:
        forget_act = train_layer_output(model, forget["input_ids"], forget["attention_mask"], k)
        retain_loss = retain_loss_only(model, ref_model, retain, obj, units, span)  # GradDiff's NLL / KL
    forget_loss = loss(forget_act, jnp.asarray(obj.control_vec, jnp.float32), forget)
    total = obj.gamma * forget_loss + obj.alpha * retain_loss
    return total, {"forget_loss": forget_loss, "retain_loss": retain_loss}


# -- what depends on the model: layer, control vector, trainable parameters -----------------------


def _compile(pattern: str, key: str):
    try:
        return re.compile(pattern)
    except re.error as e:
        raise NpoJaxError(f"method.{key}: {pattern!r} is not a regular expression ({e})") from None


def module_names(config) -> list[str]:
    """HF's `named_modules()` names of a LlamaForCausalLM (module_regex matches among them)."""
    names = {"", "model", "model.rotary_emb", "lm_head"}
    for spec in param_specs(config):
        for name in spec.hf_names(config.num_hidden_layers):
            parts = name.split(".")[:-1]
            names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    names.update(f"model.layers.{i}.mlp.act_fn" for i in range(config.num_hidden_layers))
    return sorted(names)


def layer_index(module_regex: str, config) -> int:
    """The decoder layer `module_regex` fullmatches, as open-unlearning's `_get_matching_module`
    (one module, else an error); RMU here steers a decoder layer's output only."""
    pattern = _compile(module_regex, "module_regex")
    matched = [name for name in module_names(config) if pattern.fullmatch(name)]
    if len(matched) != 1:
        raise NpoJaxError(f"method.module_regex={module_regex!r} must match exactly one module of the model; it "
                          f"matched {matched or 'none'} (the decoder layers are model.layers.0 .. "
                          f"model.layers.{config.num_hidden_layers - 1})")
    found = re.fullmatch(r"model\.layers\.(\d+)", matched[0])
    if found is None:
        raise NpoJaxError(f"method.module_regex={module_regex!r} matches {matched[0]!r}; RMU steers the output "
                          "of one decoder layer, model.layers.N")
    return int(found.group(1))


def read_control_vec(path: str | Path, hidden_size: int) -> np.ndarray:
    """A control vector from a JSON list or a .npy file: `hidden_size` finite numbers, used as is
    (already scaled, as open-unlearning's `get_control_vector` returns it)."""
    path = Path(path)
    want = f"method.control_vec_path={path}: expected a JSON list or .npy file of hidden_size={hidden_size} numbers"
    try:
        if path.suffix == ".npy":
            raw = np.load(path, allow_pickle=False)
        elif path.suffix == ".json":
            raw = json.loads(path.read_text())
        else:
            raise NpoJaxError(f"{want} (the file name must end in .json or .npy)")
        vec = np.asarray(raw, np.float64)
    except (OSError, ValueError, TypeError) as e:
        raise NpoJaxError(f"{want} ({type(e).__name__}: {e})") from None
    if vec.size != hidden_size or vec.squeeze().ndim > 1:
        raise NpoJaxError(f"{want}; it holds shape {list(vec.shape)}")
    if not np.all(np.isfinite(vec)):
        raise NpoJaxError(f"{want}; it holds a non-finite value")
    return vec.reshape(hidden_size).astype(np.float32)


def control_vector(method, hidden_size: int, seed: int) -> np.ndarray:
    """`method.control_vec_path`'s vector, else open-unlearning's recipe drawn from the run seed:
    u = jax.random.uniform(jax.random.key(seed), (hidden_size,)) (float32, [0, 1)),
    c = u / |u| * steering_coeff."""
    if method.control_vec_path is not None:
        return read_control_vec(method.control_vec_path, hidden_size)
    u = jax.random.uniform(jax.random.key(seed), (hidden_size,), jnp.float32)
    return np.asarray(u / jnp.linalg.norm(u) * method.steering_coeff, np.float32)


def update_mask(config, regexes, retain_loss: str, layer: int) -> dict:
    """Per parameter, True where the optimizer updates it (stacked: one entry per layer, shaped to
    broadcast): selected by a `trainable_params_regex` (fullmatch on the HF name) and reached by
    the loss's gradient (with EMBED_DIFF: embeddings and layers 0..layer only)."""
    patterns = [_compile(p, "trainable_params_regex") for p in regexes]
    full_forward = retain_loss != "EMBED_DIFF"
    mask, chosen = {}, 0
    for spec in param_specs(config):
        names = spec.hf_names(config.num_hidden_layers)
        on = [any(p.fullmatch(name) for p in patterns) for name in names]
        chosen += sum(on)
        if spec.stacked:
            on = [sel and (full_forward or i <= layer) for i, sel in enumerate(on)]
            value = np.asarray(on).reshape(len(on), *[1] * len(spec.shape))
        else:
            reached = full_forward or spec.path[0] == "embed_tokens"
            value = np.asarray(on[0] and reached).reshape([1] * len(spec.shape))
        node = mask
        for key in spec.path[:-1]:
            node = node.setdefault(key, {})
        node[spec.path[-1]] = value
    if not chosen:
        raise NpoJaxError(f"method.trainable_params_regex={list(regexes)} selects no parameter (HF names such as "
                          f"{param_specs(config)[1].hf_names(config.num_hidden_layers)[0]})")
    return mask


def prepare(obj, config, method, seed: int):
    """(the objective with its layer and control vector, the optimizer's update mask)."""
    layer = layer_index(method.module_regex, config)
    vec = control_vector(method, config.hidden_size, seed)
    mask = update_mask(config, method.trainable_params_regex, method.retain_loss, layer)
    return obj._replace(rmu_layer=layer, control_vec=tuple(float(x) for x in vec)), mask


def write_run_files(obj, out: Path) -> None:
    """The control vector the run used, so another framework can reproduce the run."""
    atomic_write(Path(out) / CONTROL_VEC_FILE, lambda p: np.save(p, np.asarray(obj.control_vec, np.float32)))
