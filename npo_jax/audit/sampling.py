"""Batched, jit-compiled generation from prompt token ids, greedy or seeded sampling.

`Scorer.generate_tokens` takes single-turn questions and decodes greedily; the audit also needs
multi-turn and begun-answer prompts and temperature / top-p samples. Batching is the
evaluator's: prompts sorted by length, left padded to a length bucket, a fixed batch size, so
`npo_jax.generate.generate` compiles once per bucket. Batch b (in that order) samples with the
seed `SeedSequence([seed, b])`, so a run is reproducible and rows of one batch draw independently.
"""

from __future__ import annotations

import numpy as np

from npo_jax.eval.scoring import Scorer
from npo_jax.generate import generate
from npo_jax.model import merge_params


def _width(n: int, buckets) -> int:
    return next((b for b in buckets if n <= b), -(-n // buckets[-1]) * buckets[-1])


def generate_texts(scorer: Scorer, prompts: list[np.ndarray], *, temperature: float = 0.0, top_p: float = 1.0,
                   seed: int = 0) -> list[str]:
    """One decoded continuation per prompt (special tokens skipped, cut at eos, stripped)."""
    tok = scorer.tokenizer
    eos = tok.eos_token_id
    eos_ids = tuple(sorted({eos, *merge_params(scorer.graphdef, scorer.params).config.eos_token_ids}))
    out: list[str | None] = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for b, start in enumerate(range(0, len(order), scorer.batch_size)):
        idx = order[start:start + scorer.batch_size]
        chunk = [prompts[i] for i in idx]
        chunk += [chunk[-1]] * (scorer.batch_size - len(chunk))
        width = _width(max(len(p) for p in chunk), scorer.buckets)
        ids = np.full((len(chunk), width), scorer.pad_id, np.int32)
        mask = np.zeros_like(ids)
        for row, p in enumerate(chunk):
            ids[row, width - len(p):] = p
            mask[row, width - len(p):] = 1
        if scorer.eot_mask_quirk:  # as the evaluator: open-unlearning's mask = ids != pad (= eos)
            mask = (ids != eos).astype(np.int32)
        batch_seed = int(np.random.SeedSequence([seed, b]).generate_state(1)[0]) if temperature > 0 else 0
        gen = generate(scorer.graphdef, scorer.params, ids, mask, max_new_tokens=scorer.max_new_tokens,
                       eos_ids=eos_ids, pad_id=scorer.pad_id, temperature=temperature, top_p=top_p,
                       seed=batch_seed)
        for row, i in enumerate(idx):
            out[i] = tok.decode(gen.tokens[row, :gen.lengths[row]], skip_special_tokens=True).strip()
    return out
