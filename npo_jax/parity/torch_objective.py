"""open-unlearning's loss formulas in PyTorch (src/trainer/utils.py,
src/trainer/unlearn/{npo,simnpo,grad_diff}.py): the reference of the loss tests and of
`npo-jax parity`'s objective check. Independent of the JAX code under test (`npo_jax.losses`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def batch_nll(model, inputs):
    """compute_batch_nll: per-sequence summed token cross-entropy, shifted, -100 ignored."""
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    shifted_labels = inputs["labels"][..., 1:].contiguous()
    logits = logits[..., :-1, :].contiguous()
    loss = torch.nn.CrossEntropyLoss(ignore_index=-100, reduction="none")(logits.transpose(-1, -2), shifted_labels)
    return loss.sum(dim=-1)


def hf_loss(model, inputs):
    """HF's causal-LM loss: token mean over the batch."""
    return model(**inputs).loss


def npo_loss(model, ref_nll, inputs, beta):
    """compute_dpo_loss with win_inputs=None."""
    lose_log_ratio = -(batch_nll(model, inputs) - ref_nll)
    return -2 / beta * F.logsigmoid(beta * (0.0 - lose_log_ratio)).mean()


def simnpo_loss(model, inputs, beta, delta):
    loss_mask = inputs["labels"] != -100
    nll = batch_nll(model, inputs) / loss_mask.sum(-1) - delta
    return -F.logsigmoid(beta * nll).mean() * 2 / beta


def kl_retain(model, ref_model, inputs):
    """compute_kl_divergence: KL(ref || model) with batchmean over all flattened positions."""
    with torch.no_grad():
        ref_logits = ref_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    ref_probs = F.log_softmax(ref_logits, dim=-1).view(-1, ref_logits.shape[-1])
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    current = F.log_softmax(logits, dim=-1).view(-1, logits.shape[-1])
    return F.kl_div(current, ref_probs, reduction="batchmean", log_target=True)


def objective_terms(model, method: str, forget, retain, *, beta=0.1, alpha=1.0, gamma=1.0, delta=0.0,
                    retain_loss="NLL") -> dict:
    """open-unlearning's total loss and its parts for one batch, the model being its own
    reference (the first step of unlearning): {"loss", "forget_loss"[, "retain_loss"]}, tensors
    with the graph, so `loss.backward()` gives the gradients. `method` as `npo_jax.losses.Objective`'s."""
    if method == "finetune":
        loss = hf_loss(model, forget)
        return {"loss": loss, "forget_loss": loss}
    if method == "NPO":
        with torch.no_grad():
            ref_nll = batch_nll(model, forget)
        forget_loss = npo_loss(model, ref_nll, forget, beta)
    elif method == "SimNPO":
        forget_loss = simnpo_loss(model, forget, beta, delta)
    elif method in ("GradAscent", "GradDiff"):
        forget_loss = -hf_loss(model, forget)
    else:
        raise ValueError(f"unknown method {method!r}")
    out = {"loss": gamma * forget_loss, "forget_loss": forget_loss}
    if method != "GradAscent":
        out["retain_loss"] = hf_loss(model, retain) if retain_loss == "NLL" else kl_retain(model, model, retain)
        out["loss"] = out["loss"] + alpha * out["retain_loss"]
    return out
