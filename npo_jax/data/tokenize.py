"""TOFU question/answer pairs -> token ids and labels, exactly as open-unlearning formats them.

Chat = [system prompt, user question, assistant answer] rendered by the tokenizer's chat template
with `date_string`; the prompt is the same chat without the answer and with
`add_generation_prompt=True`. Labels are -100 over the prompt; the answer tokens and the closing
eos (`<|eot_id|>`) are labelled; eos is appended if the template did not end with it.
open-unlearning never truncates chat-formatted examples; we truncate to `max_length` and count it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from npo_jax.errors import NpoJaxError

IGNORE = -100  # the label of positions no loss is taken on (torch's cross-entropy ignore_index)


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    system_prompt: str | None = "You are a helpful assistant."
    date_string: str | None = "10 Apr 2025"


@dataclasses.dataclass(frozen=True)
class Example:
    input_ids: np.ndarray  # int32 (length,)
    labels: np.ndarray  # int32 (length,), IGNORE over the prompt
    truncated: bool = False


def load_tokenizer(folder: str | Path):
    """An HF tokenizer from a local folder; it must have a chat template."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise NpoJaxError(f"{folder}: cannot load a tokenizer ({e})") from None
    if not getattr(tokenizer, "chat_template", None):
        raise NpoJaxError(f"{folder}: the tokenizer has no chat template (tokenizer_config.json 'chat_template' "
                          "or chat_template.jinja)")
    if tokenizer.eos_token_id is None:
        raise NpoJaxError(f"{folder}: the tokenizer has no eos token")
    return tokenizer


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, or its eos when it has none (Llama-3's tokenizer: open-unlearning
    sets pad = eos)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _chat(question: str, answer: str | None, fmt: ChatFormat) -> list[dict]:
    chat = [{"role": "system", "content": fmt.system_prompt}] if fmt.system_prompt else []
    chat.append({"role": "user", "content": question})
    if answer is not None:
        chat.append({"role": "assistant", "content": answer})
    return chat


def render_chat(tokenizer, chat, fmt: ChatFormat, generation_prompt: bool) -> list[int]:
    return render_chats(tokenizer, [chat], fmt, generation_prompt)[0]


def render_chats(tokenizer, chats: list, fmt: ChatFormat, generation_prompt: bool) -> list[list[int]]:
    """Token ids of each chat through the tokenizer's chat template (one batched encode)."""
    if not chats:
        return []
    extra = {"date_string": fmt.date_string} if fmt.date_string is not None else {}
    ids = tokenizer.apply_chat_template(chats, tokenize=True, add_generation_prompt=generation_prompt,
                                        return_dict=False, **extra)
    if hasattr(ids, "keys"):  # some transformers versions return a BatchEncoding regardless
        ids = ids["input_ids"]
    return [list(x) for x in ids]


def encode_prompts(tokenizer, questions: list[str], fmt: ChatFormat = ChatFormat()) -> list[np.ndarray]:
    """The generation prompts: each chat up to the assistant header."""
    chats = [_chat(q, None, fmt) for q in questions]
    return [np.asarray(p, np.int32) for p in render_chats(tokenizer, chats, fmt, True)]


def encode_qa(tokenizer, question: str, answer: str, fmt: ChatFormat = ChatFormat(),
              max_length: int | None = None) -> Example:
    """Full chat ids with labels over the answer and closing eos."""
    return encode_qa_pairs(tokenizer, [(question, answer)], fmt, max_length)[0]


def encode_qa_pairs(tokenizer, pairs: list[tuple[str, str]], fmt: ChatFormat = ChatFormat(),
                    max_length: int | None = None) -> list[Example]:
    """`encode_qa` for many pairs: one batched encode of the chats, each distinct prompt once (an
    evaluation scores 7-10 answers per question)."""
    questions = list(dict.fromkeys(q for q, _ in pairs))
    prompt_ids = render_chats(tokenizer, [_chat(q, None, fmt) for q in questions], fmt, True)
    prompts = dict(zip(questions, prompt_ids, strict=True))
    chats = render_chats(tokenizer, [_chat(q, a, fmt) for q, a in pairs], fmt, False)
    eos = tokenizer.eos_token_id
    return [_example(ids, prompts[q], eos, max_length) for (q, _), ids in zip(pairs, chats, strict=True)]


def _example(ids: list[int], prompt: list[int], eos: int, max_length: int | None) -> Example:
    if ids[: len(prompt)] != prompt:
        raise NpoJaxError("chat template: the generation prompt is not a prefix of the full chat; "
                          "labels cannot be aligned")
    if ids[-1] != eos:
        ids = [*ids, eos]
    labels = [IGNORE] * len(prompt) + ids[len(prompt):]
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return Example(np.asarray(ids, np.int32), np.asarray(labels, np.int32), truncated)
