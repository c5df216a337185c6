"""Prompt shapes the evaluator does not need: multi-turn chats and answers already begun.

Rendered by the tokenizer's chat template with the same system prompt and `date_string` as
`npo_jax.data.tokenize` (open-unlearning's format), so only the shape of the chat changes:
- `chat_prompt(turns, question)`: earlier (question, answer) turns in context, then the question,
  ending at the assistant header (chain-of-clues);
- `chat_prompt(..., answer_prefix=...)`: the same with the assistant's answer begun by
  `answer_prefix`, for the model to continue (fill-in-the-blank continuation).
"""

from __future__ import annotations

import numpy as np

from npo_jax.data.tokenize import ChatFormat, render_chat
from npo_jax.errors import NpoJaxError


def messages(turns, question: str, fmt: ChatFormat, answer: str | None = None) -> list[dict]:
    chat = [{"role": "system", "content": fmt.system_prompt}] if fmt.system_prompt else []
    for q, a in turns:
        chat += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    chat.append({"role": "user", "content": question})
    if answer is not None:
        chat.append({"role": "assistant", "content": answer})
    return chat


def chat_prompt(tokenizer, turns, question: str, fmt: ChatFormat | None = None,
                answer_prefix: str = "") -> np.ndarray:
    fmt = fmt or ChatFormat()
    prompt = render_chat(tokenizer, messages(turns, question, fmt), fmt, True)
    if not answer_prefix.strip():
        return np.asarray(prompt, np.int32)
    ids = render_chat(tokenizer, messages(turns, question, fmt, answer_prefix), fmt, False)
    if ids[:len(prompt)] != prompt:
        raise NpoJaxError("chat template: the generation prompt is not a prefix of the chat with an answer")
    if ids[-1] == tokenizer.eos_token_id:  # the template closed the (unfinished) answer turn
        ids = ids[:-1]
    return np.asarray(ids, np.int32)


def transcript(turns, question: str, answer_prefix: str = "") -> str:
    """The chat as readable text, for the per-item report."""
    lines = [f"user: {q}\nassistant: {a}" for q, a in turns] + [f"user: {question}"]
    if answer_prefix.strip():
        lines.append(f"assistant (begun): {answer_prefix}")
    return "\n".join(lines)
