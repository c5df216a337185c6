"""LoRA adapters on the scanned Llama stack, as PEFT's `LoraConfig` defines them (docs/lora.md).

The adapter layer itself is a few lines in `model.Linear` (y += alpha/rank * (dropout(x) @ A) @ B,
A and B `nnx.LoRAParam` with the layer axis first, so the decoder's `lax.scan` slices them with
the base weights). This module holds what surrounds it:
- `LoraSpec` from the run config's `lora` section (rank 0: no LoRA);
- the adapter tree: paths `layers/{self_attn,mlp}/PROJ/lora_a` (layers, in, rank) and `lora_b`
  (layers, rank, out), the transposes of PEFT's `lora_A.weight` (rank, in) / `lora_B.weight`
  (out, rank); `init_adapters` is PEFT's default init (A kaiming-uniform, B zero);
- `split_adapters` / `join`: the trained params are the adapters alone; the base params are a
  frozen input of the step, never differentiated;
- `LoraModel`: builds the trained model (base + adapters) and the reference, which is the same
  base params through the graph without adapters: a live reference costs no second copy;
- `base_checksum`: the record that ties an adapter checkpoint to the base model it was trained on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from npo_jax.config import LlamaConfig
from npo_jax.errors import NpoJaxError
from npo_jax.fs import file_checksum
from npo_jax.model import abstract_model, merge_params, split_params
from npo_jax.run_config import LORA_TARGETS
from npo_jax.tree_paths import get_path, iter_paths, set_path

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
TARGETS = ATTENTION_TARGETS + MLP_TARGETS
assert TARGETS == LORA_TARGETS
ADAPTER_LEAVES = ("lora_a", "lora_b")
KEY_LEAF = "lora_key"  # model.LoRADropoutKey: set per micro-batch, not a parameter


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """PEFT's LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, section) -> LoraSpec | None:
        """The spec of a `run_config.LoraConfig`, or None when `rank` is 0 (LoRA off)."""
        if not section.rank:
            return None
        return cls(section.rank, float(section.alpha), float(section.dropout), tuple(section.targets))

    def without_dropout(self) -> LoraSpec:
        """The same adapters for evaluation (dropout is a training-time operation)."""
        return dataclasses.replace(self, dropout=0.0)


def module_path(target: str) -> tuple[str, str, str]:
    """Our path of projection `target` in the layer stack: ("layers", "self_attn" | "mlp", target)."""
    return ("layers", "self_attn" if target in ATTENTION_TARGETS else "mlp", target)


def adapter_shapes(cfg: LlamaConfig, spec: LoraSpec) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Every adapter's path and stored shape (layer axis first)."""
    d, inter = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    dims = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, inter), "up_proj": (d, inter), "down_proj": (inter, d)}
    n, r = cfg.num_hidden_layers, spec.rank
    out = {}
    for t in spec.targets:
        d_in, d_out = dims[t]
        out[(*module_path(t), "lora_a")] = (n, d_in, r)
        out[(*module_path(t), "lora_b")] = (n, r, d_out)
    return out


def init_adapters(cfg: LlamaConfig, spec: LoraSpec, seed: int) -> dict:
    """PEFT's default init (init_lora_weights=True) from `seed`: lora_A kaiming-uniform with a=sqrt(5),
    i.e. U(-1/sqrt(in), 1/sqrt(in)), and lora_B zero, so training starts at the base model. float32."""
    rng = np.random.default_rng(seed)
    adapters: dict = {}
    for path, shape in adapter_shapes(cfg, spec).items():
        if path[-1] == "lora_a":
            bound = 1.0 / np.sqrt(shape[1])
            value = rng.uniform(-bound, bound, shape).astype(np.float32)
        else:
            value = np.zeros(shape, np.float32)
        set_path(adapters, path, value)
    return adapters


def split_adapters(params: dict) -> tuple[dict, dict]:
    """(base params, adapters) of a params tree of a model with LoRA (dropout keys dropped)."""
    base, adapters = {}, {}
    for path, leaf in iter_paths(params):
        if path[-1] in ADAPTER_LEAVES:
            set_path(adapters, path, leaf)
        elif path[-1] != KEY_LEAF:
            set_path(base, path, leaf)
    return base, adapters


def join(base: dict, *parts: dict) -> dict:
    """One params tree of `base` and the extra leaves of `parts` (adapters, dropout keys); no copies."""
    out: dict = {}
    for tree in (base, *parts):
        for path, leaf in iter_paths(tree):
            set_path(out, path, leaf)
    return out


def adapter_partition_specs(base_specs: dict, spec: LoraSpec) -> dict:
    """Each adapter sharded like its base kernel on the dimension they share (A: the input, B: the
    output), the rank dimension whole; `base_specs`: the params' PartitionSpec tree."""
    out: dict = {}
    for t in spec.targets:
        layer, d_in, d_out = get_path(base_specs, (*module_path(t), "kernel"))
        set_path(out, (*module_path(t), "lora_a"), PartitionSpec(layer, d_in, None))
        set_path(out, (*module_path(t), "lora_b"), PartitionSpec(layer, None, d_out))
    return out


def adapter_shardings(base_specs: dict, spec: LoraSpec, mesh) -> dict:
    return jax.tree.map(lambda p: NamedSharding(mesh, p), adapter_partition_specs(base_specs, spec),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


class LoraModel:
    """The step's model builder with LoRA: the trained params are the adapters, the frozen params the
    base model. `models` gives (base + adapters, base alone): the reference shares the base arrays.

    With dropout, each adapter's per-layer keys come from the micro-batch key the step passes
    (`npo_jax.train_step`: seed, step, micro-batch and, under pmap, device)."""

    def __init__(self, cfg: LlamaConfig, spec: LoraSpec, *, compute_dtype, remat: str, seed: int = 0):
        self.config, self.spec, self.seed = cfg, spec, seed
        self.graphdef, full = split_params(abstract_model(cfg, compute_dtype=compute_dtype, remat=remat, lora=spec))
        self.base_graphdef, _ = split_params(abstract_model(cfg, compute_dtype=compute_dtype, remat=remat))
        self.key_paths = [path for path, _ in iter_paths(full) if path[-1] == KEY_LEAF]

    @property
    def dropout(self) -> bool:
        return self.spec.dropout > 0

    def dropout_keys(self, key) -> dict:
        """Per-layer raw keys (layers, 2) for every adapter's dropout, from one micro-batch `key`."""
        keys: dict = {}
        n = self.config.num_hidden_layers
        for i, path in enumerate(self.key_paths):
            set_path(keys, path, jax.random.split(jax.random.fold_in(key, i), n))
        return keys

    def models(self, adapters: dict, base: dict, key=None):
        """(the model with adapters, the reference: the base model without them)."""
        parts = [adapters] + ([self.dropout_keys(key)] if self.dropout else [])
        return merge_params(self.graphdef, join(base, *parts)), merge_params(self.base_graphdef, base)


def merge_adapters(base: dict, adapters: dict, scale: float) -> dict:
    """The base params with the adapters merged in, as PEFT's `merge_and_unload` and the export do:
    each adapted kernel W + scale * A B in float32 (our (layers, in, out) layout); a new dict, the
    other params as they are."""
    out = jax.tree.map(lambda x: x, base)
    for path, leaf in iter_paths(adapters):
        if path[-1] != "lora_a":
            continue
        kernel = (*path[:-1], "kernel")
        a, b = np.asarray(leaf, np.float32), np.asarray(get_path(adapters, (*path[:-1], "lora_b")), np.float32)
        set_path(out, kernel, np.asarray(get_path(base, kernel), np.float32) + np.float32(scale) * (a @ b))
    return out


def base_checksum(path: str | Path) -> str:
    """sha256 naming the base model's weights: over the sha256 of config.json and every
    *.safetensors file of an HF folder, or over the checksum manifest(s) an Orbax params or training
    checkpoint carries (its files' sha256, written when it was saved)."""
    path = Path(path)
    if any(path.glob("*.safetensors")):
        files = ["config.json", *sorted(p.name for p in path.glob("*.safetensors"))]
        digests = {name: file_checksum(path / name)["sha256"] for name in files}
    else:
        manifests = sorted(path.glob("npo_jax_checksums.json")) or sorted(
            path.glob("*/npo_jax_checksums.json"), key=lambda m: (len(m.parent.name), m.parent.name))
        if not manifests:
            raise NpoJaxError(f"model.path {path}: no safetensors files and no npo_jax_checksums.json to identify "
                              "the base model of a LoRA run by")
        digests = {str(m.relative_to(path)): file_checksum(m)["sha256"] for m in manifests[-1:]}
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


RECORD = "npo_jax_lora.json"  # beside a LoRA run's step folders: what the adapters are and what base they need


def write_record(folder: Path, spec: LoraSpec, base_model: dict) -> None:
    """Record the adapters' spec and the base model ({"path", "sha256"}) in `folder`."""
    record = {"format": "npo-jax-lora", "version": 1, "rank": spec.rank, "alpha": spec.alpha,
              "dropout": spec.dropout, "targets": list(spec.targets), "base_model": base_model}
    (Path(folder) / RECORD).write_text(json.dumps(record, indent=2) + "\n")


def read_record(folder: Path) -> tuple[LoraSpec, dict] | None:
    """(spec, base model record) of a LoRA run's checkpoints folder, or None when it holds a full model."""
    path = Path(folder) / RECORD
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        spec = LoraSpec(int(raw["rank"]), float(raw["alpha"]), float(raw["dropout"]), tuple(raw["targets"]))
        base = {"path": str(raw["base_model"]["path"]), "sha256": str(raw["base_model"]["sha256"])}
    except (ValueError, KeyError, TypeError) as e:
        raise NpoJaxError(f"{path}: not a readable LoRA record ({type(e).__name__}: {e})") from None
    return spec, base


def check_base(record_base: dict, base: str | Path | None = None, where: str = "") -> Path:
    """The base model folder (`base`, default the recorded path), once its sha256 matches the record."""
    folder = Path(base if base is not None else record_base["path"])
    if not folder.is_dir():
        raise NpoJaxError(f"{where}the LoRA base model {folder} is not there (pass the base model's folder)")
    if base_checksum(folder) != record_base["sha256"]:
        raise NpoJaxError(f"{where}the base model {folder} is not the one the adapters were trained on "
                          f"(sha256 {record_base['sha256'][:16]}... recorded, {base_checksum(folder)[:16]}... found)")
    return folder


PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def peft_name(path: tuple[str, ...], layer: int) -> str:
    """PEFT's saved name of adapter `path` (layers/self_attn/q_proj/lora_a) of one layer."""
    ab = {"lora_a": "lora_A", "lora_b": "lora_B"}[path[-1]]
    return f"base_model.model.model.layers.{layer}.{path[1]}.{path[2]}.{ab}.weight"


def load_peft_adapters(folder: str | Path, cfg: LlamaConfig, spec: LoraSpec, where: str = "lora.init_from") -> dict:
    """Adapters from a PEFT LoRA folder (adapter_config.json, adapter_model.safetensors) as our float32
    tree; its r, lora_alpha and target_modules must be the run's `lora` section's."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    config_path, weights_path = folder / PEFT_CONFIG, folder / PEFT_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise NpoJaxError(f"{where}={folder}: not a PEFT adapter folder ({PEFT_CONFIG} and {PEFT_WEIGHTS} expected)")
    raw = json.loads(config_path.read_text())
    targets = raw.get("target_modules") or []
    theirs = (raw.get("peft_type"), raw.get("r"), float(raw.get("lora_alpha", 0)),
              sorted(targets) if isinstance(targets, list) else targets)
    ours = ("LORA", spec.rank, spec.alpha, sorted(spec.targets))
    if theirs != ours:
        raise NpoJaxError(f"{config_path}: peft_type, r, lora_alpha, target_modules are {theirs}; the run's lora "
                          f"section has {ours} (set lora.rank, lora.alpha, lora.targets to the adapter's)")
    tensors = load_file(str(weights_path))
    adapters: dict = {}
    for path, shape in adapter_shapes(cfg, spec).items():
        layers = []
        for i in range(shape[0]):
            name = peft_name(path, i)
            if name not in tensors:
                raise NpoJaxError(f"{weights_path}: no tensor {name}")
            layers.append(np.asarray(tensors[name], np.float32).T)
        stacked = np.stack(layers)
        if stacked.shape != shape:
            raise NpoJaxError(f"{weights_path}: {peft_name(path, 0)} has shape {list(stacked.shape[1:][::-1])}, "
                              f"expected {list(shape[1:][::-1])} for this model")
        set_path(adapters, path, stacked)
    return adapters
