"""The JAX scorer: a model handle plus batching settings, and the entry points its users call.

`score_and_generate` (the TOFU suite, as a `SuiteScorer`) scores (question, answer) pairs teacher
forced and answers the questions greedily, in one pass; the audit's probes call `score_answers`
(pairs only), `generate_answers` (questions only) and `generate_ids` (prompts given as token ids,
greedy or sampled), and relearn on a copy made by `with_params`. Per pair the score is the mean
token NLL over the answer's labelled tokens (the closing eos included, as open-unlearning's
`evaluate_probability`), and the per-token log-probs and greedy predictions of the answer tokens
without the eos (what `tokenwise_logprobs` and the extraction-strength / exact-memorization
metrics use).

The work is elsewhere: the model handle in `lm`, the compiled scoring passes in `teacher_forced`,
generation in `generation`, the batches and their order (prompt sharing, jobs in flight) in
`schedule`, batch shapes in `batching`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np

from npo_jax.data.tokenize import ChatFormat, encode_prompts, encode_qa_pairs
from npo_jax.errors import NpoJaxError
from npo_jax.eval.generation import generate_ids
from npo_jax.eval.lm import LoadedLM
from npo_jax.eval.protocol import Scored
from npo_jax.eval.schedule import Schedule


@dataclass
class Scorer:
    lm: LoadedLM
    # padded lengths: batches are sorted by length, so finer buckets mean less padding (a compile each)
    buckets: tuple = (64, 96, 128, 192, 256, 384, 512)
    batch_size: int = 16
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
    def tokenizer(self):
        return self.lm.tokenizer

    @property
    def fmt(self) -> ChatFormat:
        return self.lm.fmt

    @property
    def eot_mask_quirk(self) -> bool:
        return self.lm.eot_mask_quirk

    def with_params(self, params) -> Scorer:
        """The same scorer on other weights of the same model."""
        return dataclasses.replace(self, lm=self.lm.with_params(params))

    def score_answers(self, pairs: list[tuple[str, str]], progress=None) -> list[Scored]:
        return self.score_and_generate(pairs, [], progress)[0]

    def score_and_generate(self, pairs: list[tuple[str, str]], questions: list[str], progress=None,
                           timings: dict[str, float] | None = None) -> tuple[list[Scored], list[str]]:
        """`score_answers(pairs)` and `generate_answers(questions)` in one pass: when prompts are
        shared, a question that is also a pair's prompt is decoded from the cache its scoring
        prefill left, so the prompt runs once for both (a TOFU suite generates for exactly the
        questions it scores); the others get a prefill of their own (`generate_ids`)."""
        t0 = time.perf_counter()
        examples = encode_qa_pairs(self.lm.tokenizer, pairs, self.lm.fmt, self.buckets[-1])
        prompts = encode_prompts(self.lm.tokenizer, questions, self.lm.fmt)
        schedule = Schedule(self.lm, self.batch_size, self.prompt_group, self.answer_buckets, self.max_new_tokens)
        out, answers = schedule.run(schedule.jobs(examples, prompts, self.share_prompts, self.buckets),
                                    len(examples), len(questions), progress)
        rest = [j for j, a in enumerate(answers) if a is None]
        for j, a in zip(rest, self.generate_ids([prompts[j] for j in rest], progress), strict=True):
            answers[j] = a
        texts = [self.lm.text(a) for a in answers]
        if timings is not None:
            timings["scoring_and_generation_s"] = time.perf_counter() - t0
        return out, texts

    def generate_answers(self, questions: list[str], progress=None) -> list[str]:
        """Greedy answers decoded with special tokens skipped, cut at eos, stripped."""
        prompts = encode_prompts(self.lm.tokenizer, questions, self.lm.fmt)
        return [self.lm.text(t) for t in self.generate_ids(prompts, progress)]

    def generate_ids(self, prompts: list[np.ndarray], progress=None, *, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int = 0) -> list[np.ndarray]:
        """New tokens per prompt (token ids), cut at eos; sampled batch b uses `SeedSequence([seed, b])`."""
        return generate_ids(self.lm, prompts, batch_size=self.batch_size, max_new_tokens=self.max_new_tokens,
                            progress=progress, temperature=temperature, top_p=top_p, seed=seed)
