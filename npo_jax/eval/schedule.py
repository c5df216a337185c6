"""The scheduler: in what batches and order a call's scoring and generation run, and their results read.

A TOFU suite scores 7-10 answers per question (the answer, its paraphrase, the perturbed ones),
and with the chat template the prompt is most of each sequence. When prompts repeat, each
distinct prompt runs once (a prefill into the KV cache), and every answer runs on top of its
prompt's cache: the same tokens, positions and causal attention as the whole sequence, for a
third of the tokens in a TOFU suite. The prompts' shared first part (the chat template's system
turn, two thirds of a TOFU prompt) is prefilled once, as one row; the rest of the prompts in
groups of several batches, whose answers are batched across the group (fewer part-filled
batches, and fewer compiled shapes: one prompt width per group, not per batch). Questions whose
prompt a group holds are answered by greedy decoding from its cache, so the prompt runs once
for both. Otherwise whole sequences are scored, sorted by length, a batch at a time.

Each batch is dispatched as a job (`ScoreJob`, `DecodeJob`: what it is for and its device
result), and `IN_FLIGHT` jobs run ahead of the one being read: host and device overlap, while
each dispatched job holds its temporaries (the logits) only until it is read.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from npo_jax.data.batches import length_sorted_batches
from npo_jax.data.tokenize import Example
from npo_jax.eval.batching import part_rows
from npo_jax.eval.generation import decode_on_prompts, read_decoded
from npo_jax.eval.lm import LoadedLM
from npo_jax.eval.protocol import Scored
from npo_jax.eval.teacher_forced import (
    prefill,
    prefill_prefix,
    prompt_split,
    read_scores,
    score_answers_on,
    score_whole,
)

# batches dispatched ahead of the one whose result is read
IN_FLIGHT = 2


class ScoreJob(NamedTuple):
    pairs: list[int]  # the pairs the batch's first rows score, in row order (the rest are filler)
    targets: np.ndarray  # (rows, positions): the tokens whose log-probs `result` holds, where its mask is set
    result: object  # the dispatched (log-probs, predictions, mask), not yet fetched


class DecodeJob(NamedTuple):
    questions: list[list[int]]  # per wanted row, in order, the questions its greedy answer answers
    result: object  # the dispatched (tokens, steps) of `generate.decode`, not yet fetched


Job = ScoreJob | DecodeJob


@dataclass(frozen=True)
class Schedule:
    lm: LoadedLM
    batch_size: int
    # distinct prompts prefilled together, in batches (see the module docstring)
    prompt_group: int
    answer_buckets: tuple
    max_new_tokens: int

    def jobs(self, examples: list[Example], prompts: list[np.ndarray], share: bool | None,
             buckets) -> Iterator[Job]:
        """The jobs for scoring `examples` and answering the `prompts` a scored example shares
        (each distinct prompt once when `share`; None: when prompts repeat twice or more on
        average). Not with the eot mask quirk: its generation positions (the mask's cumsum) are
        not scoring's (0..L-1), so no prompt is answered here."""
        if not examples:
            return iter(())
        splits = [prompt_split(e) for e in examples]
        groups: dict[bytes, list[int]] = {}  # examples by their exact prompt tokens
        for i, (e, f) in enumerate(zip(examples, splits, strict=True)):
            groups.setdefault(e.input_ids[:f].tobytes(), []).append(i)
        if not (share if share is not None else len(examples) >= 2 * len(groups)):
            return self.whole(examples, buckets)
        wanted: dict[bytes, list[int]] = {}  # questions by prompt tokens, for those a scored prompt has
        if not self.lm.eot_mask_quirk:
            for j, p in enumerate(prompts):
                key = p.tobytes()
                if key in groups:
                    wanted.setdefault(key, []).append(j)
        return self.shared(examples, splits, groups, wanted)

    def whole(self, examples: list[Example], buckets) -> Iterator[ScoreJob]:
        """Whole sequences sorted by length, `batch_size` rows each, right padded to `buckets`."""
        for idx, padded in length_sorted_batches([len(e.input_ids) for e in examples], self.batch_size):
            yield ScoreJob(idx, *score_whole(self.lm, [examples[i] for i in padded], buckets))

    def shared(self, examples: list[Example], splits: list[int], groups: dict[bytes, list[int]],
               wanted: dict[bytes, list[int]]) -> Iterator[Job]:
        """`prompt_group` x `batch_size` distinct prompts at a time: their prefill (after the shared
        prefix), then their answers on its cache, then greedy answers to the `wanted` ones."""
        keys = sorted(groups, key=lambda k: splits[groups[k][0]])
        members = [groups[k] for k in keys]
        prefix = prefill_prefix(self.lm, [examples[g[0]].input_ids[:splits[g[0]]] for g in members])
        size = self.batch_size * self.prompt_group
        for start in range(0, len(members), size):
            chunk = members[start:start + size]
            # a part-filled group prefills as few rows as the next power of two (a compile of its own)
            firsts = [g[0] for g in chunk] + [chunk[-1][0]] * (part_rows(len(chunk), size) - len(chunk))
            prompts = prefill(self.lm, [Example(examples[i].input_ids[:splits[i]], examples[i].labels[:splits[i]])
                                           for i in firsts], prefix)
            yield from self._answer_jobs(examples, splits, prompts, chunk)
            asked = [(r, wanted[k]) for r, k in enumerate(keys[start:start + size]) if k in wanted]
            yield from self._decode_jobs(prompts, [splits[i] for i in firsts], asked)

    def _answer_jobs(self, examples, splits, prompts, chunk: list[list[int]]) -> Iterator[ScoreJob]:
        """The group's answers on its prompt rows, sorted by length across the group."""
        rows = [(r, i) for r, g in enumerate(chunk) for i in g]
        lengths = [len(examples[i].input_ids) - splits[i] for _, i in rows]
        for idx, padded in length_sorted_batches(lengths, self.batch_size):
            part = [rows[k] for k in padded]
            answers = [Example(examples[i].input_ids[splits[i]:], examples[i].labels[splits[i]:]) for _, i in part]
            yield ScoreJob([rows[k][1] for k in idx], *score_answers_on(
                self.lm, prompts, answers, [r for r, _ in part], [splits[i] for _, i in part], self.answer_buckets))

    def _decode_jobs(self, prompts, lengths: list[int], asked: list[tuple[int, list[int]]]) -> Iterator[DecodeJob]:
        """Greedy answers for (prompt row, questions) `asked`, decoded `batch_size` rows at a time."""
        for s in range(0, len(asked), self.batch_size):
            part = asked[s:s + self.batch_size]
            sel = [r for r, _ in part]
            sel += [sel[-1]] * (part_rows(len(sel), self.batch_size) - len(sel))  # filler rows start done
            yield DecodeJob([js for _, js in part], decode_on_prompts(
                self.lm, prompts, sel, [lengths[r] for r in sel], len(part), self.max_new_tokens))

    def run(self, jobs: Iterable[Job], n_pairs: int, n_questions: int,
            progress=None) -> tuple[list[Scored | None], list[np.ndarray | None]]:
        """Dispatch `jobs`, reading each once `IN_FLIGHT` more are dispatched: per pair its score,
        per question its answer's tokens (None where no job answered it)."""
        out: list[Scored | None] = [None] * n_pairs
        answers: list[np.ndarray | None] = [None] * n_questions
        in_flight: collections.deque = collections.deque()
        for job in jobs:
            in_flight.append(job)
            if len(in_flight) > IN_FLIGHT:
                self._read(in_flight.popleft(), out, answers, progress)
        while in_flight:
            self._read(in_flight.popleft(), out, answers, progress)
        return out, answers

    def _read(self, job: Job, out: list, answers: list, progress) -> None:
        """Fetch one dispatched job's result into `out` (scores) or `answers` (decoded tokens)."""
        if isinstance(job, DecodeJob):
            for tokens, js in zip(read_decoded(job.result, self.lm.eos_ids, len(job.questions)),
                                  job.questions, strict=True):
                for j in js:
                    answers[j] = tokens
            done = sum(map(len, job.questions))
        else:
            for i, s in zip(job.pairs, read_scores(job.result, job.targets, len(job.pairs)), strict=True):
                out[i] = s
            done = len(job.pairs)
        if progress is not None:
            progress.update(done)
