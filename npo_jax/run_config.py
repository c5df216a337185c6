"""Typed run configs: YAML files under `configs/` + dotted command-line overrides (OmegaConf).

`load_run_config("configs/unlearn/tofu_llama3.2_3b_npo.yaml", ["optim.lr=1e-5"])` merges the file
and the overrides onto the dataclass schema below; an unknown key or a wrong type is an error
that lists the valid keys of that section.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from npo_jax.dtypes import DTYPES
from npo_jax.errors import NpoJaxError

METHODS = ("NPO", "SimNPO", "GradAscent", "GradDiff")  # fine-tuning is the `npo-jax finetune` command


@dataclass
class ModelConfig:
    path: str = MISSING  # HF model folder (converted on the fly) or Orbax checkpoint
    tokenizer: str | None = None  # folder with tokenizer files; default: model.path
    compute_dtype: str = "float32"  # bfloat16 on accelerators
    # dots: keep matmul outputs, recompute the elementwise ops in the backward pass; less memory
    # than none and, on XLA:CPU, faster too (docs/performance.md); full: the least memory (3B)
    remat: str = "dots"  # none | full | dots


@dataclass
class DataConfig:
    dir: str | None = None  # local TOFU folder (NAME.json / NAME.jsonl); None: download locuslab/TOFU
    tfds_dir: str | None = None  # where TFDS prepares array_record files; default: cache_dir/tfds
    forget_split: str = "forget10"
    retain_split: str = "retain90"
    finetune_split: str = "full"  # what `npo-jax finetune` trains on
    max_length: int = 512
    length_buckets: list[int] = field(default_factory=lambda: [128, 256, 512])
    system_prompt: str = "You are a helpful assistant."
    date_string: str = "10 Apr 2025"
    # open-unlearning's collator masks every <|eot_id|> (pad = eos); released TOFU models saw that
    eot_mask_quirk: bool = False


@dataclass
class MethodConfig:
    name: str = "NPO"  # NPO | SimNPO | GradAscent | GradDiff (unlearn only; finetune ignores method)
    beta: float = 0.1
    alpha: float = 1.0  # retain weight
    gamma: float = 1.0  # forget weight
    delta: float = 0.0  # SimNPO margin
    retain_loss: str = "NLL"  # NLL | KL
    reference: str = "cached"  # cached (forget log-probs computed once) | live (frozen copy)


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
    # 0: a NaN/inf loss or gradient stops the run (the last checkpoint is kept); N > 0: such an
    # update is skipped (params and optimizer state unchanged, counted in metrics), and the run
    # stops only after more than N in a row
    skip_nonfinite: int = 0


@dataclass
class ParallelConfig:
    strategy: str = "sharded"  # sharded (jit over a mesh) | pmap
    data: int = -1  # -1: all devices not used by fsdp x tensor
    fsdp: int = 1
    tensor: int = 1


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0: only at the end
    keep: int = 2
    export_hf: bool = True
    export_dtype: str | None = None  # default: the source model's dtype
    # sha256 of every checkpoint file, checked on restore (costs a read of the step, ~1 s/GB, per save)
    checksums: bool = True


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


def _valid_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            keys += _valid_keys(hint, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _check_choices(cfg: RunConfig) -> None:
    choices = {
        "model.compute_dtype": (cfg.model.compute_dtype, tuple(DTYPES)),
        "model.remat": (cfg.model.remat, ("none", "full", "dots")),
        "method.name": (cfg.method.name, METHODS),
        "method.retain_loss": (cfg.method.retain_loss, ("NLL", "KL")),
        "method.reference": (cfg.method.reference, ("cached", "live")),
        "parallel.strategy": (cfg.parallel.strategy, ("sharded", "pmap")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise NpoJaxError(f"config: {key}={value!r} is not one of {', '.join(allowed)}")
    if sorted(cfg.data.length_buckets) != cfg.data.length_buckets or cfg.data.length_buckets[-1] != cfg.data.max_length:
        raise NpoJaxError(f"config: data.length_buckets {cfg.data.length_buckets} must be increasing and end at "
                          f"data.max_length ({cfg.data.max_length})")


def load_run_config(path: str | Path | None, overrides: list[str] = (), **defaults) -> RunConfig:
    """Schema <- `defaults` <- YAML file <- dotted overrides, validated."""
    schema = OmegaConf.structured(RunConfig)
    try:
        layers = [schema, OmegaConf.create(defaults)]
        if path is not None:
            if not Path(path).is_file():
                raise NpoJaxError(f"{path}: config file not found")
            layers.append(OmegaConf.load(path))
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        cfg: RunConfig = OmegaConf.to_object(merged)
    except ConfigKeyError as e:
        raise NpoJaxError(f"config {path or ''}: unknown key '{e.full_key}'; valid keys: "
                          f"{', '.join(_valid_keys(RunConfig))}") from None
    except MissingMandatoryValue as e:
        raise NpoJaxError(f"config {path or ''}: '{e.full_key}' must be set") from None
    except OmegaConfBaseException as e:
        msg = str(e).splitlines()[0]
        raise NpoJaxError(f"config {path or ''}: {getattr(e, 'full_key', '')}: {msg}; valid keys: "
                          f"{', '.join(_valid_keys(RunConfig))}") from None
    _check_choices(cfg)
    return cfg


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
