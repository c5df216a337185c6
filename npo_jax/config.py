"""Llama-3.x model config read from an HF `config.json`, in either dialect.

transformers 4.x writes `rope_theta` + `rope_scaling` and `torch_dtype`; transformers 5.x
writes `rope_parameters` (rope_type, rope_theta and the scaling fields) and `dtype`. Both are
read into one frozen dataclass; the raw dict is kept so that export can write back exactly the
dialect it read, changing only the dtype.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from npo_jax.errors import ConfigError

SUPPORTED_ROPE_TYPES = ("default", "llama3")
RMS_NORM_EPS = 1e-6  # transformers' LlamaConfig default, for a config.json without the field
_LLAMA3_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = RMS_NORM_EPS
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    dtype: str = "float32"  # the dtype the HF weights were saved in

    @property
    def num_query_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> LlamaConfig:
        """Validate and read an HF Llama config dict; errors name `source` and the field."""

        def fail(field: str, msg: str) -> ConfigError:
            return ConfigError(f"{source}: field '{field}' {msg}")

        model_type = raw.get("model_type", "llama")
        if model_type != "llama":
            raise fail("model_type", f"is {model_type!r}; only 'llama' is supported")
        for field in _REQUIRED:
            if not isinstance(raw.get(field), int) or raw[field] <= 0:
                raise fail(field, f"must be a positive integer, got {raw.get(field)!r}")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise fail("hidden_act", f"is {act!r}; only 'silu' (SwiGLU) is supported")
        if raw.get("pretraining_tp", 1) != 1:
            raise fail("pretraining_tp", f"is {raw['pretraining_tp']!r}; only 1 is supported")
        if raw.get("attention_dropout", 0.0) not in (0, 0.0):
            raise fail("attention_dropout", f"is {raw['attention_dropout']!r}; only 0.0 is supported")

        heads = raw["num_attention_heads"]
        kv_heads = raw.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise fail("num_key_value_heads", f"({kv_heads}) must divide num_attention_heads ({heads})")
        head_dim = raw.get("head_dim") or raw["hidden_size"] // heads

        rope = _read_rope(raw, fail)
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", RMS_NORM_EPS)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=raw.get("pad_token_id"),
            dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
            **rope,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> LlamaConfig:
        """Read and validate an HF `config.json` file; errors name its path."""
        return cls.from_hf_dict(read_config_dict(path), source=str(path))

    @classmethod
    def from_folder(cls, folder: str | Path) -> LlamaConfig:
        """The config of a model folder (HF or an npo-jax checkpoint): its `config.json`."""
        return cls.from_file(Path(folder) / "config.json")


def _read_rope(raw: dict[str, Any], fail) -> dict[str, Any]:
    """Rope fields from either dialect, as LlamaConfig keyword arguments."""
    if "rope_parameters" in raw and raw["rope_parameters"] is not None:
        params, where = dict(raw["rope_parameters"]), "rope_parameters"
        theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    else:
        params, where = dict(raw.get("rope_scaling") or {}), "rope_scaling"
        theta = raw.get("rope_theta", 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise fail(f"{where}.rope_type", f"is {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise fail(f"{where}.partial_rotary_factor", "must be 1.0")
    out: dict[str, Any] = {"rope_theta": float(theta), "rope_type": rope_type}
    if rope_type == "llama3":
        for field in _LLAMA3_FIELDS:
            if field not in params:
                raise fail(f"{where}.{field}", "is required for rope_type 'llama3'")
        if params["high_freq_factor"] <= params["low_freq_factor"]:
            raise fail(f"{where}.high_freq_factor", "must be larger than low_freq_factor")
        out.update(
            rope_factor=float(params["factor"]),
            rope_low_freq_factor=float(params["low_freq_factor"]),
            rope_high_freq_factor=float(params["high_freq_factor"]),
            rope_original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    return out


def read_config_dict(path: str | Path) -> dict[str, Any]:
    from npo_jax.fs import read_json_object

    return read_json_object(path, "config file", ConfigError)


def with_dtype(raw: dict[str, Any], dtype: str) -> dict[str, Any]:
    """The same config dict, in the same dialect, with its weight dtype set to `dtype`."""
    out = dict(raw)
    if "torch_dtype" in out or ("dtype" not in out and "rope_parameters" not in out):
        out["torch_dtype"] = dtype  # transformers 4.x dialect
    else:
        out["dtype"] = dtype  # transformers 5.x dialect
    return out
