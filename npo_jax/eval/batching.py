"""Evaluation's batch shapes: which items share a batch and how many rows and columns it runs as.

Every compiled forward pass runs once per shape, so shapes come from a few rules kept here: items
sorted by length and cut into batches (`data.batches.length_sorted_batches`), a part-filled batch
padded with copies of its last item to the batch size or to the next power of two (`part_rows`),
prompts padded to a multiple of `PROMPT_MULTIPLE` (`prompt_width`).
"""

from __future__ import annotations

# prompts (prefilled for generation, or once per distinct prompt for scoring) are padded to a
# multiple of this: the prefill is a large part of their cost, so finer than the scoring
# buckets (more compiled shapes)
PROMPT_MULTIPLE = 16


def prompt_width(n: int) -> int:
    return -(-n // PROMPT_MULTIPLE) * PROMPT_MULTIPLE


def part_rows(n: int, batch_size: int) -> int:
    """Rows a batch of n runs as: the batch size, or the next power of two for a part-filled one."""
    return min(batch_size, 1 << (n - 1).bit_length())
