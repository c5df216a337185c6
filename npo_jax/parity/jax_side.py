"""The JAX half of `npo-jax parity`: everything our code computes on the N items, kept for the
comparison once the JAX model is gone.

Params are read from an Orbax checkpoint in their stored dtype (a bf16 release stays 6.4 GB for
the 3B) and computed in float32 (bf16 -> f32 is exact, so the numbers are those of float32
params; gradients come out in the stored dtype). Logits are kept only at the answer positions,
in float32 files on disk (`np.lib.format.open_memmap`), not in memory.
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
from npo_jax.eval.suite import _multi_prob_items, _prob_items, _rouge_items, _split
from npo_jax.losses import Objective
from npo_jax.memory import trim_host_memory
from npo_jax.model import abstract_model, merge_params, split_params
from npo_jax.parity.checks import Timings
from npo_jax.parity.inputs import Items, Settings
from npo_jax.reference import reference_logprobs
from npo_jax.train_step import accumulated_grads
from npo_jax.tree_paths import set_path

LOGIT_FILES = {"right": "logits_f32_right.npy", "left": "logits_f32_left.npy", "bf16": "logits_bf16_right.npy"}


@dataclasses.dataclass
class JaxOutputs:
    logits: dict[str, Path]  # layout -> (answer positions, vocab) float32 .npy
    generations: list[np.ndarray]  # greedy new tokens per item, cut after eos
    objective: dict[str, float]  # loss, forget_loss[, retain_loss], grad_norm
    evaluation: dict[str, list]  # prob, truth_ratio, rougeL_recall per item; generation texts
    eos_ids: tuple


def load_params(folder: Path) -> tuple[object, dict]:
    """(LlamaConfig, params as jax arrays in the stored dtype), restored straight onto the device."""
    reader = ParamsReader(folder)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings: dict = {}
    for path in reader.metadata:
        set_path(shardings, path, device)
    return reader.config, reader.read_all(shardings)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _answer_logits(graphdef, params, ids, mask, positions, rows, cols):
    model = merge_params(graphdef, params)
    hidden, _ = model.hidden_states(ids, mask, positions)
    return model.logits(hidden[rows, cols])


@functools.partial(jax.jit, static_argnames=("graphdef", "obj"))
def _objective(graphdef, obj, params, ref_params, batch):
    loss, aux, grads = accumulated_grads(graphdef, obj, params, ref_params, batch, units=1)
    squares = sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads))
    return loss, aux, jnp.sqrt(squares)


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
    if obj.method == "NPO" and obj.reference == "cached":
        length = host["forget"]["input_ids"].shape[1]
        batch["forget_ref_logp"] = reference_logprobs(
            graphdef, params, host["forget_examples"], buckets=[length], pad_id=items.pad_id, eot_id=items.eos_id,
            eot_mask_quirk=s.eot_mask_quirk, batch_size=len(host["forget_examples"]))
    stacked = jax.tree.map(lambda x: np.asarray(x)[None], batch)  # one micro-batch of one unit
    loss, aux, norm = _objective(graphdef, obj, params, params if obj.needs_live_reference else None, stacked)
    return {"loss": float(loss), **{k: float(v) for k, v in aux.items()}, "grad_norm": float(norm)}


def evaluation(lm: LoadedLM, items: Items, settings: Settings) -> dict[str, list]:
    """The evaluator's per-item values (`Scorer.score_and_generate`, as `npo-jax eval` runs it)."""
    pairs, n_wrong = items.eval_pairs()
    scorer = Scorer(lm, batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens)
    scored, texts = scorer.score_and_generate(pairs, items.questions)
    return per_item_values(items, scored, n_wrong, texts)


def per_item_values(items: Items, scored: list, n_wrong: list[int], texts: list[str]) -> dict[str, list]:
    """Probability, truth ratio (paraphrase against perturbed answers) and ROUGE-L recall per item."""
    n = len(items.rows)
    answer, para = _prob_items(scored[:n]), _prob_items(scored[n:2 * n])
    wrong = _multi_prob_items(_split(scored[2 * n:], [[0] * k for k in n_wrong]))
    ratios = m.truth_ratios(para, wrong)
    rouge = _rouge_items(items.rows, texts)
    keys = [str(i) for i in range(n)]
    return {"prob": [answer[k]["prob"] for k in keys], "truth_ratio": [ratios[k]["score"] for k in keys],
            "rougeL_recall": [rouge[k]["rougeL_recall"] for k in keys], "texts": texts}


def run_jax(folder: Path, tokenizer, items: Items, settings: Settings, work: Path, timings: Timings) -> JaxOutputs:
    """All JAX-side parts on the checkpoint `folder`; the params are freed before it returns."""
    with timings.part("jax: load"):
        cfg, params = load_params(folder)
        graphdef, _ = split_params(abstract_model(cfg))
        lm = LoadedLM(graphdef, params, tokenizer, settings.fmt, settings.eot_mask_quirk)
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
