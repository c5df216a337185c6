"""Step batches: epoch order, forget->retain pairing, length buckets, padding, masks.

An epoch is one pass over the forget set (or the fine-tuning split) in a seeded random order. A
run has `epochs * (len // effective_batch)` steps (HF's `max_steps`), cut from those orders in
one of two ways (`StepPlan.mode`, `optim.epoch_mode`):
- "drop": each epoch is its own `len // effective_batch` steps; the remainder of each epoch's
  order (smaller than a step) is not used.
- "stream": the epochs' orders are one stream of examples cut into steps of `effective_batch`,
  so the remainder of an epoch opens the next epoch's first step, as HF Trainer (4.45, which
  open-unlearning pins) accumulates an epoch's leftover micro-batches into the next epoch's
  first update; the run ends `epochs * len - total_steps * effective_batch` examples short of
  the last epoch's end, as HF's does. Every step keeps its shape.
Each forget item's retain partner (`RetainPairing`) is drawn uniformly with a seeded generator:
once per item for the whole run ("fixed"), or anew for each epoch ("fresh"), as
open-unlearning's ForgetRetainDataset draws a partner each time an item is fetched. A step's
examples are padded on the right to the smallest length bucket that holds them all, so the step
compiles once per bucket.

Every padded group also carries `label_positions`: the positions whose next token is labelled
(the answer), so the LM head and log-softmax run on those rows only instead of on every
position (the prompt is most of a chat-formatted TOFU example: 61% of forget10's tokens with
the Llama-3 template). Their count is padded to half the padded length, or to all of it when
half is too few: at most one more shape, so one more compile, per length bucket.
"""

from __future__ import annotations

import dataclasses
import functools
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


def group_tokens(examples: list[Example], length: int, group: int) -> np.ndarray:
    """(n,) float32: each example's loss group's labelled-token count (groups of `group`
    consecutive examples), the token-mean NLL's denominator (`npo_jax.losses`)."""
    counts = np.array([np.count_nonzero(np.asarray(e.labels[1:length]) != IGNORE) for e in examples], np.float32)
    return np.repeat(counts.reshape(-1, group).sum(1), group).astype(np.float32)


def group_lengths(examples: list[Example], length: int, group: int) -> np.ndarray:
    """(n,) int32: the longest example (at most `length`) of each example's loss group, the length
    open-unlearning pads the group's micro-batch to (UNDIAL's all-positions mean, `npo_jax.methods.undial`)."""
    lengths = np.array([min(len(e.input_ids), length) for e in examples], np.int32)
    return np.repeat(lengths.reshape(-1, group).max(1), group).astype(np.int32)


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


def fresh_retain_pairing(n_forget: int, n_retain: int, seed: int, epoch: int) -> np.ndarray:
    """retain index for each forget index in `epoch`: uniform, drawn anew for every epoch."""
    return np.random.default_rng([seed, 2_000_003, epoch]).integers(n_retain, size=n_forget)


@dataclasses.dataclass(frozen=True)
class RetainPairing:
    """Each forget item's retain partner: the same in every epoch ("fixed") or drawn anew for
    each epoch ("fresh"); a pure function of (sizes, seed, epoch), so a resumed run redraws it."""

    n_forget: int
    n_retain: int
    seed: int
    mode: str = "fixed"  # fixed | fresh

    def __post_init__(self):
        if self.mode not in ("fixed", "fresh"):
            raise ValueError(f"retain pairing {self.mode!r}: fixed or fresh")

    @functools.cached_property
    def fixed(self) -> np.ndarray:
        return retain_pairing(self.n_forget, self.n_retain, self.seed)

    def partners(self, items: np.ndarray, epochs: np.ndarray) -> np.ndarray:
        """The retain partners of forget `items` used in `epochs` (one epoch per item)."""
        if self.mode == "fixed":
            return self.fixed[items]
        out = np.empty(len(items), np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = fresh_retain_pairing(self.n_forget, self.n_retain, self.seed, int(epoch))[items[sel]]
        return out


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, 1_000_003, epoch]).permutation(n)


@dataclasses.dataclass
class StepPlan:
    """Which examples every optimizer step uses; a pure function of (sizes, seed, mode), so resumable."""

    n_items: int
    effective_batch: int
    epochs: int
    seed: int
    mode: str = "drop"  # drop | stream (the module doc)

    def __post_init__(self):
        if self.n_items < self.effective_batch:
            raise NpoJaxError(f"effective batch {self.effective_batch} is larger than the dataset "
                              f"({self.n_items} examples)")
        if self.mode not in ("drop", "stream"):
            raise ValueError(f"epoch mode {self.mode!r}: drop or stream")

    @property
    def steps_per_epoch(self) -> int:
        return self.n_items // self.effective_batch

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def _order(self, epoch: int) -> np.ndarray:
        cached = getattr(self, "_orders", None)
        if cached is None or cached[0] != epoch:
            self._orders = cached = (epoch, epoch_order(self.n_items, self.seed, epoch))
        return cached[1]

    def positions(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(epoch, item) of each of the step's examples, in the step's order."""
        b = self.effective_batch
        if self.mode == "drop":
            epoch, k = divmod(step, self.steps_per_epoch)
            return np.full(b, epoch), self._order(epoch)[k * b:(k + 1) * b]
        epochs, offsets = np.divmod(np.arange(step * b, (step + 1) * b), self.n_items)
        items = np.empty(b, np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            items[sel] = self._order(int(epoch))[offsets[sel]]
        return epochs, items

    def indices(self, step: int) -> np.ndarray:
        return self.positions(step)[1]

    def epoch(self, step: int) -> int:
        """The epoch `step` starts in (0-based)."""
        if self.mode == "drop":
            return step // self.steps_per_epoch
        return step * self.effective_batch // self.n_items


def step_batch(plan: StepPlan, step: int, forget: list[Example], *, buckets: list[int], pad_id: int,
               eot_id: int | None, eot_mask_quirk: bool, retain: list[Example] | None = None,
               pairing: RetainPairing | None = None, ref_logp: np.ndarray | None = None,
               rows: np.ndarray | None = None, loss_group: int | None = None, alternate=None) -> dict:
    """Host arrays for one optimizer step: {"forget": {...}, "retain": {...}, "forget_ref_logp"}
    and, with `alternate` (`npo_jax.data.refusals.Refusals`), each example's "alternate" answer.

    `rows` keeps only those positions of the step's examples (one host's share of the batch); the
    padded length is still the whole step's, so every host pads alike. With `loss_group`, each
    group also gets `group_tokens` (`group_tokens`, over the whole step's groups), and "forget"
    its `group_length` (`group_lengths`).
    """
    epochs, idx = plan.positions(step)
    chosen = [forget[i] for i in idx]
    partners = [retain[j] for j in pairing.partners(idx, epochs)] if retain is not None else []
    alternates = alternate.examples(idx, epochs) if alternate is not None else []
    length = bucket_length(max(len(e.input_ids) for e in chosen + partners + alternates), buckets)
    width = label_width(chosen + partners + alternates, length)  # the whole step's, like the length
    per_row = {}  # (batch group, key) -> (n,) values of each row's loss group
    if loss_group is not None:
        per_row["forget", "group_tokens"] = group_tokens(chosen, length, loss_group)
        per_row["forget", "group_length"] = group_lengths(chosen, length, loss_group)
        if partners:
            per_row["retain", "group_tokens"] = group_tokens(partners, length, loss_group)
    if rows is not None:
        idx, chosen = idx[rows], [chosen[r] for r in rows]
        partners = [partners[r] for r in rows] if partners else []
        alternates = [alternates[r] for r in rows] if alternates else []
        per_row = {k: v[rows] for k, v in per_row.items()}
    kw = dict(pad_id=pad_id, eot_id=eot_id, eot_mask_quirk=eot_mask_quirk, width=width)
    batch = {"forget": pad_examples(chosen, length, **kw), "forget_index": idx.astype(np.int32)}
    if retain is not None:
        batch["retain"] = pad_examples(partners, length, **kw)
    if alternates:
        batch["alternate"] = pad_examples(alternates, length, **kw)
    for (group, key), value in per_row.items():
        batch[group][key] = value
    if ref_logp is not None:
        batch["forget_ref_logp"] = ref_logp[idx].astype(np.float32)
    return batch
