"""The same per-item quantities computed with transformers (PyTorch), following open-unlearning's
`preprocess_chat_instance`, `evaluate_probability`, `tokenwise_logprobs` and `eval_text_similarity`.

Independent of the JAX evaluator (own tokenization, one item at a time, HF forward and
`generate`), so that the parity tool and tests compare two implementations. Needs torch.
"""

from __future__ import annotations

import time

import numpy as np

from npo_jax.data.tokenize import pad_token_id
from npo_jax.eval.protocol import Scored


def _chat(question, answer, system_prompt, with_answer=True):
    chat = [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]
    if with_answer:
        chat.append({"role": "assistant", "content": answer})
    return chat


def _ids(tokenizer, chat, date_string, generation_prompt):
    out = tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=generation_prompt,
                                        return_dict=False, date_string=date_string)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _encode(tokenizer, question, answer, system_prompt, date_string):
    chat_ids = _ids(tokenizer, _chat(question, answer, system_prompt), date_string, False)
    prompt_ids = _ids(tokenizer, _chat(question, answer, system_prompt, False), date_string, True)
    if chat_ids[-1] != tokenizer.eos_token_id:
        chat_ids.append(tokenizer.eos_token_id)
    return chat_ids, [-100] * len(prompt_ids) + chat_ids[len(prompt_ids):]


def hf_score_batch(model, tokenizer, pairs, *, batch_size=16, system_prompt="You are a helpful assistant.",
                   date_string="10 Apr 2025", eot_mask_quirk=False) -> list[dict]:
    """hf_score for many pairs, right-padded batches as open-unlearning's collator makes them
    (with `eot_mask_quirk`, its mask `ids != eos` with pad = eos, which hides every <|eot_id|>)."""
    import torch

    encoded = [_encode(tokenizer, q, a, system_prompt, date_string) for q, a in pairs]
    pad = tokenizer.eos_token_id if eot_mask_quirk else pad_token_id(tokenizer)
    out = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (x, _) in enumerate(chunk):
            ids[row, :len(x)] = torch.tensor(x)
            mask[row, :len(x)] = 1
        if eot_mask_quirk:
            mask = (ids != tokenizer.eos_token_id).long()
        with torch.no_grad():
            logits = model(ids, attention_mask=mask).logits.float()
        out += [_item(logits[row, :len(x)], labels) for row, (x, labels) in enumerate(chunk)]
    return out


def hf_score(model, tokenizer, question, answer, *, system_prompt="You are a helpful assistant.",
             date_string="10 Apr 2025"):
    """avg_loss over labelled tokens, and (token log-probs, argmax preds, labels) without the eos."""
    import torch

    chat_ids, labels = _encode(tokenizer, question, answer, system_prompt, date_string)
    with torch.no_grad():
        logits = model(torch.tensor([chat_ids])).logits[0].float()
    return _item(logits, labels)


def _item(logits, labels) -> dict:
    """evaluate_probability + tokenwise_logprobs for one sequence's logits (length, vocab)."""
    import torch

    log_probs = torch.log_softmax(logits, dim=-1)
    labels_t = torch.tensor(labels)
    shifted = labels_t[1:]
    mask = shifted != -100
    token_lp = log_probs[:-1].gather(-1, shifted.clamp(min=0)[:, None])[:, 0]
    avg_loss = float(-(token_lp[mask]).sum() / mask.sum())
    actual = (labels_t != -100).nonzero()[:, 0][:-1]  # tokenwise_logprobs: drop the eos label
    start, end = int(actual[0]), int(actual[-1])
    lp = log_probs[start - 1:end]
    targets = labels_t[start:end + 1]
    return {"avg_loss": avg_loss,
            "token_logprobs": lp.gather(-1, targets[:, None])[:, 0].numpy(),
            "preds": lp.argmax(-1).numpy(), "labels": targets.numpy()}


def hf_generate(model, tokenizer, question, *, max_new_tokens=200, eos_ids=None,
                system_prompt="You are a helpful assistant.", date_string="10 Apr 2025") -> np.ndarray:
    """Greedy new tokens (eos included when produced), as transformers' generate gives them."""
    import torch

    prompt = _ids(tokenizer, _chat(question, None, system_prompt, False), date_string, True)
    eos_ids = list(eos_ids or [tokenizer.eos_token_id])
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos_ids,
                             pad_token_id=eos_ids[0])
    return _cut(out[0, len(prompt):].numpy(), eos_ids)


def _cut(new: np.ndarray, eos_ids) -> np.ndarray:
    stop = np.flatnonzero(np.isin(new, eos_ids))
    return new[: stop[0] + 1] if len(stop) else new


def hf_generate_batch(model, tokenizer, questions, *, batch_size=16, max_new_tokens=200, eos_ids=None,
                      system_prompt="You are a helpful assistant.", date_string="10 Apr 2025",
                      eot_mask_quirk=False) -> list[np.ndarray]:
    """hf_generate for many questions, left-padded batches as open-unlearning generates (with
    `eot_mask_quirk`, its mask `ids != eos`)."""
    import torch

    eos_ids = list(eos_ids or [tokenizer.eos_token_id])
    prompts = [_ids(tokenizer, _chat(q, None, system_prompt, False), date_string, True) for q in questions]
    pad = tokenizer.eos_token_id if eot_mask_quirk else eos_ids[0]
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), pad)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, p in enumerate(chunk):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        if eot_mask_quirk:
            mask = (ids != tokenizer.eos_token_id).long()
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                                 eos_token_id=eos_ids, pad_token_id=pad)
        out += [_cut(gen[row, width:].numpy(), eos_ids) for row in range(len(chunk))]
    return out


class TorchScorer:
    """The transformers counterpart of `npo_jax.eval.scoring.Scorer`: a `SuiteScorer`, so the TOFU
    suite can run on either for the parity tool and benchmark (scoring, then generation)."""

    def __init__(self, model, tokenizer, *, batch_size=16, max_new_tokens=200, eos_ids=None, eot_mask_quirk=False):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.eos_ids = sorted(set(eos_ids or []) | {tokenizer.eos_token_id})
        self.eot_mask_quirk = eot_mask_quirk  # False: transformers' own masks, padding only

    def score_and_generate(self, pairs, questions, progress=None, timings=None):
        """`score_answers(pairs)`, then `generate_answers(questions)`, each timed."""
        t0 = time.perf_counter()
        scored = self.score_answers(pairs, progress)
        t1 = time.perf_counter()
        answers = self.generate_answers(questions, progress)
        if timings is not None:
            timings.update(scoring_s=t1 - t0, generation_s=time.perf_counter() - t1)
        return scored, answers

    def score_answers(self, pairs, progress=None):
        items = hf_score_batch(self.model, self.tokenizer, pairs, batch_size=self.batch_size,
                               eot_mask_quirk=self.eot_mask_quirk)
        if progress is not None:
            progress.update(len(pairs))
        return [Scored(d["avg_loss"], d["token_logprobs"], d["preds"], d["labels"]) for d in items]

    def generate_answers(self, questions, progress=None):
        """Greedy answers decoded with special tokens skipped, cut at eos, stripped."""
        tokens = hf_generate_batch(self.model, self.tokenizer, questions, batch_size=self.batch_size,
                                   max_new_tokens=self.max_new_tokens, eos_ids=self.eos_ids,
                                   eot_mask_quirk=self.eot_mask_quirk)
        if progress is not None:
            progress.update(len(questions))
        return [self.tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]
