"""Tiny random HF Llama models, built offline and saved locally, for parity tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

# original_max_position_embeddings=64 with theta 10000 and head_dim 16 puts the RoPE pairs in all
# three llama3 bands: wavelength 6.3 (< 64/4: high, unchanged), 19.9 and 62.8 (between: smoothed)
# and >= 199 (> 64/1: low, divided by factor).
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def tiny_config(*, tie=True, heads=4, kv_heads=2, rope="llama3", vocab=256, hidden=64, layers=2,
                head_dim=16, std=0.02, **extra) -> transformers.LlamaConfig:
    rope_parameters = {"rope_theta": 10000.0, **(LLAMA3_ROPE if rope == "llama3" else {"rope_type": "default"})}
    return transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden + 8, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=512, rms_norm_eps=1e-5, rope_parameters=rope_parameters,
        tie_word_embeddings=tie, bos_token_id=1, eos_token_id=[2, 3], pad_token_id=0,
        initializer_range=std, **extra,
    )


def make_hf_model(path: Path, config: transformers.LlamaConfig, *, seed=0, dtype=torch.float32,
                  dialect="5", max_shard_size="2GB", perturb_norms=True, train_steps=0) -> Path:
    """Save a random LlamaForCausalLM at `path`; dialect '4' rewrites config.json the 4.x way."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    if train_steps:
        train_briefly(model, train_steps)
    if perturb_norms:  # norm weights start at exactly 1: randomise so a missed scale would show
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name or name.endswith(".bias"):
                    p.add_(0.1 * torch.randn_like(p))
    model.to(dtype).save_pretrained(path, max_shard_size=max_shard_size)
    if dialect == "4":
        to_v4_dialect(path / "config.json")
    return path


def to_v4_dialect(config_path: Path) -> None:
    """Rewrite a transformers-5 config.json as the Llama-3.2 release files (4.x) spell it."""
    raw = json.loads(config_path.read_text())
    rope = dict(raw.pop("rope_parameters"))
    raw["rope_theta"] = rope.pop("rope_theta")
    raw["rope_scaling"] = rope if rope.get("rope_type") != "default" else None
    raw["torch_dtype"] = raw.pop("dtype")
    config_path.write_text(json.dumps(raw, indent=2))


def load_hf(path: Path) -> transformers.LlamaForCausalLM:
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def markov_batch(vocab: int, batch: int, length: int, seed: int) -> torch.Tensor:
    """Sequences of a fixed random next-token map (token -> perm[token]), 10% random jumps."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(1234))
    seq = torch.empty(batch, length, dtype=torch.long)
    seq[:, 0] = torch.randint(4, vocab, (batch,), generator=gen)
    for t in range(1, length):
        jump = torch.rand(batch, generator=gen) < 0.1
        seq[:, t] = torch.where(jump, torch.randint(4, vocab, (batch,), generator=gen), perm[seq[:, t - 1]])
    return seq


def train_briefly(model: transformers.LlamaForCausalLM, steps: int = 60, batch: int = 16, length: int = 32,
                  lr: float = 3e-3) -> transformers.LlamaForCausalLM:
    """A few AdamW steps on markov_batch so the model's predictions are confident, like a real LM's."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        ids = markov_batch(model.config.vocab_size, batch, length, seed=step)
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
