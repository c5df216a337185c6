"""What the TOFU suite asks of a scorer (`SuiteScorer`) and the per-answer scores it gets (`Scored`).

Two scorers implement it: the JAX one (`npo_jax.eval.scoring.Scorer`) and the transformers one
(`npo_jax.eval.hf_reference.TorchScorer`), so `Suite` runs on either and the parity tool compares
them. Neither jax nor torch is imported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass
class Scored:
    avg_loss: float  # mean NLL over labelled tokens (answer + eos)
    token_logprobs: np.ndarray  # answer tokens without the final eos
    preds: np.ndarray  # greedy predictions for those tokens
    labels: np.ndarray


@runtime_checkable
class SuiteScorer(Protocol):
    # the attention-mask convention its scores use: open-unlearning's (True) or padding only (False)
    eot_mask_quirk: bool

    def score_and_generate(self, pairs: Sequence[tuple[str, str]], questions: Sequence[str], progress=None,
                           timings: dict[str, float] | None = None) -> tuple[list[Scored], list[str]]:
        """Per (question, answer) pair its `Scored` (teacher forced, in the chat format), and per
        question its greedy answer (special tokens skipped, cut at eos, stripped), in order.
        `progress` (anything with `update(n)`) counts pairs and questions as they are done;
        `timings` gets the seconds of the call's phases: `scoring_and_generation_s` when both run
        in one pass, else `scoring_s` and `generation_s`."""
        ...
