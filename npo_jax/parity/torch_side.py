"""The transformers half of `npo-jax parity`: the same quantities in PyTorch (float32), each
compared as it is computed with what the JAX side kept.

The model is `transformers.LlamaForCausalLM` loaded from the HF folder in float32. Generation and
the evaluator's values come from `npo_jax.eval.hf_reference` (its own tokenization, `generate`);
the objective from open-unlearning's formulas (`npo_jax.parity.torch_objective`), its gradient
norm summed tensor by tensor as backward produces them (each gradient freed at once, so the 3B
never holds a float32 gradient copy), under gradient checkpointing (activations recomputed: the
same numbers, less memory).
"""

from __future__ import annotations

import gc
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from npo_jax.eval.hf_reference import hf_generate_batch, hf_score_batch
from npo_jax.eval.protocol import Scored
from npo_jax.losses import Objective
from npo_jax.memory import unmap_large_blocks
from npo_jax.parity.checks import (
    EVAL_RTOL,
    GRAD_NORM_RTOL,
    LOSS_RTOL,
    Bf16Agreement,
    Check,
    LogitsAgreement,
    Timings,
    close_values,
    exact_sequences,
)
from npo_jax.parity.inputs import Items, Settings
from npo_jax.parity.jax_side import JaxOutputs, per_item_values
from npo_jax.parity.torch_objective import objective_terms


def load_hf_model(folder: Path):
    import torch
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _answer_logits(model, layout) -> np.ndarray:
    import torch

    with torch.no_grad():
        logits = model(torch.as_tensor(layout.input_ids, dtype=torch.long),
                       attention_mask=torch.as_tensor(layout.attention_mask, dtype=torch.long),
                       position_ids=torch.as_tensor(layout.positions, dtype=torch.long)).logits
        return logits[torch.as_tensor(layout.rows, dtype=torch.long),
                      torch.as_tensor(layout.cols, dtype=torch.long)].float().numpy()


def logits_checks(model, items: Items, settings: Settings, ours: JaxOutputs) -> list[Check]:
    """float32 logits, right and left padded, and bfloat16 compute (right padded) against them."""
    f32 = {side: LogitsAgreement() for side in ("right", "left")}
    bf16 = Bf16Agreement()
    files = {name: np.load(path, mmap_mode="r") for name, path in ours.logits.items()}
    for side in ("right", "left"):
        k = 0
        for layout in items.batches(settings.batch_size, settings.eot_mask_quirk, side):
            ref = _answer_logits(model, layout)
            f32[side].add(np.asarray(files[side][k:k + len(ref)]), ref)
            if side == "right":
                bf16.add(np.asarray(files["bf16"][k:k + len(ref)]), ref)
            k += len(ref)
    return [f32["right"].check("logits f32: right padded"), f32["left"].check("logits f32: left padded"),
            *bf16.checks()]


def generation_check(model, tokenizer, items: Items, settings: Settings, ours: JaxOutputs) -> tuple[Check, list]:
    ref = hf_generate_batch(model, tokenizer, items.questions, batch_size=settings.batch_size,
                            max_new_tokens=settings.max_new_tokens, eos_ids=list(ours.eos_ids),
                            system_prompt=settings.fmt.system_prompt, date_string=settings.fmt.date_string,
                            eot_mask_quirk=settings.eot_mask_quirk)
    check = exact_sequences(f"generation: greedy, {settings.max_new_tokens} new tokens", "generation",
                            ours.generations, ref, "generate(do_sample=False)")
    return check, ref


def _torch_group(group: dict) -> dict:
    import torch

    return {k: torch.as_tensor(group[k], dtype=torch.long) for k in ("input_ids", "attention_mask", "labels")}


def _enable_checkpointing(model):
    """Activation checkpointing on (under either transformers name); returns what turns it off."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        return model.activation_checkpointing_disable
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model.gradient_checkpointing_disable


class GradNorm:
    """The model as open-unlearning's formulas call it, and the squared norm of its gradients,
    summed in float64 as backward produces each one, which is then freed: no copy of the
    gradients is ever held.

    Two things keep backward's memory to about one layer's gradients:
    - The batches the formulas differentiate (forget and retain) go through the model in one
      forward (`together`); each call then gets its rows of the shared logits. Separate forwards
      would give each parameter two gradient contributions, and autograd holds the first in its
      input buffer until the second arrives: up to a float32 copy of every layer's gradients
      (the 3B's 28 layers: 10.5 GiB; with the model, out of memory on a 24 GiB host). Rows are
      independent in the model, so the logits are the same; the loss of a call with labels is
      the model's own (`model.loss_function`, as its forward computes it).
    - The token embeddings are looked up outside the graph (leaves of their own): the vocabulary
      matrix then gets no dense gradient from the lookup (with the LM head's, four
      vocabulary-sized buffers at once in a tied 3B's backward, 6.3 GiB); the lookup's share is
      added per token row after backward."""

    def __init__(self, model):
        import torch

        self.model, self.embed = model, model.get_input_embeddings()
        self.squares = torch.zeros((), dtype=torch.float64)
        self.leaves, self.head_rows = [], None
        self.batches, self.joint = [], None
        self.hooks = [p.register_post_accumulate_grad_hook(self._add_and_free) for p in model.parameters()]

    def together(self, *batches: dict) -> None:
        """Run the differentiated calls on these batches (same length) as one forward."""
        self.batches, self.joint = list(batches), None

    def _forward(self, input_ids, attention_mask):
        import torch

        with torch.no_grad():
            embeds = self.embed(input_ids)
        if torch.is_grad_enabled():
            embeds.requires_grad_(True)
            self.leaves.append((input_ids, embeds))
        return self.model(inputs_embeds=embeds, attention_mask=attention_mask).logits

    def __call__(self, input_ids, attention_mask=None, labels=None):
        import torch

        mine = [k for k, b in enumerate(self.batches) if b["input_ids"] is input_ids]
        if torch.is_grad_enabled() and mine:
            if self.joint is None:  # the first differentiated call runs every batch
                self.joint = self._forward(*(torch.cat([b[k] for b in self.batches])
                                             for k in ("input_ids", "attention_mask")))
            start = sum(len(b["input_ids"]) for b in self.batches[:mine[0]])
            logits = self.joint[start:start + len(input_ids)]
        else:
            logits = self._forward(input_ids, attention_mask)
        loss = None if labels is None else self.model.loss_function(
            logits=logits, labels=labels, vocab_size=self.model.config.vocab_size)
        return SimpleNamespace(logits=logits, loss=loss)

    def _rows(self):
        import torch

        return torch.unique(torch.cat([ids.reshape(-1) for ids, _ in self.leaves]), return_inverse=True)

    def _add_and_free(self, p):
        if p is self.embed.weight:  # its LM-head gradient (tied) at the looked-up rows, for total()
            self.head_rows = p.grad[self._rows()[0]].double()
        for piece in p.grad.reshape(-1).split(1 << 22):  # float64 a slice at a time
            self.squares += piece.double().square().sum()
        p.grad = None

    def total(self) -> float:
        """|g|^2 = |head|^2 (hooked) + sum over looked-up rows of 2 head.lookup + |lookup|^2."""
        import torch

        rows, inverse = self._rows()
        grads = torch.cat([e.grad.reshape(-1, e.shape[-1]) for _, e in self.leaves]).double()
        lookup = torch.zeros(len(rows), grads.shape[-1], dtype=torch.float64).index_add_(0, inverse, grads)
        if self.embed.padding_idx is not None:  # nn.Embedding gives the pad row no gradient
            lookup[rows == self.embed.padding_idx] = 0
        head = self.head_rows if self.head_rows is not None else torch.zeros_like(lookup)
        return float((self.squares + (2 * head * lookup + lookup.square()).sum()).sqrt())

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def objective_checks(model, items: Items, tokenizer, settings: Settings, ours: JaxOutputs) -> list[Check]:
    s = settings
    host = items.objective_batch(tokenizer, s)
    forget, retain = _torch_group(host["forget"]), _torch_group(host["retain"])
    norm = GradNorm(model)
    norm.together(forget, *([retain] if Objective(s.method).uses_retain else []))  # the batches it differentiates
    disable = _enable_checkpointing(model)
    model.train()  # checkpointing is active in training mode only; Llama has no dropout
    try:
        terms = objective_terms(norm, s.method, forget, retain, beta=s.beta, alpha=s.alpha, gamma=s.gamma,
                                delta=s.delta, retain_loss=s.retain_loss)
        terms["loss"].backward()
    finally:
        norm.remove()
        disable()
        model.eval()
    ref = {k: float(v.detach()) for k, v in terms.items()} | {"grad_norm": norm.total()}
    label = s.method if s.method == "finetune" else (
        f"{s.method} (beta {s.beta:g}, alpha {s.alpha:g}, gamma {s.gamma:g})")
    checks = []
    for key in ("loss", "forget_loss", "retain_loss", "grad_norm"):
        if key in ref:
            checks.append(close_values(f"objective {label}: {key}" if key == "loss" else f"objective: {key}",
                                       "objective", ours.objective[key], ref[key],
                                       GRAD_NORM_RTOL if key == "grad_norm" else LOSS_RTOL))
    return checks


def evaluation_checks(model, tokenizer, items: Items, settings: Settings, ours: JaxOutputs,
                      generations: list) -> list[Check]:
    """The transformers evaluator's per-item values (ROUGE of its greedy answers) against ours."""
    pairs, n_wrong = items.eval_pairs()
    scored = [Scored(d["avg_loss"], d["token_logprobs"], d["preds"], d["labels"]) for d in hf_score_batch(
        model, tokenizer, pairs, batch_size=settings.batch_size, system_prompt=settings.fmt.system_prompt,
        date_string=settings.fmt.date_string, eot_mask_quirk=settings.eot_mask_quirk)]
    texts = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in generations]
    ref = per_item_values(items, scored, n_wrong, texts)
    ev = ours.evaluation
    return [close_values("eval: probability", "evaluation", ev["prob"], ref["prob"], EVAL_RTOL),
            close_values("eval: truth ratio", "evaluation", ev["truth_ratio"], ref["truth_ratio"], EVAL_RTOL),
            _rouge_check(ev, ref)]


def _rouge_check(ours: dict, ref: dict) -> Check:
    a, b = np.asarray(ours["rougeL_recall"]), np.asarray(ref["rougeL_recall"])
    diff = np.abs(a - b)
    i = int(diff.argmax())
    detail = f"item {i}: ours {ours['texts'][i]!r}, reference {ref['texts'][i]!r}"
    return Check("eval: ROUGE-L recall", "evaluation", float(a.mean()), float(b.mean()), float(diff.max()), 0.0,
                 "equal", detail)


def run_torch(hf_dir: Path, tokenizer, items: Items, settings: Settings, ours: JaxOutputs,
              timings: Timings) -> list[Check]:
    """All transformers-side parts on the HF folder, each compared at once; the model is freed."""
    unmap_large_blocks()  # the backward's freed gradients and activations go back to the OS at once
    with timings.part("torch: load"):
        model = load_hf_model(hf_dir)
    with timings.part("torch: logits"):
        checks = logits_checks(model, items, settings, ours)
    with timings.part("torch: generation"):
        gen_check, generations = generation_check(model, tokenizer, items, settings, ours)
        checks.append(gen_check)
    with timings.part("torch: objective"):
        checks += objective_checks(model, items, tokenizer, settings, ours)
    with timings.part("torch: evaluation"):
        checks += evaluation_checks(model, tokenizer, items, settings, ours, generations)
    del model
    gc.collect()
    return checks
