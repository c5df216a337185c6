"""Typed run configs: YAML files under `configs/` + dotted command-line overrides (OmegaConf).

`load_run_config("configs/unlearn/tofu_llama3.2_3b_npo.yaml", ["optim.lr=1e-5"])` merges the file
and the overrides onto the dataclass schema below; an unknown key, a wrong type, a value not among
a field's choices (`Literal` fields) or outside its range (`RANGES`) is an error naming the field,
raised here, before anything is loaded or written.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

from npo_jax import methods
from npo_jax.dtypes import DTYPES
from npo_jax.errors import NpoJaxError

METHODS = methods.NAMES  # open-unlearning trainer names; fine-tuning is the `npo-jax finetune` command
# compute dtypes: one set of names for training, `npo-jax eval`, audit and sweep
COMPUTE_DTYPES = tuple(DTYPES)
FORGET_SPLITS = ("forget01", "forget05", "forget10")
RETAIN_SPLITS = ("retain90", "retain95", "retain99")
QA_SPLITS = ("full", *FORGET_SPLITS, *RETAIN_SPLITS, "holdout01", "holdout05", "holdout10")


@dataclass
class ModelConfig:
    path: str = MISSING  # HF model folder (converted on the fly) or Orbax checkpoint
    tokenizer: str | None = None  # folder with tokenizer files; default: model.path
    compute_dtype: Literal[COMPUTE_DTYPES] = "float32"  # bfloat16 on accelerators
    # dots: keep matmul outputs, recompute the elementwise ops in the backward pass; less memory
    # than none and, on XLA:CPU, faster too (docs/performance.md); full: the least memory (3B)
    remat: Literal["none", "full", "dots"] = "dots"


@dataclass
class DataConfig:
    dir: str | None = None  # local TOFU folder (NAME.json / NAME.jsonl); None: download locuslab/TOFU
    tfds_dir: str | None = None  # where TFDS prepares array_record files; default: cache_dir/tfds
    forget_split: Literal[FORGET_SPLITS] = "forget10"
    retain_split: Literal[RETAIN_SPLITS] = "retain90"
    finetune_split: Literal[QA_SPLITS] = "full"  # what `npo-jax finetune` trains on
    # fixed: each forget item has one retain partner for the whole run; fresh: a new one each time
    # the item is used (each epoch), as open-unlearning's ForgetRetainDataset draws (docs/conventions.md)
    retain_pairing: Literal["fixed", "fresh"] = "fixed"
    max_length: int = 512
    length_buckets: list[int] = field(default_factory=lambda: [128, 256, 512])
    system_prompt: str = "You are a helpful assistant."
    date_string: str = "10 Apr 2025"
    # true: open-unlearning's mask, which also hides every <|eot_id|> (pad = eos; released TOFU models
    # saw it); false: padding only; null: the model's recorded convention, open-unlearning's for a
    # model without a record (npo_jax.mask_convention)
    eot_mask_quirk: bool | None = None
    # DPO's "I don't know" answers, one per line (TOFU's idontknow.jsonl); open-unlearning's idk_path
    idk_path: str | None = None


@dataclass
class MethodConfig:
    """One section for every method (`npo_jax.methods`): a key the chosen method does not read is
    an error unless left at its value here; a key it reads and the config leaves unset takes the
    method's default (open-unlearning's `method_args` default, `npo_jax.methods.*.HPARAMS`)."""

    name: Literal[METHODS] = "NPO"  # unlearn only; `npo-jax finetune` has no method
    beta: float = 0.1
    alpha: float = 1.0  # retain weight
    gamma: float = 1.0  # forget weight
    delta: float = 0.0  # SimNPO margin
    # open-unlearning's retain_loss_type; EMBED_DIFF (RMU only): layer activations pulled to the reference's
    retain_loss: Literal["NLL", "KL", "EMBED_DIFF"] = "NLL"
    reference: Literal["cached", "live"] = "cached"  # cached (forget log-probs computed once) | live (frozen copy)
    beta1: float = 5.0  # SatImp: the saturation weight's exponent
    beta2: float = 1.0  # SatImp: the importance weight's exponent
    ignore_first_n_answer_tokens: int = 1  # CEU: labelled tokens of each row left out of the loss
    # UNDIAL, open-unlearning's defects (on by the method's defaults; docs/methods.md): a mean over
    # every padded position of the loss group, and the teacher's token vocab-100 lowered where unlabelled
    all_positions_mean: bool = False
    wrapped_ignore_index: bool = False
    # PDU (docs/methods.md): the retain constraint's bound (required), the dual's updates
    retain_loss_eps: float = 0.0
    primal_dual: bool = True
    dual_step_size: float = 1.0
    dual_update_upon: Literal["step", "epoch"] = "step"
    dual_warmup_epochs: int = 5
    loss_names: list[str] = field(default_factory=lambda: ["forget_loss", "retain_loss"])
    # true: open-unlearning's forget logits, unshifted (position t for label t), as its PDU runs
    logit_shift_quirk: bool = True
    steering_coeff: float = 2.0  # RMU: the control vector's norm
    module_regex: str = r"model\.layers\.7"  # RMU: the decoder layer steered (fullmatch over HF module names)
    # RMU: HF parameter names (fullmatch) the optimizer updates; the rest stay bit-identical
    trainable_params_regex: list[str] = field(default_factory=lambda: [".*"])
    control_vec_path: str | None = None  # RMU: the control vector (JSON list or .npy); None: drawn from the seed
    # RMU: open-unlearning's activation loss, mean(row sums) * mean(1 / row counts) over the loss group
    # (a [b] / [b, 1] broadcast); false: the per-sequence mean (docs/methods.md)
    rmu_broadcast_quirk: bool = True


@dataclass
class OptimConfig:
    lr: float = 1e-5
    epochs: int = 5
    warmup_epochs: float = 1.0
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    effective_batch: int = 32  # per_device_batch x grad_accum x data-parallel devices
    per_device_batch: int = 4
    # examples per loss group (open-unlearning's per_device_train_batch_size): token means are taken
    # per group, the step's loss is the mean over groups, whatever the devices and accumulation;
    # 0: per_device_batch. It must divide per_device_batch or be a multiple of it.
    loss_group: int = 0
    # drop: each epoch is len // effective_batch steps of its own order, the rest unused; stream:
    # the epochs' orders as one stream cut into steps, as HF Trainer runs them (docs/conventions.md)
    epoch_mode: Literal["drop", "stream"] = "drop"
    # 0: a NaN/inf loss or gradient stops the run (the last checkpoint is kept); N > 0: such an
    # update is skipped (params and optimizer state unchanged, counted in metrics), and the run
    # stops only after more than N in a row
    skip_nonfinite: int = 0


@dataclass
class ParallelConfig:
    strategy: Literal["sharded", "pmap"] = "sharded"  # jit over a mesh, or pmap
    data: int = -1  # -1: all devices not used by fsdp x tensor
    fsdp: int = 1
    tensor: int = 1


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0: only at the end
    keep: int = 2
    export_hf: bool = True
    export_dtype: Literal[COMPUTE_DTYPES] | None = None  # default: the source model's dtype
    # sha256 of every checkpoint file, checked on restore (costs a read of the step, ~1 s/GB, per save)
    checksums: bool = True


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraConfig:
    """LoRA adapters (docs/lora.md), PEFT's LoraConfig: r, lora_alpha, lora_dropout, target_modules."""

    rank: int = 0  # 0: no LoRA, every parameter trained
    alpha: float = 16.0  # the adapters' output is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input, training only
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    base_dtype: Literal[COMPUTE_DTYPES] = "float32"  # the frozen base weights (adapters are float32)
    init_from: str | None = None  # a PEFT adapter folder to start from; None: PEFT's init (B = 0) from the seed


@dataclass
class RunConfig:
    output_dir: str = MISSING
    seed: int = 0
    cache_dir: str | None = None  # prepared data and reference log-probs; default ~/.cache/npo_jax
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


def _valid_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            keys += _valid_keys(hint, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


# the allowed range of every numeric field: (lowest, highest), None for no bound; a bound in a
# set ({0}) is excluded. Checked once, where the config loads, so no bad value reaches the trainer
# (beta 0 divides by zero, a batch of 0 too, a negative lr or alpha trains the wrong way).
RANGES = {
    "seed": (0, None),
    "data.max_length": (1, None),
    "method.beta": ({0}, None),
    "method.alpha": (0, None),
    "method.gamma": (0, None),
    "method.delta": (None, None),
    "method.beta1": (0, None),
    "method.beta2": (0, None),
    "method.ignore_first_n_answer_tokens": (0, None),
    "method.retain_loss_eps": (None, None),
    "method.dual_step_size": (0, None),
    "method.dual_warmup_epochs": (0, None),
    "method.steering_coeff": ({0}, None),
    "optim.lr": ({0}, None),
    "optim.epochs": (1, None),
    "optim.warmup_epochs": (0, None),
    "optim.weight_decay": (0, None),
    "optim.max_grad_norm": ({0}, None),
    "optim.b1": (0, {1}),
    "optim.b2": (0, {1}),
    "optim.eps": ({0}, None),
    "optim.effective_batch": (1, None),
    "optim.per_device_batch": (1, None),
    "optim.loss_group": (0, None),
    "optim.skip_nonfinite": (0, None),
    "parallel.fsdp": (1, None),
    "parallel.tensor": (1, None),
    "checkpoint.every_steps": (0, None),
    "checkpoint.keep": (1, None),
    "lora.rank": (0, None),
    "lora.alpha": ({0}, None),
    "lora.dropout": (0, {1}),
}


def range_text(lo, hi) -> str:
    """(lo, hi) of RANGES as words: '> 0', '>= 0 and < 1'."""
    parts = [f"{'>' if isinstance(b, set) else '>='} {_bound(b)}" for b in (lo,) if b is not None]
    parts += [f"{'<' if isinstance(b, set) else '<='} {_bound(b)}" for b in (hi,) if b is not None]
    return " and ".join(parts) or "a finite number"


def _bound(b):
    return next(iter(b)) if isinstance(b, set) else b


def in_range(value, lo, hi) -> bool:
    if not math.isfinite(value):
        return False
    low_ok = lo is None or (value > _bound(lo) if isinstance(lo, set) else value >= lo)
    return low_ok and (hi is None or (value < _bound(hi) if isinstance(hi, set) else value <= hi))


def check_range(name: str, value, lo, hi, prefix: str = "config: ") -> None:
    if not in_range(value, lo, hi):
        raise NpoJaxError(f"{prefix}{name}={value} is out of range: it must be {range_text(lo, hi)}")


def _check_loss_group(o: OptimConfig, where: str) -> None:
    """optim.loss_group against the batch sizes (the device count is checked by the placement)."""
    if not o.loss_group:
        return
    g, b = o.loss_group, o.per_device_batch
    if b % g and g % b:
        raise NpoJaxError(f"{where}: optim.loss_group={g} and optim.per_device_batch={b}: one must divide the other")
    if o.effective_batch % g:
        raise NpoJaxError(f"{where}: optim.effective_batch={o.effective_batch} is not a multiple of "
                          f"optim.loss_group={g}")


def _resolve_method(cfg: RunConfig, given, where: str) -> None:
    """Fill the method's unset hyperparameters with its defaults; reject a set key it does not read.
    `given`: the `method` keys the config file, overrides and caller's defaults set."""
    hparams = methods.get(cfg.method.name).HPARAMS
    schema = MethodConfig()
    for key in given:
        if key != "name" and key not in hparams and getattr(cfg.method, key) != getattr(schema, key):
            raise NpoJaxError(f"{where}: method.{key} is not a hyperparameter of method.name={cfg.method.name} "
                              f"(its keys: {', '.join(hparams) or 'none'})")
    for key, default in hparams.items():
        if key not in given:
            if default == methods.REQUIRED:
                raise NpoJaxError(f"{where}: method.{key} must be set for method.name={cfg.method.name} (it has "
                                  "no default; docs/methods.md)")
            setattr(cfg.method, key, default)
    allowed = getattr(methods.get(cfg.method.name), "RETAIN_LOSSES", ("NLL", "KL"))
    if "retain_loss" in hparams and cfg.method.retain_loss not in allowed:
        raise NpoJaxError(f"{where}: method.retain_loss={cfg.method.retain_loss} is not a retain loss of "
                          f"method.name={cfg.method.name} (choose from {', '.join(allowed)})")
    if (check := getattr(methods.get(cfg.method.name), "check_config", None)) is not None:
        check(cfg.method, where)
    if "alternate" in methods.get(cfg.method.name).FORGET_GROUPS and cfg.data.idk_path is None:
        raise NpoJaxError(f"{where}: method.name={cfg.method.name} needs data.idk_path (the refusals, one per "
                          "line: TOFU's idontknow.jsonl)")


def _check_regexes(m: MethodConfig, where: str) -> None:
    """RMU's regexes compile (the modules and parameters they select are checked against the model)."""
    for key, patterns in (("module_regex", [m.module_regex]), ("trainable_params_regex", m.trainable_params_regex)):
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as e:
                raise NpoJaxError(f"{where}: method.{key}: {pattern!r} is not a regular expression ({e})") from None


def _check_values(cfg: RunConfig, where: str) -> None:
    for key, (lo, hi) in RANGES.items():
        section, _, name = key.rpartition(".")
        check_range(key, getattr(getattr(cfg, section) if section else cfg, name), lo, hi, f"{where}: ")
    _check_loss_group(cfg.optim, where)
    _check_regexes(cfg.method, where)
    if cfg.parallel.data != -1 and cfg.parallel.data < 1:
        raise NpoJaxError(f"{where}: parallel.data={cfg.parallel.data} is out of range: it must be -1 (all devices "
                          "not used by fsdp x tensor) or >= 1")
    targets = cfg.lora.targets
    bad = [t for t in targets if t not in LORA_TARGETS]
    if cfg.lora.rank and (bad or not targets or len(set(targets)) != len(targets)):
        raise NpoJaxError(f"{where}: lora.targets {list(targets)} must be distinct names among "
                          f"{', '.join(LORA_TARGETS)}, at least one{'; unknown: ' + ', '.join(bad) if bad else ''}")
    buckets = cfg.data.length_buckets
    if not buckets or sorted(set(buckets)) != buckets or buckets[0] < 1 or buckets[-1] != cfg.data.max_length:
        raise NpoJaxError(f"{where}: data.length_buckets {buckets} must be increasing, positive and end at "
                          f"data.max_length ({cfg.data.max_length})")


def load_run_config(path: str | Path | None, overrides: list[str] = (), **defaults) -> RunConfig:
    """Schema <- `defaults` <- YAML file <- dotted overrides, validated."""
    schema = OmegaConf.structured(RunConfig)
    where = f"config {path}" if path is not None else "config"
    try:
        layers = [schema, OmegaConf.create(defaults)]
        if path is not None:
            if not Path(path).is_file():
                raise NpoJaxError(f"{path}: config file not found")
            layers.append(OmegaConf.load(path))
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        cfg: RunConfig = OmegaConf.to_object(merged)
        given = list(OmegaConf.merge(*layers[1:]).get("method") or {})
    except yaml.YAMLError as e:
        raise NpoJaxError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None
    except ConfigKeyError as e:
        raise NpoJaxError(f"{where}: unknown key '{e.full_key}'; valid keys: "
                          f"{', '.join(_valid_keys(RunConfig))}") from None
    except MissingMandatoryValue as e:
        raise NpoJaxError(f"{where}: '{e.full_key}' must be set") from None
    except ValidationError as e:  # a value of the wrong type or not among a Literal field's choices
        raise NpoJaxError(f"{where}: {e.full_key}: {str(e).splitlines()[0]}") from None
    except OmegaConfBaseException as e:
        msg = str(e).splitlines()[0]
        raise NpoJaxError(f"{where}: {getattr(e, 'full_key', '')}: {msg}; valid keys: "
                          f"{', '.join(_valid_keys(RunConfig))}") from None
    _resolve_method(cfg, given, where)
    _check_values(cfg, where)
    return cfg


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
