"""The model's parameter table: every parameter's path in our tree, its shape and its HF name.

Each entry says where a parameter lives in our nested dict, which HF tensor(s) it comes from
(one per layer when stacked), and whether the kernel is transposed (torch Linear stores
(out, in); our kernels are (in, out)). No q/k permutation: our RoPE is HF's rotate-half. The
converters read it in both directions; sharding, checkpoints and tests read shapes and paths.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from npo_jax.config import LlamaConfig

# Known non-parameter buffers some older HF checkpoints carry; skipped on import.
IGNORED_HF_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    path: tuple[str, ...]  # our nested-dict path
    hf_name: str  # HF name; "{i}" is the layer index when stacked
    shape: tuple[int, ...]  # our shape for one layer (without the layer axis)
    transpose: bool
    stacked: bool

    def hf_names(self, num_layers: int) -> list[str]:
        if not self.stacked:
            return [self.hf_name]
        return [self.hf_name.format(i=i) for i in range(num_layers)]

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape)) if self.transpose else self.shape

    def to_hf(self, array: np.ndarray) -> np.ndarray:
        return array.T if self.transpose else array

    def from_hf(self, array: np.ndarray) -> np.ndarray:
        return array.T if self.transpose else array


def param_specs(cfg: LlamaConfig) -> list[ParamSpec]:
    """Every parameter of the model described by `cfg`, in HF's order."""
    d, inter, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q_out = cfg.num_attention_heads * cfg.head_dim
    kv_out = cfg.num_key_value_heads * cfg.head_dim
    specs = [ParamSpec(("embed_tokens", "embedding"), "model.embed_tokens.weight", (vocab, d), False, False)]

    def layer(path, name, shape, transpose):
        specs.append(ParamSpec(("layers", *path), f"model.layers.{{i}}.{name}", shape, transpose, True))

    for proj, out in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out), ("o_proj", d)):
        d_in = q_out if proj == "o_proj" else d
        layer(("self_attn", proj, "kernel"), f"self_attn.{proj}.weight", (d_in, out), True)
        if cfg.attention_bias:
            layer(("self_attn", proj, "bias"), f"self_attn.{proj}.bias", (out,), False)
    for proj, d_in, out in (("gate_proj", d, inter), ("up_proj", d, inter), ("down_proj", inter, d)):
        layer(("mlp", proj, "kernel"), f"mlp.{proj}.weight", (d_in, out), True)
        if cfg.mlp_bias:
            layer(("mlp", proj, "bias"), f"mlp.{proj}.bias", (out,), False)
    layer(("input_layernorm", "scale"), "input_layernorm.weight", (d,), False)
    layer(("post_attention_layernorm", "scale"), "post_attention_layernorm.weight", (d,), False)
    specs.append(ParamSpec(("norm", "scale"), "model.norm.weight", (d,), False, False))
    if not cfg.tie_word_embeddings:
        specs.append(ParamSpec(("lm_head", "kernel"), "lm_head.weight", (d, vocab), True, False))
    return specs


def stored_shape(spec: ParamSpec, cfg: LlamaConfig) -> tuple[int, ...]:
    """Shape of the parameter in our tree (layer axis first when stacked)."""
    return (cfg.num_hidden_layers, *spec.shape) if spec.stacked else spec.shape


def hf_tensor_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name the model has, with its torch shape."""
    return {name: spec.hf_shape for spec in param_specs(cfg) for name in spec.hf_names(cfg.num_hidden_layers)}
