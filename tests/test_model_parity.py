"""Our Flax Llama against transformers.LlamaForCausalLM on tiny random models (float32 and bf16)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import LLAMA3_ROPE, load_hf, make_hf_model, markov_batch, tiny_config

from npo_jax.config import LlamaConfig
from npo_jax.model import abstract_model, merge_params, split_params
from npo_jax.model_io import load_hf_params
from npo_jax.parity.checks import BF16_MAX_KL, BF16_MIN_ARGMAX, LOGITS_REL


def _jax_logits(folder, ids, mask, positions=None, **model_kw):
    cfg, params = load_hf_params(folder)
    graphdef, _ = split_params(abstract_model(cfg, **model_kw))
    fn = jax.jit(lambda p, i, m, pos: merge_params(graphdef, p)(i, m, pos))
    return np.asarray(fn(params, jnp.asarray(ids), jnp.asarray(mask), positions))


def _hf_logits(model, ids, mask, position_ids=None):
    with torch.no_grad():
        kw = {} if position_ids is None else {"position_ids": torch.tensor(position_ids)}
        return model(torch.tensor(ids), attention_mask=torch.tensor(mask), **kw).logits.float().numpy()


def _batch(vocab, lengths, width, side, seed=0):
    rng = np.random.RandomState(seed)
    ids = np.zeros((len(lengths), width), np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        ids[row, cols] = rng.randint(4, vocab, n)
        mask[row, cols] = 1
    return ids, mask


def assert_close_logits(ours, ref, valid):
    """The parity target: max abs difference <= 1e-4 relative to the logits' scale (largest reference |logit|)."""
    scale = np.abs(ref[valid]).max()
    err = np.abs(ours[valid] - ref[valid]).max()
    assert err <= LOGITS_REL * scale, f"max |diff| {err:.3e} > {LOGITS_REL:g} x scale {scale:.3e}"


def test_tiny_rope_config_exercises_all_llama3_bands():
    """The llama3 test config puts RoPE pairs in the high, smoothed and low frequency bands."""
    head_dim, theta = 16, 10000.0
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    orig = LLAMA3_ROPE["original_max_position_embeddings"]
    high = wavelen < orig / LLAMA3_ROPE["high_freq_factor"]
    low = wavelen > orig / LLAMA3_ROPE["low_freq_factor"]
    assert high.any() and low.any() and (~high & ~low).any()


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (8, 2)], ids=["g1", "g2", "g4"])
def test_logits_match_hf_llama3_rope(tmp_path, tie, heads, kv_heads):
    folder = make_hf_model(tmp_path / "m", tiny_config(tie=tie, heads=heads, kv_heads=kv_heads, std=0.1))
    hf = load_hf(folder)
    for side in ("right", "left"):
        ids, mask = _batch(256, [24, 17, 9], 24, side)
        pos = np.maximum(mask.cumsum(-1) - 1, 0)
        # HF derives positions from the mask only in generate(); pass them so left padding is comparable.
        ref = _hf_logits(hf, ids, mask, pos)
        ours = _jax_logits(folder, ids, mask)
        assert_close_logits(ours, ref, mask.astype(bool))


def test_left_padded_equals_unpadded(tmp_path):
    folder = make_hf_model(tmp_path / "m", tiny_config(std=0.1))
    hf = load_hf(folder)
    ids, mask = _batch(256, [20, 11], 20, "left")
    ours = _jax_logits(folder, ids, mask)
    for row in range(2):
        real = mask[row].astype(bool)
        ref = _hf_logits(hf, ids[row : row + 1, real], np.ones((1, real.sum()), np.int64))[0]
        assert_close_logits(ours[row][real], ref, np.ones(len(ref), bool))


@pytest.mark.parametrize("dialect", ["4", "5"])
@pytest.mark.parametrize("rope", ["default", "llama3"])
def test_config_dialects_and_default_rope(tmp_path, dialect, rope):
    folder = make_hf_model(tmp_path / "m", tiny_config(rope=rope, std=0.1), dialect=dialect)
    raw_keys = (folder / "config.json").read_text()
    assert ("rope_parameters" in raw_keys) == (dialect == "5")
    cfg = LlamaConfig.from_file(folder / "config.json")
    assert cfg.rope_type == rope and cfg.rope_theta == 10000.0
    ids, mask = _batch(256, [16, 12], 16, "right")
    ref = _hf_logits(load_hf(folder), ids, mask)
    assert_close_logits(_jax_logits(folder, ids, mask), ref, mask.astype(bool))


def test_biases_and_remat(tmp_path):
    folder = make_hf_model(tmp_path / "m", tiny_config(tie=False, attention_bias=True, mlp_bias=True, std=0.1))
    ids, mask = _batch(256, [16, 10], 16, "right")
    ref = _hf_logits(load_hf(folder), ids, mask)
    for remat in ("none", "full", "dots"):
        assert_close_logits(_jax_logits(folder, ids, mask, remat=remat), ref, mask.astype(bool))


def test_bfloat16_compute_against_float32_hf(tmp_path):
    """bf16 matmuls (fp32 params, norms and softmax): argmax >= 99% and mean KL <= 1e-3.

    The model is briefly trained first: a random model's near-flat logits flip their argmax under
    any rounding (HF's own bf16 agrees with its fp32 on ~95% there), unlike a real LM's.
    """
    config = tiny_config(hidden=128, heads=8, kv_heads=2, layers=4, vocab=512)
    folder = make_hf_model(tmp_path / "m", config, train_steps=60)
    ids = markov_batch(512, 8, 64, seed=999).numpy()
    mask = np.ones_like(ids)
    mask[4:, 48:] = 0  # some right padding too
    valid = mask.astype(bool)
    ref = _hf_logits(load_hf(folder), ids, mask)[valid]
    ours = _jax_logits(folder, ids, mask, compute_dtype=jnp.bfloat16)[valid]
    agree = (ours.argmax(-1) == ref.argmax(-1)).mean()
    logp_ref = torch.log_softmax(torch.tensor(ref), -1)
    logp = torch.log_softmax(torch.tensor(ours), -1)
    kl = (logp_ref.exp() * (logp_ref - logp)).sum(-1).mean().item()
    assert agree >= BF16_MIN_ARGMAX, agree
    assert kl <= BF16_MAX_KL, kl
    # and bf16 really ran: the logits are not float32-exact
    assert np.abs(ours - ref).max() > LOGITS_REL * np.abs(ref).max()
