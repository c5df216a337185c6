"""Decoded generations for the audit's prompts (multi-turn chats, begun answers), greedy or sampled.

The batching, bucketing and per-batch seeding are the evaluator's (`Scorer.generate_ids`); this
only decodes: special tokens skipped, stripped.
"""

from __future__ import annotations

import numpy as np

from npo_jax.eval.scoring import Scorer


def generate_texts(scorer: Scorer, prompts: list[np.ndarray], *, temperature: float = 0.0, top_p: float = 1.0,
                   seed: int = 0) -> list[str]:
    """One decoded continuation per prompt (special tokens skipped, cut at eos, stripped)."""
    tokens = scorer.generate_ids(prompts, temperature=temperature, top_p=top_p, seed=seed)
    return [scorer.lm.text(t) for t in tokens]
