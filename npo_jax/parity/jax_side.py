"""The JAX half of `npo-jax parity`: everything our code computes on the N items, kept for the
comparison once the JAX model is gone.

Params are read from an Orbax checkpoint one tensor at a time (largest first) and held in
float32, the reference's dtype. (Held in bf16 and computed in float32, XLA:CPU materialised a
float32 copy of the whole layer stack besides them: measured +6 bytes a parameter, more than
float32 params.) The objective's gradient norm is summed over groups of parameters, each group
differentiated in a pass of its own, so at most one group's gradients (the size of the largest
stacked tensor) exist besides the params. Logits are kept only at the answer positions, in
float32 files on disk (`np.lib.format.open_memmap`), not in memory.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from npo_jax.checkpoint import ParamsReader
from npo_jax.eval import generation
from npo_jax.eval import metrics as m
from npo_jax.eval.lm import LoadedLM
from npo_jax.eval.scoring import Scorer
from npo_jax.eval.suite import multi_prob_items, prob_items, rouge_items, split_flat
from npo_jax.losses import Objective, objective_loss
from npo_jax.memory import trim_host_memory
from npo_jax.model import abstract_model, merge_params, split_params
from npo_jax.parity.checks import Timings
from npo_jax.parity.inputs import Items, Settings
from npo_jax.reference import reference_logprobs
from npo_jax.tree_paths import get_path, iter_paths, set_path

LOGIT_FILES = {"right": "logits_f32_right.npy", "left": "logits_f32_left.npy", "bf16": "logits_bf16_right.npy"}


@dataclasses.dataclass
class JaxOutputs:
    logits: dict[str, Path]  # layout -> (answer positions, vocab) float32 .npy
    generations: list[np.ndarray]  # greedy new tokens per item, cut after eos
    objective: dict[str, float]  # loss, forget_loss[, retain_loss], grad_norm
    evaluation: dict[str, list]  # prob, truth_ratio, rougeL_recall per item; generation texts
    eos_ids: tuple


def load_params(folder: Path) -> tuple[object, dict]:
    """(LlamaConfig, params as float32 jax arrays), read a tensor at a time, largest first (so the
    read and cast copies of one tensor come on top of as few loaded ones as possible)."""
    reader = ParamsReader(folder)
    params: dict = {}
    for path in sorted(reader.metadata, key=lambda p: -int(np.prod(reader.metadata[p].shape))):
        host = reader.read(path)
        set_path(params, path, jax.device_put(host.astype(np.float32, copy=False)))
        del host
        trim_host_memory()
    return reader.config, params


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _answer_logits(graphdef, params, ids, mask, positions, rows, cols):
    model = merge_params(graphdef, params)
    hidden, _ = model.hidden_states(ids, mask, positions)
    return model.logits(hidden[rows, cols])


@functools.partial(jax.jit, static_argnames=("graphdef", "obj", "group"))
def _objective(graphdef, obj, params, batch, group: tuple):
    """Loss, aux terms and the squared norm of the gradients of the params in `group` (paths) for
    one micro-batch of one unit (as `train_step.accumulated_grads` computes them), the model
    being its own reference."""

    def loss_fn(sub):
        full = jax.tree.map(lambda x: x, params)
        for path, value in zip(group, sub, strict=True):
            set_path(full, path, value)
        model = merge_params(graphdef, full)
        ref_model = merge_params(graphdef, params) if obj.needs_live_reference else None
        losses, aux = objective_loss(model, ref_model, batch, obj, 1)
        return losses.mean(), {k: v.mean() for k, v in aux.items()}

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)([get_path(params, p) for p in group])
    return loss, aux, sum(jnp.sum(jnp.square(g)) for g in grads)


def gradient_groups(params: dict) -> list[tuple]:
    """Param paths in groups of at most the largest tensor's size (and at least 2^26 elements, so a
    small model takes one pass), largest first."""
    sizes = sorted(((int(np.prod(x.shape)), p) for p, x in iter_paths(params)), reverse=True)
    budget, groups, used = max(sizes[0][0], 1 << 26), [], []
    for size, path in sizes:
        for k, group in enumerate(groups):
            if used[k] + size <= budget:
                group.append(path)
                used[k] += size
                break
        else:
            groups.append([path])
            used.append(size)
    return [tuple(g) for g in groups]


def write_logits(graphdef, params, items: Items, settings: Settings, side: str, path: Path) -> Path:
    vocab = merge_params(graphdef, params).config.vocab_size
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(items.answer_positions(), vocab))
    k = 0
    for b in items.batches(settings.batch_size, settings.eot_mask_quirk, side):
        logits = np.asarray(_answer_logits(graphdef, params, b.input_ids, b.attention_mask, b.positions, b.rows,
                                           b.cols))
        out[k:k + len(logits)] = logits
        k += len(logits)
    out.flush()
    del out
    return path


def objective(graphdef, params, items: Items, tokenizer, settings: Settings) -> dict[str, float]:
    """Loss, its parts and the gradient norm of one batch (N forget + N retain items), the model
    being its own reference (the first step of unlearning)."""
    s = settings
    obj = Objective("finetune") if s.method == "finetune" else Objective(
        s.method, s.beta, s.alpha, s.gamma, s.delta, s.retain_loss, s.reference)
    host = items.objective_batch(tokenizer, s)
    batch = {"forget": host["forget"]}
    if obj.uses_retain:
        batch["retain"] = host["retain"]
    if obj.cached_reference:
        length = host["forget"]["input_ids"].shape[1]
        batch["forget_ref_logp"] = reference_logprobs(
            graphdef, params, host["forget_examples"], buckets=[length], pad_id=items.pad_id, eot_id=items.eos_id,
            eot_mask_quirk=s.eot_mask_quirk, batch_size=len(host["forget_examples"]))
    squares = 0.0
    for group in gradient_groups(params):
        loss, aux, sq = _objective(graphdef, obj, params, batch, group)
        squares += float(sq)
    return {"loss": float(loss), **{k: float(v) for k, v in aux.items()}, "grad_norm": float(np.sqrt(squares))}


def evaluation(lm: LoadedLM, items: Items, settings: Settings) -> dict[str, list]:
    """The evaluator's per-item values (`Scorer.score_and_generate`, as `npo-jax eval` runs it)."""
    pairs, n_wrong = items.eval_pairs()
    scorer = Scorer(lm, batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens)
    scored, texts = scorer.score_and_generate(pairs, items.questions)
    return per_item_values(items, scored, n_wrong, texts)


def per_item_values(items: Items, scored: list, n_wrong: list[int], texts: list[str]) -> dict[str, list]:
    """Probability, truth ratio (paraphrase against perturbed answers) and ROUGE-L recall per item."""
    n = len(items.rows)
    answer, para = prob_items(scored[:n]), prob_items(scored[n:2 * n])
    wrong = multi_prob_items(split_flat(scored[2 * n:], [[0] * k for k in n_wrong]))
    ratios = m.truth_ratios(para, wrong)
    rouge = rouge_items(items.rows, texts)
    keys = [str(i) for i in range(n)]
    return {"prob": [answer[k]["prob"] for k in keys], "truth_ratio": [ratios[k]["score"] for k in keys],
            "rougeL_recall": [rouge[k]["rougeL_recall"] for k in keys], "texts": texts}


def run_jax(folder: Path, tokenizer, items: Items, settings: Settings, work: Path, timings: Timings) -> JaxOutputs:
    """All JAX-side parts on the checkpoint `folder`; the params are freed before it returns."""
    with timings.part("jax: load"):
        cfg, params = load_params(folder)
        graphdef, _ = split_params(abstract_model(cfg))
        lm = LoadedLM(graphdef, params, tokenizer, settings.fmt, settings.eot_mask_quirk, unstacked_decode=False)
        eos_ids = lm.eos_ids
    with timings.part("jax: logits"):
        logits = {side: write_logits(graphdef, params, items, settings, side, work / LOGIT_FILES[side])
                  for side in ("right", "left")}
        bf16, _ = split_params(abstract_model(cfg, compute_dtype=jnp.bfloat16))
        logits["bf16"] = write_logits(bf16, params, items, settings, "right", work / LOGIT_FILES["bf16"])
    with timings.part("jax: generation"):
        gens = generation.generate_ids(lm, items.prompts, batch_size=settings.batch_size,
                                       max_new_tokens=settings.max_new_tokens)
    with timings.part("jax: objective"):
        remat, _ = split_params(abstract_model(cfg, remat="full"))
        obj = objective(remat, params, items, tokenizer, settings)
    with timings.part("jax: evaluation"):
        ev = evaluation(lm, items, settings)
    del params, lm
    free_jax()
    return JaxOutputs(logits, gens, obj, ev, eos_ids)


def free_jax() -> None:
    """Drop compiled functions and return freed host memory to the OS."""
    gc.collect()
    jax.clear_caches()
    gc.collect()
    trim_host_memory()
