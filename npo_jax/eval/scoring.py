"""Scoring many (question, answer) pairs with the model: teacher-forced log-probs and greedy answers.

`score_answers` returns, per pair, the mean token NLL over the answer's labelled tokens (the
closing eos included, as open-unlearning's `evaluate_probability`), and the per-token log-probs
and greedy predictions of the answer tokens without the eos (what `tokenwise_logprobs` and
the extraction-strength / exact-memorization metrics use). Batches are right padded to a
length bucket and jit-compiled once per bucket; the LM head runs on the answer positions only.

A TOFU suite scores 7-10 answers per question (the answer, its paraphrase, the perturbed ones),
and with the chat template the prompt is most of each sequence. When prompts repeat, each
distinct prompt runs once (a prefill into the KV cache), and every answer runs on top of its
prompt's cache: the same tokens, positions and causal attention as the whole sequence, for a
third of the tokens in a TOFU suite (`share_prompts`).
`generate_answers` produces greedy answers with the KV cache (left padded prompts).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from npo_jax.data.batches import bucket_length, pad_examples
from npo_jax.data.tokenize import IGNORE, ChatFormat, Example, encode_prompts, encode_qa_pairs
from npo_jax.generate import generate
from npo_jax.logprobs import token_logprobs_and_argmax
from npo_jax.losses import train_hidden
from npo_jax.model import KVCache, merge_params

# prompts (prefilled for generation, or once per distinct prompt for scoring) are padded to a
# multiple of this: the prefill is a large part of their cost, so finer than the scoring
# buckets (more compiled shapes)
PROMPT_MULTIPLE = 16


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


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _prefill_prompts(graphdef, params, ids, mask, last):
    """KV cache of right-padded prompts (n, P) at positions 0..P-1, as `train_hidden` places them,
    and the hidden state of each prompt's last token (it predicts the answer's first token)."""
    model = merge_params(graphdef, params)
    n, p = ids.shape
    cache = KVCache.zeros(model.config, n, p, model.compute_dtype)
    positions = jnp.broadcast_to(jnp.arange(p), ids.shape)
    h, cache = model.hidden_states(ids, mask, positions, cache, cache_index=0)
    return cache, h[jnp.arange(n), last]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score_on_prompts(graphdef, params, prompts, rows, ids, mask, labels, offsets):
    """Score right-padded answers (b, A) on the prompts `rows` of `prompts` (cache, last hidden
    states, attention mask): positions continue each prompt's (`offsets`), keys are the prompt's
    cache slots, then the answer's own."""
    cache, last_hidden, prompt_mask = prompts
    model = merge_params(graphdef, params)
    b, a = ids.shape

    def with_answer_slots(c):  # (layers, b, kv_heads, P + A, head_dim)
        return jnp.concatenate([c[:, rows], jnp.zeros((c.shape[0], b, c.shape[2], a, c.shape[4]), c.dtype)], axis=3)

    h, _ = model.hidden_states(ids, jnp.concatenate([prompt_mask[rows], mask], axis=1),
                               offsets[:, None] + jnp.arange(a),
                               KVCache(with_answer_slots(cache.k), with_answer_slots(cache.v)),
                               cache_index=cache.k.shape[3])
    # hidden state t predicts token t + 1: the prompt's last state, then the answer's own
    h = jnp.concatenate([last_hidden[rows][:, None].astype(h.dtype), h], axis=1)
    labels = jnp.concatenate([jnp.full((b, 1), IGNORE, labels.dtype), labels], axis=1)
    return token_logprobs_and_argmax(model.logits, h, labels)


def _prompt_width(n: int) -> int:
    return -(-n // PROMPT_MULTIPLE) * PROMPT_MULTIPLE


def _rows(n: int, batch_size: int) -> int:
    """Rows a batch of n runs as: the batch size, or the next power of two for a part-filled one."""
    return min(batch_size, 1 << (n - 1).bit_length())


def _prompt_split(ex: Example) -> int:
    """Where an example's answer starts: its first labelled token (at least one token each side)."""
    labelled = np.flatnonzero(ex.labels != IGNORE)
    first = int(labelled[0]) if len(labelled) else len(ex.input_ids)
    return max(1, min(first, len(ex.input_ids) - 1))


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
    # None: run each distinct prompt once when prompts repeat (on average twice or more per call)
    share_prompts: bool | None = None
    answer_buckets: tuple = (4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96, 128, 192, 256, 384, 512)

    @property
    def pad_id(self) -> int:
        t = self.tokenizer
        return t.pad_token_id if t.pad_token_id is not None else t.eos_token_id

    def score_answers(self, pairs: list[tuple[str, str]], progress=None) -> list[Scored]:
        examples = encode_qa_pairs(self.tokenizer, pairs, self.fmt, self.buckets[-1])
        splits = [_prompt_split(e) for e in examples]
        groups: dict[bytes, list[int]] = {}  # examples by their exact prompt tokens
        for i, (e, f) in enumerate(zip(examples, splits, strict=True)):
            groups.setdefault(e.input_ids[:f].tobytes(), []).append(i)
        share = self.share_prompts if self.share_prompts is not None else len(examples) >= 2 * len(groups)
        # every batch is dispatched before the first result is read: host and device overlap
        pending = (self._dispatch_shared(examples, splits, list(groups.values())) if share
                   else self._dispatch_whole(examples))
        out: list[Scored | None] = [None] * len(examples)
        for idx, targets, result in pending:
            logp, preds, mask = jax.device_get(result)
            for row, i in enumerate(idx):
                m = mask[row]  # over the row's labelled positions, in order
                lp, pred, tgt = logp[row][m], preds[row][m], targets[row][m]
                # the closing eos is dropped from the per-token arrays, as tokenwise_logprobs does
                out[i] = Scored(float(-lp.sum() / max(m.sum(), 1)), lp[:-1], pred[:-1], tgt[:-1])
            if progress is not None:
                progress.update(len(idx))
        return out

    def _pad(self, examples: list[Example], buckets) -> dict[str, np.ndarray]:
        """Right padded to the bucket of the longest, with the collator's mask (eot quirk included)."""
        length = bucket_length(max(len(e.input_ids) for e in examples), list(buckets))
        return pad_examples(examples, length, self.pad_id, self.tokenizer.eos_token_id, self.eot_mask_quirk)

    def _dispatch_whole(self, examples: list[Example]):
        """Whole sequences, sorted by length, a batch per `batch_size`: [(indices, targets, result)]."""
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
        pending = []
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            chunk = [examples[i] for i in idx]
            chunk += [chunk[-1]] * (self.batch_size - len(chunk))  # one shape per bucket
            batch = self._pad(chunk, self.buckets)
            targets = np.take_along_axis(batch["labels"], np.maximum(batch["label_positions"], 0) + 1, axis=1)
            pending.append((idx, targets, _score_batch(self.graphdef, self.params, batch)))
        return pending

    def _dispatch_shared(self, examples: list[Example], splits: list[int], groups: list[list[int]]):
        """`batch_size` distinct prompts at a time: their prefill, then their answers on its cache."""
        groups = sorted(groups, key=lambda g: splits[g[0]])
        pending = []
        for start in range(0, len(groups), self.batch_size):
            chunk = groups[start:start + self.batch_size]
            # a part-filled chunk prefills as few rows as the next power of two (a compile of its own)
            firsts = [g[0] for g in chunk] + [chunk[-1][0]] * (_rows(len(chunk), self.batch_size) - len(chunk))
            batch = self._pad([Example(examples[i].input_ids[:splits[i]], examples[i].labels[:splits[i]])
                               for i in firsts], (_prompt_width(max(splits[i] for i in firsts)),))
            last = np.asarray([splits[i] - 1 for i in firsts], np.int32)
            mask = jnp.asarray(batch["attention_mask"])
            prompts = (*_prefill_prompts(self.graphdef, self.params, batch["input_ids"], mask, last), mask)
            rows = sorted(((r, i) for r, g in enumerate(chunk) for i in g),
                          key=lambda ri: len(examples[ri[1]].input_ids) - splits[ri[1]])
            for s in range(0, len(rows), self.batch_size):
                part = rows[s:s + self.batch_size]
                idx = [i for _, i in part]
                part += [part[-1]] * (self.batch_size - len(part))
                pending.append((idx, *self._answers_batch(examples, splits, prompts, part)))
        return pending

    def _answers_batch(self, examples, splits, prompts, part):
        """(targets, result) for (prompt row, example) pairs, answers right padded to a bucket."""
        batch = self._pad([Example(examples[i].input_ids[splits[i]:], examples[i].labels[splits[i]:])
                           for _, i in part], self.answer_buckets)
        rows = np.asarray([r for r, _ in part], np.int32)
        offsets = np.asarray([splits[i] for _, i in part], np.int32)
        return batch["labels"], _score_on_prompts(self.graphdef, self.params, prompts, rows, batch["input_ids"],
                                                  batch["attention_mask"], batch["labels"], offsets)

    def generate_answers(self, questions: list[str], progress=None) -> list[str]:
        """Greedy answers decoded with special tokens skipped, cut at eos, stripped."""
        return [self.tokenizer.decode(t, skip_special_tokens=True).strip()
                for t in self.generate_tokens(questions, progress)]

    def generate_tokens(self, questions: list[str], progress=None) -> list[np.ndarray]:
        return self.generate_ids(encode_prompts(self.tokenizer, questions, self.fmt), progress)

    def generate_ids(self, prompts: list[np.ndarray], progress=None, *, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int = 0) -> list[np.ndarray]:
        """New tokens per prompt (cut at eos): sorted by length, left padded to a multiple of
        `PROMPT_MULTIPLE`, a fixed batch size (the last batch: the next power of two), so generation
        compiles once per width (and row count). Sampled batch b uses `SeedSequence([seed, b])`."""
        eos = self.tokenizer.eos_token_id
        cfg = merge_params(self.graphdef, self.params).config
        eos_ids = tuple(sorted({eos, *cfg.eos_token_ids}))
        answers: list[np.ndarray | None] = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        for b, start in enumerate(range(0, len(order), self.batch_size)):
            idx = order[start:start + self.batch_size]
            chunk = [prompts[i] for i in idx]
            # a part-filled last batch decodes as few rows as the next power of two (a compile of its
            # own): every decode step streams all weights whatever the row count
            chunk += [chunk[-1]] * (_rows(len(chunk), self.batch_size) - len(chunk))
            width = _prompt_width(max(len(p) for p in chunk))
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
