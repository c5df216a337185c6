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
third of the tokens in a TOFU suite (`share_prompts`). The prompts' shared first part (the chat
template's system turn, two thirds of a TOFU prompt) is prefilled once, as one row; the rest
of the prompts in groups of several batches, whose answers are batched across the group (fewer
part-filled batches, and fewer compiled shapes: one prompt width per group, not per batch).
`generate_answers` produces greedy answers with the KV cache (left padded prompts);
`score_and_generate` decodes them from the caches the scoring prefill left instead.
"""

from __future__ import annotations

import collections
import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from npo_jax.data.batches import bucket_length, pad_examples
from npo_jax.data.tokenize import IGNORE, ChatFormat, Example, encode_prompts, encode_qa_pairs, pad_token_id
from npo_jax.errors import NpoJaxError
from npo_jax.generate import decode, finished, generate
from npo_jax.logprobs import token_logprobs_and_argmax
from npo_jax.model import KVCache, merge_params, train_hidden

# prompts (prefilled for generation, or once per distinct prompt for scoring) are padded to a
# multiple of this: the prefill is a large part of their cost, so finer than the scoring
# buckets (more compiled shapes)
PROMPT_MULTIPLE = 16
# batches dispatched ahead of the one whose result is read (see `Scorer.score_and_generate`)
IN_FLIGHT = 2


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
def _prefill_prompts(graphdef, params, ids, mask, last, prefix=None):
    """KV cache of right-padded prompts (n, P), the hidden state of each prompt's last token (it
    predicts the answer's first token) and the mask over the cache's slots.

    Positions are 0..P-1, as `train_hidden` places them. With `prefix` (the cache, mask and
    real length of the prompts' shared first tokens, prefilled once as one row), the prompts
    hold only what follows it: their slots come after the prefix's, their positions after its
    real tokens (the prefix's padding slots are masked, so positions stay those of the whole)."""
    model = merge_params(graphdef, params)
    n, p = ids.shape
    positions = jnp.broadcast_to(jnp.arange(p), ids.shape)
    cache, start = KVCache.zeros(model.config, n, p, model.compute_dtype), 0
    if prefix is not None:
        prefix_cache, prefix_mask, prefix_len = prefix
        start = prefix_mask.shape[1]
        cache = KVCache(*(jnp.concatenate([jnp.broadcast_to(c, (c.shape[0], n, *c.shape[2:])), z], axis=3)
                          for c, z in zip(prefix_cache, cache, strict=True)))
        mask = jnp.concatenate([jnp.broadcast_to(prefix_mask, (n, start)), mask], axis=1)
        positions = positions + prefix_len
    h, cache = model.hidden_states(ids, mask, positions, cache, cache_index=start)
    return cache, h[jnp.arange(n), last], mask


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


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_ids", "pad_id"))
def _greedy_on_prompts(graphdef, params, prompts, rows, lengths, wanted, *, max_new_tokens, eos_ids, pad_id):
    """Greedy answers decoded from the prompts `rows` of `_prefill_prompts`' output (right-padded
    prompts of `lengths` tokens, positions 0..length-1 as generation gives them); rows not
    `wanted` stay pad."""
    cache, last_hidden, mask = prompts
    model = merge_params(graphdef, params)
    cache = KVCache(cache.k[:, rows], cache.v[:, rows])
    return decode(model, cache, mask[rows], model.logits(last_hidden[rows]), lengths, jax.random.key(0), ~wanted,
                  max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id, temperature=0.0, top_p=1.0)


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
    # distinct prompts prefilled together, in batches: answers (and decoded questions) are batched
    # across the group, so fewer batches are part-filled and fewer shapes compile; the group's KV
    # cache (prompt slots only) is what this bounds
    prompt_group: int = 4
    answer_buckets: tuple = (4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96, 128, 192, 256, 384, 512)

    def __post_init__(self):
        for name in ("batch_size", "prompt_group"):
            if getattr(self, name) < 1:
                raise NpoJaxError(f"Scorer.{name} must be at least 1 (got {getattr(self, name)})")

    @property
    def pad_id(self) -> int:
        return pad_token_id(self.tokenizer)

    @functools.cached_property
    def eos_ids(self) -> tuple:
        """What ends a generated answer: the tokenizer's eos and the model config's (read once:
        the config comes from merging the params on the host)."""
        cfg = merge_params(self.graphdef, self.params).config
        return tuple(sorted({self.tokenizer.eos_token_id, *cfg.eos_token_ids}))

    def score_answers(self, pairs: list[tuple[str, str]], progress=None) -> list[Scored]:
        return self.score_and_generate(pairs, [], progress)[0]

    def score_and_generate(self, pairs: list[tuple[str, str]], questions: list[str],
                           progress=None) -> tuple[list[Scored], list[str]]:
        """`score_answers(pairs)` and `generate_answers(questions)` in one pass: when prompts are
        shared, a question that is also a pair's prompt is decoded from the cache its scoring
        prefill left, so the prompt runs once for both (a TOFU suite generates for exactly the
        questions it scores). Not with `eot_mask_quirk`: its generation positions (the mask's
        cumsum) are not scoring's (0..L-1), so those questions get a prefill of their own."""
        examples = encode_qa_pairs(self.tokenizer, pairs, self.fmt, self.buckets[-1])
        splits = [_prompt_split(e) for e in examples]
        groups: dict[bytes, list[int]] = {}  # examples by their exact prompt tokens
        for i, (e, f) in enumerate(zip(examples, splits, strict=True)):
            groups.setdefault(e.input_ids[:f].tobytes(), []).append(i)
        share = self.share_prompts if self.share_prompts is not None else len(examples) >= 2 * len(groups)
        prompts = encode_prompts(self.tokenizer, questions, self.fmt)
        wanted: dict[bytes, list[int]] = {}  # questions by prompt tokens, for those a scored prompt has
        if share and not self.eot_mask_quirk:
            for j, p in enumerate(prompts):
                key = p.tobytes()
                if key in groups:
                    wanted.setdefault(key, []).append(j)
        jobs = (self._dispatch_shared(examples, splits, groups, wanted) if share
                else self._dispatch_whole(examples))
        out: list[Scored | None] = [None] * len(examples)
        answers: list[np.ndarray | None] = [None] * len(questions)
        # a few batches run ahead of the one being read (host and device overlap); not all of
        # them: each dispatched batch holds its temporaries (the logits) until it has run
        in_flight: collections.deque = collections.deque()
        for job in jobs:
            in_flight.append(job)
            if len(in_flight) > IN_FLIGHT:
                self._read(in_flight.popleft(), out, answers, progress)
        while in_flight:
            self._read(in_flight.popleft(), out, answers, progress)
        rest = [j for j, a in enumerate(answers) if a is None]
        for j, a in zip(rest, self.generate_ids([prompts[j] for j in rest], progress), strict=True):
            answers[j] = a
        return out, [self._text(a) for a in answers]

    def _read(self, job, out: list, answers: list, progress) -> None:
        """Fetch one dispatched job's result into `out` (scores) or `answers` (decoded tokens)."""
        kind, where, targets, result = job
        if kind == "decode":
            gen = finished(*jax.device_get(result), self.eos_ids)
            for row, js in where.items():
                for j in js:
                    answers[j] = gen.tokens[row, : gen.lengths[row]]
            done = sum(map(len, where.values()))
        else:
            logp, preds, mask = jax.device_get(result)
            for row, i in enumerate(where):
                m = mask[row]  # over the row's labelled positions, in order
                lp, pred, tgt = logp[row][m], preds[row][m], targets[row][m]
                # the closing eos is dropped from the per-token arrays, as tokenwise_logprobs does
                out[i] = Scored(float(-lp.sum() / max(m.sum(), 1)), lp[:-1], pred[:-1], tgt[:-1])
            done = len(where)
        if progress is not None:
            progress.update(done)

    def _pad(self, examples: list[Example], buckets) -> dict[str, np.ndarray]:
        """Right padded to the bucket of the longest, with the collator's mask (eot quirk included)."""
        length = bucket_length(max(len(e.input_ids) for e in examples), list(buckets))
        return pad_examples(examples, length, self.pad_id, self.tokenizer.eos_token_id, self.eot_mask_quirk)

    def _dispatch_whole(self, examples: list[Example]):
        """Whole sequences, sorted by length, a batch per `batch_size`: yields ("score", indices,
        targets, result) as each batch is dispatched."""
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            chunk = [examples[i] for i in idx]
            chunk += [chunk[-1]] * (self.batch_size - len(chunk))  # one shape per bucket
            batch = self._pad(chunk, self.buckets)
            targets = np.take_along_axis(batch["labels"], np.maximum(batch["label_positions"], 0) + 1, axis=1)
            yield "score", idx, targets, _score_batch(self.graphdef, self.params, batch)

    def _dispatch_shared(self, examples: list[Example], splits: list[int], groups: dict[bytes, list[int]],
                         wanted: dict[bytes, list[int]]):
        """`prompt_group` x `batch_size` distinct prompts at a time: their prefill, then their
        answers on its cache in batches of `batch_size` (sorted by length across the group), then
        greedy answers to the `wanted` ones decoded from it, `batch_size` rows at a time. Yields
        ("score", indices, targets, result) and ("decode", {row: questions}, None, result) as
        each is dispatched."""
        keys = sorted(groups, key=lambda k: splits[groups[k][0]])
        groups = [groups[k] for k in keys]
        prefix = self._prefill_prefix([examples[g[0]].input_ids[:splits[g[0]]] for g in groups])
        size = self.batch_size * self.prompt_group
        for start in range(0, len(groups), size):
            chunk = groups[start:start + size]
            # a part-filled group prefills as few rows as the next power of two (a compile of its own)
            firsts = [g[0] for g in chunk] + [chunk[-1][0]] * (_rows(len(chunk), size) - len(chunk))
            prompts = self._prefill([Example(examples[i].input_ids[:splits[i]], examples[i].labels[:splits[i]])
                                     for i in firsts], prefix)
            rows = sorted(((r, i) for r, g in enumerate(chunk) for i in g),
                          key=lambda ri: len(examples[ri[1]].input_ids) - splits[ri[1]])
            for s in range(0, len(rows), self.batch_size):
                part = rows[s:s + self.batch_size]
                idx = [i for _, i in part]
                part += [part[-1]] * (self.batch_size - len(part))
                yield "score", idx, *self._answers_batch(examples, splits, prompts, part)
            asked = [(r, wanted[k]) for r, k in enumerate(keys[start:start + size]) if k in wanted]
            for s in range(0, len(asked), self.batch_size):
                part = asked[s:s + self.batch_size]
                sel = [r for r, _ in part]
                sel += [sel[-1]] * (_rows(len(sel), self.batch_size) - len(sel))  # filler rows start done
                lengths = np.asarray([splits[firsts[r]] for r in sel], np.int32)
                yield "decode", {row: js for row, (_, js) in enumerate(part)}, None, _greedy_on_prompts(
                    self.graphdef, self.params, prompts, np.asarray(sel, np.int32), lengths,
                    np.arange(len(sel)) < len(part),
                    max_new_tokens=self.max_new_tokens, eos_ids=self.eos_ids, pad_id=self.pad_id)

    def _prefill_prefix(self, prompts: list[np.ndarray]):
        """The prompts' longest shared first part (a chat template's system turn), prefilled once
        as one row (unpadded: every answer attends to its slots), with its real length; None
        when shorter than `PROMPT_MULTIPLE` tokens. Every prompt keeps at least one token of its own."""
        n = min(len(p) for p in prompts) - 1
        diff = np.flatnonzero(np.any(np.stack([p[:n] for p in prompts]) != prompts[0][:n], axis=0))
        shared = int(diff[0]) if len(diff) else n
        if shared < PROMPT_MULTIPLE:
            return None
        tokens = prompts[0][:shared]
        batch = self._pad([Example(tokens, np.full(shared, IGNORE, np.int32))], (shared,))
        cache, _, mask = _prefill_prompts(self.graphdef, self.params, batch["input_ids"],
                                          jnp.asarray(batch["attention_mask"]), np.asarray([shared - 1], np.int32))
        return cache, mask, np.int32(shared)

    def _prefill(self, prompts: list[Example], prefix):
        """(cache, last hidden states, slot mask) of right-padded prompts, after `prefix` if given."""
        cut = 0 if prefix is None else int(prefix[2])
        batch = self._pad([Example(e.input_ids[cut:], e.labels[cut:]) for e in prompts],
                          (_prompt_width(max(len(e.input_ids) for e in prompts) - cut),))
        last = np.asarray([len(e.input_ids) - cut - 1 for e in prompts], np.int32)
        return _prefill_prompts(self.graphdef, self.params, batch["input_ids"], jnp.asarray(batch["attention_mask"]),
                                last, prefix)

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
        return [self._text(t) for t in self.generate_tokens(questions, progress)]

    def _text(self, tokens: np.ndarray) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    def generate_tokens(self, questions: list[str], progress=None) -> list[np.ndarray]:
        return self.generate_ids(encode_prompts(self.tokenizer, questions, self.fmt), progress)

    def generate_ids(self, prompts: list[np.ndarray], progress=None, *, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int = 0) -> list[np.ndarray]:
        """New tokens per prompt (cut at eos): sorted by length, left padded to a multiple of
        `PROMPT_MULTIPLE`, a fixed batch size (the last batch: the next power of two), so generation
        compiles once per width (and row count). Sampled batch b uses `SeedSequence([seed, b])`."""
        eos = self.tokenizer.eos_token_id
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
                           eos_ids=self.eos_ids, pad_id=self.pad_id, temperature=temperature, top_p=top_p,
                           seed=batch_seed)
            for row, i in enumerate(idx):
                answers[i] = gen.tokens[row, : gen.lengths[row]]
            if progress is not None:
                progress.update(len(idx))
        return answers
