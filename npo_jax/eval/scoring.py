"""Scoring many (question, answer) pairs with the model: teacher-forced log-probs and greedy answers.

`score_answers` returns, per pair, the mean token NLL over the answer's labelled tokens (the
closing eos included, as open-unlearning's `evaluate_probability`), and the per-token log-probs
and greedy predictions of the answer tokens without the eos (what `tokenwise_logprobs` and
the extraction-strength / exact-memorization metrics use). Batches are right padded to a
length bucket and jit-compiled once per bucket; the LM head runs on the answer positions only.
`generate_answers` produces greedy answers with the KV cache (left padded prompts).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import numpy as np

from npo_jax.data.batches import bucket_length, pad_examples
from npo_jax.data.tokenize import ChatFormat, encode_prompts, encode_qa_pairs
from npo_jax.generate import generate
from npo_jax.logprobs import token_logprobs_and_argmax
from npo_jax.losses import train_hidden
from npo_jax.model import merge_params


@dataclass
class Scored:
    avg_loss: float  # mean NLL over labelled tokens (answer + eos)
    token_logprobs: np.ndarray  # answer tokens without the final eos
    preds: np.ndarray  # greedy predictions for those tokens
    labels: np.ndarray


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score_batch(graphdef, params, batch):
    model = merge_params(graphdef, params)
    hidden = train_hidden(model, batch["input_ids"], batch["attention_mask"])
    return token_logprobs_and_argmax(model.logits, hidden, batch["labels"], positions=batch["label_positions"])


@dataclass
class Scorer:
    graphdef: object
    params: object
    tokenizer: object
    fmt: ChatFormat = ChatFormat()
    # padded lengths: batches are sorted by length, so finer buckets mean less padding (a compile each)
    buckets: tuple = (64, 96, 128, 192, 256, 384, 512)
    batch_size: int = 16
    eot_mask_quirk: bool = False
    max_new_tokens: int = 200

    @property
    def pad_id(self) -> int:
        t = self.tokenizer
        return t.pad_token_id if t.pad_token_id is not None else t.eos_token_id

    def score_answers(self, pairs: list[tuple[str, str]], progress=None) -> list[Scored]:
        examples = encode_qa_pairs(self.tokenizer, pairs, self.fmt, self.buckets[-1])
        out: list[Scored | None] = [None] * len(examples)
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
        pending = []  # every batch is dispatched before the first result is read: host and device overlap
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            chunk = [examples[i] for i in idx]
            length = bucket_length(max(len(e.input_ids) for e in chunk), list(self.buckets))
            chunk += [chunk[-1]] * (self.batch_size - len(chunk))  # one shape per bucket
            batch = pad_examples(chunk, length, self.pad_id, self.tokenizer.eos_token_id, self.eot_mask_quirk)
            pending.append((idx, batch, _score_batch(self.graphdef, self.params, batch)))
        for idx, batch, result in pending:
            logp, preds, mask = jax.device_get(result)
            for row, i in enumerate(idx):
                m = mask[row]  # over the row's label positions, in order
                lp, pred = logp[row][m], preds[row][m]
                targets = batch["labels"][row][batch["label_positions"][row][m] + 1]
                # the closing eos is dropped from the per-token arrays, as tokenwise_logprobs does
                out[i] = Scored(float(-lp.sum() / max(m.sum(), 1)), lp[:-1], pred[:-1], targets[:-1])
            if progress is not None:
                progress.update(len(idx))
        return out

    def generate_answers(self, questions: list[str], progress=None) -> list[str]:
        """Greedy answers decoded with special tokens skipped, cut at eos, stripped."""
        return [self.tokenizer.decode(t, skip_special_tokens=True).strip()
                for t in self.generate_tokens(questions, progress)]

    def generate_tokens(self, questions: list[str], progress=None) -> list[np.ndarray]:
        return self.generate_ids(encode_prompts(self.tokenizer, questions, self.fmt), progress)

    def generate_ids(self, prompts: list[np.ndarray], progress=None, *, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int = 0) -> list[np.ndarray]:
        """New tokens per prompt (cut at eos): sorted by length, left padded to a bucket, a fixed batch
        size, so generation compiles once per bucket. Sampled batch b uses `SeedSequence([seed, b])`."""
        eos = self.tokenizer.eos_token_id
        cfg = merge_params(self.graphdef, self.params).config
        eos_ids = tuple(sorted({eos, *cfg.eos_token_ids}))
        answers: list[np.ndarray | None] = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        for b, start in enumerate(range(0, len(order), self.batch_size)):
            idx = order[start:start + self.batch_size]
            chunk = [prompts[i] for i in idx]
            chunk += [chunk[-1]] * (self.batch_size - len(chunk))
            longest, last = max(len(p) for p in chunk), self.buckets[-1]
            width = bucket_length(longest, list(self.buckets)) if longest <= last else -(-longest // last) * last
            ids = np.full((len(chunk), width), self.pad_id, np.int32)
            mask = np.zeros_like(ids)
            for row, p in enumerate(chunk):
                ids[row, width - len(p):] = p
                mask[row, width - len(p):] = 1
            if self.eot_mask_quirk:  # open-unlearning's collator: mask = ids != pad (= eos)
                mask = (ids != eos).astype(np.int32)
            batch_seed = int(np.random.SeedSequence([seed, b]).generate_state(1)[0]) if temperature > 0 else 0
            gen = generate(self.graphdef, self.params, ids, mask, max_new_tokens=self.max_new_tokens,
                           eos_ids=eos_ids, pad_id=self.pad_id, temperature=temperature, top_p=top_p,
                           seed=batch_seed)
            for row, i in enumerate(idx):
                answers[i] = gen.tokens[row, : gen.lengths[row]]
            if progress is not None:
                progress.update(len(idx))
        return answers
