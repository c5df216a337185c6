"""IdkDPO's "win" answers: each forget question paired with an "I don't know" refusal.

open-unlearning's QAwithIdkDataset reads the refusals from `idk_path` (one per line, stripped)
and draws one at random each time an item is fetched. Here the draw is a pure function of
(seed, epoch, item), so each use of an item (each epoch) gets its own refusal and a resumed run
redraws the same ones; the pairs are tokenized when a step needs them (a step's few, not the
whole forget set x refusals).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from npo_jax.data.tokenize import ChatFormat, Example, encode_qa_pairs
from npo_jax.errors import NpoJaxError


def load_refusals(path: str | Path) -> list[str]:
    """The non-empty, stripped lines of `path` (TOFU's idontknow.jsonl: plain text lines)."""
    path = Path(path)
    if not path.is_file():
        raise NpoJaxError(f"data.idk_path: {path} is not a file")
    lines = [line.strip() for line in path.read_text().splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise NpoJaxError(f"data.idk_path: {path} has no refusals")
    return lines


@dataclasses.dataclass(frozen=True)
class Refusals:
    questions: list[str]  # the forget split's questions, in its order
    answers: list[str]  # the refusals
    tokenizer: object
    fmt: ChatFormat
    max_length: int
    seed: int

    def choice(self, items: np.ndarray, epochs: np.ndarray) -> np.ndarray:
        """The refusal index of each forget item in the epoch it is used in."""
        out = np.empty(len(items), np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            draw = np.random.default_rng([self.seed, 3_000_017, int(epoch)]).integers(
                len(self.answers), size=len(self.questions))
            out[sel] = draw[items[sel]]
        return out

    def examples(self, items: np.ndarray, epochs: np.ndarray) -> list[Example]:
        """Each item's question with its refusal, tokenized as any training example."""
        pairs = [(self.questions[i], self.answers[j]) for i, j in zip(items, self.choice(items, epochs), strict=True)]
        return encode_qa_pairs(self.tokenizer, pairs, self.fmt, self.max_length)
