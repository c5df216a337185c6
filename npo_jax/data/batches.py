"""Step batches: epoch order, forget->retain pairing, length buckets, padding, masks.

An epoch is one pass over the forget set (or the fine-tuning split) in a seeded random order,
cut into steps of `effective_batch` examples; a remainder smaller than a step is dropped, as HF's
`max_steps = epochs * (len // effective_batch)` does. Each forget item i is paired with one
retain item drawn uniformly with a generator seeded by (seed, i), the same in every epoch (as
open-unlearning's ForgetRetainDataset). A step's examples are padded on the right to the
smallest length bucket that holds them all, so the step compiles once per bucket.

Every padded group also carries `label_positions`: the positions whose next token is labelled
(the answer), so the LM head and log-softmax run on those rows only instead of on every
position (the prompt is most of a chat-formatted TOFU example: 61% of forget10's tokens with
the Llama-3 template). Their count is padded to half the padded length, or to all of it when
half is too few: at most one more shape, so one more compile, per length bucket.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from npo_jax.data.tokenize import IGNORE, Example
from npo_jax.errors import NpoJaxError


def bucket_length(n: int, buckets: list[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    return buckets[-1]


def length_sorted_batches(lengths: Sequence[int], batch_size: int, rows: Callable[[int], int] | None = None
                          ) -> Iterator[tuple[list[int], list[int]]]:
    """Item indices sorted by length (ties in order), `batch_size` at a time: yields (idx, filled),
    `filled` being `idx` with its last index repeated up to `rows(len(idx))` rows (default
    `batch_size`), so that a part-filled last batch keeps a fixed shape (one compile per shape).
    Results for the filler rows are dropped: keep the first `len(idx)`."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        filled = idx + [idx[-1]] * ((rows(len(idx)) if rows else batch_size) - len(idx))
        yield idx, filled


def label_width(examples: list[Example], length: int) -> int:
    """Padded count of labelled next-token positions for these examples at this padded length."""
    most = max((int(np.count_nonzero(np.asarray(e.labels[1:length]) != IGNORE)) for e in examples), default=0)
    return length // 2 if most <= length // 2 else length - 1


def label_positions(labels: np.ndarray, width: int) -> np.ndarray:
    """(n, width) int32: ascending positions t with labels[t + 1] != -100, then -1 padding."""
    out = np.full((labels.shape[0], width), -1, np.int32)
    for row, lab in enumerate(labels):
        pos = np.flatnonzero(lab[1:] != IGNORE)
        if len(pos) > width:
            raise ValueError(f"label_positions: row {row} has {len(pos)} labelled positions, more than width {width}")
        out[row, :len(pos)] = pos
    return out


def pad_examples(examples: list[Example], length: int, pad_id: int, eot_id: int | None = None,
                 eot_mask_quirk: bool = False, width: int | None = None) -> dict[str, np.ndarray]:
    """Right-padded (n, length) input_ids / labels / attention_mask, and (n, width)
    label_positions (width defaults to `label_width(examples, length)`).

    With `eot_mask_quirk` the mask is open-unlearning's `input_ids != pad` with pad = eos =
    `eot_id`, which also hides every <|eot_id|> inside the sequence (its issue #128).
    """
    n = len(examples)
    ids = np.full((n, length), pad_id, np.int32)
    labels = np.full((n, length), IGNORE, np.int32)
    mask = np.zeros((n, length), np.int32)
    for row, ex in enumerate(examples):
        k = min(len(ex.input_ids), length)
        ids[row, :k] = ex.input_ids[:k]
        labels[row, :k] = ex.labels[:k]
        mask[row, :k] = 1
    if eot_mask_quirk:
        if eot_id is None:
            raise ValueError("eot_mask_quirk needs the eos (<|eot_id|>) id")
        ids = np.where(mask > 0, ids, eot_id).astype(np.int32)
        mask = (ids != eot_id).astype(np.int32)
    width = label_width(examples, length) if width is None else width
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "label_positions": label_positions(labels, width)}


def retain_pairing(n_forget: int, n_retain: int, seed: int) -> np.ndarray:
    """retain index for each forget index: uniform, seeded per item, fixed across epochs."""
    return np.array([np.random.default_rng([seed, i]).integers(n_retain) for i in range(n_forget)], np.int64)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, 1_000_003, epoch]).permutation(n)


@dataclasses.dataclass
class StepPlan:
    """Which examples every optimizer step uses; a pure function of (sizes, seed), so resumable."""

    n_items: int
    effective_batch: int
    epochs: int
    seed: int

    def __post_init__(self):
        if self.n_items < self.effective_batch:
            raise NpoJaxError(f"effective batch {self.effective_batch} is larger than the dataset "
                              f"({self.n_items} examples)")

    @property
    def steps_per_epoch(self) -> int:
        return self.n_items // self.effective_batch

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def indices(self, step: int) -> np.ndarray:
        epoch, k = divmod(step, self.steps_per_epoch)
        order = epoch_order(self.n_items, self.seed, epoch)
        return order[k * self.effective_batch:(k + 1) * self.effective_batch]


def step_batch(plan: StepPlan, step: int, forget: list[Example], *, buckets: list[int], pad_id: int,
               eot_id: int | None, eot_mask_quirk: bool, retain: list[Example] | None = None,
               pairing: np.ndarray | None = None, ref_logp: np.ndarray | None = None,
               rows: np.ndarray | None = None) -> dict:
    """Host arrays for one optimizer step: {"forget": {...}, "retain": {...}, "forget_ref_logp"}.

    `rows` keeps only those positions of the step's examples (one host's share of the batch); the
    padded length is still the whole step's, so every host pads alike.
    """
    idx = plan.indices(step)
    chosen = [forget[i] for i in idx]
    partners = [retain[j] for j in pairing[idx]] if retain is not None else []
    length = bucket_length(max(len(e.input_ids) for e in chosen + partners), buckets)
    width = label_width(chosen + partners, length)  # the whole step's, like the length
    if rows is not None:
        idx, chosen = idx[rows], [chosen[r] for r in rows]
        partners = [partners[r] for r in rows] if partners else []
    kw = dict(pad_id=pad_id, eot_id=eot_id, eot_mask_quirk=eot_mask_quirk, width=width)
    batch = {"forget": pad_examples(chosen, length, **kw), "forget_index": idx.astype(np.int32)}
    if retain is not None:
        batch["retain"] = pad_examples(partners, length, **kw)
    if ref_logp is not None:
        batch["forget_ref_logp"] = ref_logp[idx].astype(np.float32)
    return batch
