"""The same per-item quantities computed with transformers (PyTorch), following open-unlearning's
`preprocess_chat_instance`, `evaluate_probability`, `tokenwise_logprobs` and `eval_text_similarity`.

Independent of the JAX evaluator (own tokenization, one item at a time, HF forward and
`generate`), so that the parity tool and tests compare two implementations. Needs torch.
"""

from __future__ import annotations

import numpy as np


def _chat(question, answer, system_prompt, with_answer=True):
    chat = [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]
    if with_answer:
        chat.append({"role": "assistant", "content": answer})
    return chat


def _ids(tokenizer, chat, date_string, generation_prompt):
    out = tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=generation_prompt,
                                        return_dict=False, date_string=date_string)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def hf_score(model, tokenizer, question, answer, *, system_prompt="You are a helpful assistant.",
             date_string="10 Apr 2025"):
    """avg_loss over labelled tokens, and (token log-probs, argmax preds, labels) without the eos."""
    import torch

    chat_ids = _ids(tokenizer, _chat(question, answer, system_prompt), date_string, False)
    prompt_ids = _ids(tokenizer, _chat(question, answer, system_prompt, False), date_string, True)
    if chat_ids[-1] != tokenizer.eos_token_id:
        chat_ids.append(tokenizer.eos_token_id)
    labels = [-100] * len(prompt_ids) + chat_ids[len(prompt_ids):]
    with torch.no_grad():
        logits = model(torch.tensor([chat_ids])).logits[0].float()
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
    new = out[0, len(prompt):].numpy()
    stop = np.flatnonzero(np.isin(new, eos_ids))
    return new[: stop[0] + 1] if len(stop) else new
