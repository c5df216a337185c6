"""KV-cache generation against transformers' generate()."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from hf_models import load_hf, make_hf_model, tiny_config
from transformers.generation.logits_process import TopPLogitsWarper

from npo_jax.generate import generate, sample_next
from npo_jax.model import abstract_model, split_params
from npo_jax.model_io import load_hf_params

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24], [30]]


def _left_padded(prompts):
    width = max(map(len, prompts))
    ids = np.zeros((len(prompts), width), np.int64)
    mask = np.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
    return ids, mask


def _hf_greedy(hf, ids, mask, max_new, eos):
    with torch.no_grad():
        out = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                          max_new_tokens=max_new, eos_token_id=list(eos), pad_token_id=0)
    return out.numpy()[:, ids.shape[1]:]


def test_greedy_matches_hf_with_early_eos(tmp_path):
    folder = make_hf_model(tmp_path / "m", tiny_config(tie=False, kv_heads=2, std=0.3))
    hf = load_hf(folder)
    cfg, params = load_hf_params(folder)
    graphdef, _ = split_params(abstract_model(cfg))
    ids, mask = _left_padded(PROMPTS)

    # Make eos a token row 0 greedily emits at its 3rd step, so that row stops early.
    free_run = _hf_greedy(hf, ids, mask, 12, eos=[255])
    eos = (int(free_run[0, 2]),)
    ref = _hf_greedy(hf, ids, mask, 12, eos)
    ours = generate(graphdef, params, ids, mask, max_new_tokens=12, eos_ids=eos, pad_id=0)

    assert ours.steps == ref.shape[1]
    np.testing.assert_array_equal(ours.tokens[:, : ours.steps], ref)
    assert (ours.tokens[:, ours.steps:] == 0).all()
    assert ours.lengths[0] <= 3 and (ref[0, ours.lengths[0]:] == 0).all()
    assert ours.lengths.max() > ours.lengths[0]  # the other rows went on

    # the same prompts one by one, unpadded, give the same tokens
    for row, prompt in enumerate(PROMPTS):
        single = generate(graphdef, params, np.array([prompt]), np.ones((1, len(prompt))), max_new_tokens=12,
                          eos_ids=eos, pad_id=0)
        n = ours.lengths[row]
        np.testing.assert_array_equal(single.tokens[0, :n], ours.tokens[row, :n])


def test_top_p_keeps_the_same_tokens_as_hf_warper():
    logits = np.random.RandomState(0).randn(6, 50).astype(np.float32) * 3
    for top_p in (0.3, 0.7, 0.95):
        kept_hf = np.isfinite(TopPLogitsWarper(top_p)(None, torch.tensor(logits)).numpy())
        samples = np.stack([np.asarray(sample_next(jnp.asarray(logits), k, 1.0, top_p))
                            for k in jax.random.split(jax.random.key(0), 400)])
        sampled = np.zeros_like(kept_hf)
        for row in range(logits.shape[0]):
            sampled[row, np.unique(samples[:, row])] = True
        assert not (sampled & ~kept_hf).any(), f"top_p={top_p} sampled a token HF would drop"
        # every kept token of meaningful mass shows up in 400 draws
        probs = torch.softmax(torch.tensor(logits), -1).numpy()
        assert (sampled | ~kept_hf | (probs < 0.02)).all()


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(tmp_path):
    folder = make_hf_model(tmp_path / "m", tiny_config(std=0.3))
    cfg, params = load_hf_params(folder)
    graphdef, _ = split_params(abstract_model(cfg))
    ids, mask = _left_padded(PROMPTS)
    kw = dict(max_new_tokens=8, eos_ids=(), pad_id=0)
    a = generate(graphdef, params, ids, mask, temperature=1.0, seed=3, **kw)
    b = generate(graphdef, params, ids, mask, temperature=1.0, seed=3, **kw)
    c = generate(graphdef, params, ids, mask, temperature=1.0, seed=4, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.tokens != c.tokens).any()
    greedy = generate(graphdef, params, ids, mask, **kw)
    nucleus = generate(graphdef, params, ids, mask, temperature=1.0, top_p=1e-6, seed=5, **kw)
    np.testing.assert_array_equal(greedy.tokens, nucleus.tokens)

