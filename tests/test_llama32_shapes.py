"""The real Llama-3.2-3B-Instruct config builds an abstract model with HF's exact names and shapes."""

import math

import torch
import transformers
from conftest import LLAMA3_DIR, require_shared
from flax import nnx

from npo_jax.config import LlamaConfig
from npo_jax.model import abstract_model
from npo_jax.params import param_specs, stored_shape
from npo_jax.rope import inverse_frequencies


def test_llama32_3b_abstract_model_matches_hf_meta_model():
    require_shared(LLAMA3_DIR)
    cfg = LlamaConfig.from_file(LLAMA3_DIR / "config.json")
    assert (cfg.rope_type, cfg.rope_factor, cfg.tie_word_embeddings) == ("llama3", 32.0, True)
    model = abstract_model(cfg)
    ours = {path: tuple(leaf.shape) for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert sum(math.prod(shape) for shape in ours.values()) == 3_212_749_824

    hf_config = transformers.AutoConfig.from_pretrained(LLAMA3_DIR)
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hf_config)
    hf_shapes = {name: tuple(p.shape) for name, p in hf.named_parameters()}

    mapped = {}
    for spec in param_specs(cfg):
        assert ours.pop(spec.path) == stored_shape(spec, cfg), spec.path
        for name in spec.hf_names(cfg.num_hidden_layers):
            mapped[name] = spec.hf_shape
    assert not ours, f"model params without an HF tensor: {sorted(ours)}"
    assert mapped == hf_shapes
    total = sum(p.numel() for p in hf.parameters())
    assert total == 3_212_749_824


def test_llama32_rope_frequencies_match_hf():
    require_shared(LLAMA3_DIR)
    cfg = LlamaConfig.from_file(LLAMA3_DIR / "config.json")
    hf_config = transformers.AutoConfig.from_pretrained(LLAMA3_DIR)
    rope = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_config)
    torch.testing.assert_close(torch.tensor(inverse_frequencies(cfg)), rope.inv_freq, rtol=1e-6, atol=0)
