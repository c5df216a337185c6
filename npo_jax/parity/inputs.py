"""What both frameworks are given: N TOFU items, tokenized once, in the batch layouts compared.

The logits and objective checks feed JAX and transformers the same token ids, attention masks
and positions (built here with our chat tokenization and padding); the generation and evaluation
checks give transformers only the text, which `npo_jax.eval.hf_reference` tokenizes on its own.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from npo_jax.data.batches import label_width, pad_examples
from npo_jax.data.tokenize import IGNORE, ChatFormat, Example, encode_prompts, encode_qa_pairs, pad_token_id
from npo_jax.errors import NpoJaxError


@dataclasses.dataclass(frozen=True)
class Settings:
    items: int = 4
    batch_size: int = 8
    max_new_tokens: int = 200
    fmt: ChatFormat = ChatFormat()
    eot_mask_quirk: bool = False
    max_length: int = 512
    # the objective: npo_jax.losses.Objective's fields (default: the seed's NPO recipe)
    method: str = "NPO"
    beta: float = 0.1
    alpha: float = 2.0
    gamma: float = 1.0
    delta: float = 0.0
    retain_loss: str = "NLL"
    reference: str = "cached"


@dataclasses.dataclass
class Layout:
    """One padded batch: ids, mask and positions as both frameworks get them, and which
    (row, column) pairs are compared (the positions whose next token is an answer label)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    positions: np.ndarray
    rows: np.ndarray
    cols: np.ndarray


def _answer_positions(examples: list[Example], offsets: list[int]) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = [], []
    for r, (ex, off) in enumerate(zip(examples, offsets, strict=True)):
        pos = np.flatnonzero(np.asarray(ex.labels[1:]) != IGNORE)
        rows += [r] * len(pos)
        cols += list(pos + off)
    return np.asarray(rows, np.int32), np.asarray(cols, np.int32)


def right_padded(examples: list[Example], pad_id: int, eos_id: int, quirk: bool) -> Layout:
    """The training layout: right padding, positions 0..L-1 (HF's forward without position_ids)."""
    length = max(len(e.input_ids) for e in examples)
    b = pad_examples(examples, length, pad_id, eos_id, quirk)
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), b["input_ids"].shape).copy()
    return Layout(b["input_ids"], b["attention_mask"], positions, *_answer_positions(examples, [0] * len(examples)))


def left_padded(examples: list[Example], pad_id: int, eos_id: int, quirk: bool) -> Layout:
    """The generation layout: left padding, positions cumsum(mask) - 1 (as `generate` derives them)."""
    length = max(len(e.input_ids) for e in examples)
    ids = np.full((len(examples), length), pad_id, np.int32)
    mask = np.zeros_like(ids)
    offsets = []
    for row, ex in enumerate(examples):
        off = length - len(ex.input_ids)
        ids[row, off:] = ex.input_ids
        mask[row, off:] = 1
        offsets.append(off)
    if quirk:  # open-unlearning's collator: mask = ids != pad (= eos)
        mask = (ids != eos_id).astype(np.int32)
    positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0).astype(np.int32)
    return Layout(ids, mask, positions, *_answer_positions(examples, offsets))


@dataclasses.dataclass
class Items:
    """The N items and everything derived from them that both sides use."""

    rows: list[dict]  # {forget}_perturbed rows: question, answer, paraphrased_answer, perturbed_answer
    forget: list[dict]  # objective batch: forget split rows (question, answer)
    retain: list[dict]  # and retain split rows
    examples: list[Example]  # (question, answer) of `rows`, chat-formatted with labels
    prompts: list[np.ndarray]  # generation prompts of `rows`' questions
    pad_id: int
    eos_id: int

    @property
    def questions(self) -> list[str]:
        return [r["question"] for r in self.rows]

    def eval_pairs(self) -> tuple[list[tuple[str, str]], list[int]]:
        """(question, answer) for each row's answer, paraphrased answer and perturbed answers, in
        that order, and how many perturbed answers each row has."""
        pairs = [(r["question"], r["answer"]) for r in self.rows]
        pairs += [(r["question"], r["paraphrased_answer"]) for r in self.rows]
        pairs += [(r["question"], p) for r in self.rows for p in r["perturbed_answer"]]
        return pairs, [len(r["perturbed_answer"]) for r in self.rows]

    def batches(self, batch_size: int, quirk: bool, side: str):
        """The items' (question, answer) sequences `batch_size` at a time, in one layout each."""
        make = right_padded if side == "right" else left_padded
        for start in range(0, len(self.examples), batch_size):
            yield make(self.examples[start:start + batch_size], self.pad_id, self.eos_id, quirk)

    def answer_positions(self) -> int:
        return sum(int(np.count_nonzero(np.asarray(e.labels[1:]) != IGNORE)) for e in self.examples)

    def objective_batch(self, tokenizer, settings: Settings) -> dict:
        """One step's batch: the forget and retain items right padded to one length and label width."""
        fmt = settings.fmt
        forget = encode_qa_pairs(tokenizer, [(r["question"], r["answer"]) for r in self.forget], fmt,
                                 settings.max_length)
        retain = encode_qa_pairs(tokenizer, [(r["question"], r["answer"]) for r in self.retain], fmt,
                                 settings.max_length)
        length = max(len(e.input_ids) for e in forget + retain)
        kw = dict(pad_id=self.pad_id, eot_id=self.eos_id, eot_mask_quirk=settings.eot_mask_quirk,
                  width=label_width(forget + retain, length))
        return {"forget": pad_examples(forget, length, **kw), "retain": pad_examples(retain, length, **kw),
                "forget_examples": forget}


def build_items(tokenizer, settings: Settings, rows: list[dict], forget: list[dict], retain: list[dict]) -> Items:
    n = settings.items
    for name, split in (("evaluation", rows), ("forget", forget), ("retain", retain)):
        if len(split) < n:
            raise NpoJaxError(f"--items {n}: the {name} split has only {len(split)} items")
    rows = rows[:n]
    examples = encode_qa_pairs(tokenizer, [(r["question"], r["answer"]) for r in rows], settings.fmt)
    prompts = encode_prompts(tokenizer, [r["question"] for r in rows], settings.fmt)
    return Items(rows, forget[:n], retain[:n], examples, prompts, pad_token_id(tokenizer), tokenizer.eos_token_id)
