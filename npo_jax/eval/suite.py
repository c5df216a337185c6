"""The TOFU evaluation suite: which split and answer each metric uses, and the output files.

forget (`{forget}_perturbed`): Q_A_Prob (answer), Q_A_PARA_Prob (paraphrased answer),
Q_A_PERT_Prob (perturbed answers), Q_A_ROUGE, truth ratio, extraction strength, exact
memorization; retain (`retain_perturbed`): the same probabilities and ROUGE; real authors and
world facts: Q_A_Prob, Q_A_PERT_Prob, ROUGE (truth ratio and normalised probability derived);
MIA (`mia_min_k`, `mia_loss`) on the forget answers against a holdout split, when given.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from npo_jax.data.tofu import load_split
from npo_jax.eval import metrics as m
from npo_jax.eval.aggregate import aggregate, summary
from npo_jax.eval.protocol import SuiteScorer
from npo_jax.fs import atomic_output_dir
from npo_jax.mask_convention import check_retain_log, mark_log

ROUGE_TYPES = ("rouge1", "rougeL")


def prob_items(scored) -> dict:
    """open-unlearning's per-item probability entries (`value_by_index`) of scored answers."""
    return {str(i): {"prob": float(np.exp(-s.avg_loss)), "avg_loss": s.avg_loss} for i, s in enumerate(scored)}


def multi_prob_items(scored_lists) -> dict:
    """The same for items with several answers each (perturbed answers)."""
    return {str(i): {"prob": [float(np.exp(-s.avg_loss)) for s in group], "avg_loss": [s.avg_loss for s in group]}
            for i, group in enumerate(scored_lists)}


def rouge_items(rows, answers) -> dict:
    """open-unlearning's per-item ROUGE entries: generated answers against the rows' ground truth."""
    from rouge_score import rouge_scorer

    rouge = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    out = {}
    for i, (row, gen) in enumerate(zip(rows, answers, strict=True)):
        s = rouge.score(row["answer"], gen)
        out[str(i)] = {"rouge1_recall": s["rouge1"].recall, "rougeL_f1": s["rougeL"].fmeasure,
                       "rougeL_recall": s["rougeL"].recall, "input": row["question"],
                       "ground_truth": row["answer"], "generation": gen}
    return out


def split_flat(flat: list, groups):
    """Cut `flat` back into consecutive pieces as long as each group (a dict of lists or a list of
    lists) was when it was flattened; a dict comes back as a dict with the same keys."""
    items = groups.items() if isinstance(groups, dict) else enumerate(groups)
    out, k = {}, 0
    for key, group in items:
        out[key], k = flat[k:k + len(group)], k + len(group)
    return out if isinstance(groups, dict) else list(out.values())


class Suite:
    def __init__(self, scorer: SuiteScorer, *, data_dir=None, tfds_dir=None, forget_split: str = "forget10",
                 holdout_split: str | None = None, limit: int | None = None, progress: bool = True):
        self.scorer, self.progress = scorer, progress
        self.splits = {
            "forget": load_split(f"{forget_split}_perturbed", data_dir, tfds_dir),
            "retain": load_split("retain_perturbed", data_dir, tfds_dir),
            "ra": load_split("real_authors_perturbed", data_dir, tfds_dir),
            "wf": load_split("world_facts_perturbed", data_dir, tfds_dir),
        }
        if holdout_split:
            self.splits["holdout"] = load_split(holdout_split, data_dir, tfds_dir)
        self.rows = {k: [s[i] for i in range(min(len(s), limit or len(s)))] for k, s in self.splits.items()}
        # the scorer's phases in seconds: scoring_and_generation_s when it does both in one pass,
        # else scoring_s and generation_s
        self.timings: dict[str, float] = {}

    def _bar(self, desc, total):
        return tqdm(total=total, desc=desc, unit="item", disable=not self.progress, leave=False)

    def _score_and_generate(self, requests: dict[str, list], splits: dict[str, list]) -> tuple[dict, dict]:
        """All scoring requests in one call (fewer part-filled batches, better length grouping),
        and the greedy answers to the splits' questions, in the same call (the JAX scorer runs
        the questions' prompts once for both)."""
        flat = [pair for pairs in requests.values() for pair in pairs]
        questions = [r["question"] for rows in splits.values() for r in rows]
        with self._bar("scoring and generation", len(flat) + len(questions)) as bar:
            scored, answers = self.scorer.score_and_generate(flat, questions, bar, self.timings)
        return split_flat(scored, requests), split_flat(answers, splits)

    def per_item(self) -> dict:
        prefixes = ("forget", "retain", "ra", "wf")
        requests = {}
        for prefix in prefixes:
            rows = self.rows[prefix]
            requests[f"{prefix}_Q_A_Prob"] = [(r["question"], r["answer"]) for r in rows]
            if prefix in ("forget", "retain"):
                requests[f"{prefix}_Q_A_PARA_Prob"] = [(r["question"], r["paraphrased_answer"]) for r in rows]
            requests[f"{prefix}_Q_A_PERT_Prob"] = [(r["question"], p) for r in rows for p in r["perturbed_answer"]]
        if "holdout" in self.rows:
            requests["holdout"] = [(r["question"], r["answer"]) for r in self.rows["holdout"]]
        scored, generated = self._score_and_generate(requests, {prefix: self.rows[prefix] for prefix in prefixes})

        out: dict = {}
        for prefix in prefixes:
            rows = self.rows[prefix]
            answers = scored[f"{prefix}_Q_A_Prob"]
            out[f"{prefix}_Q_A_Prob"] = prob_items(answers)
            if prefix in ("forget", "retain"):
                out[f"{prefix}_Q_A_PARA_Prob"] = prob_items(scored[f"{prefix}_Q_A_PARA_Prob"])
            groups = split_flat(scored[f"{prefix}_Q_A_PERT_Prob"], [r["perturbed_answer"] for r in rows])
            out[f"{prefix}_Q_A_PERT_Prob"] = multi_prob_items(groups)
            out[f"{prefix}_Q_A_ROUGE"] = rouge_items(rows, generated[prefix])
            if prefix == "forget":
                out["extraction_strength"] = {str(i): {"score": m.extraction_strength(s.preds, s.labels)}
                                              for i, s in enumerate(answers)}
                out["exact_memorization"] = {str(i): {"score": m.exact_memorization(s.preds, s.labels)}
                                             for i, s in enumerate(answers)}
        if "holdout" in self.rows:
            forget_scored, holdout = scored["forget_Q_A_Prob"], scored["holdout"]
            for name, fn in (("mia_min_k", lambda s: m.min_k_score(s.token_logprobs, 0.4)),
                             ("mia_loss", lambda s: s.avg_loss)):
                out[name] = {"forget": {str(i): {"score": fn(s)} for i, s in enumerate(forget_scored)},
                             "holdout": {str(i): {"score": fn(s)} for i, s in enumerate(holdout)}}
        return out

    def run(self, retain_log: dict | None = None) -> dict:
        """The TOFU_EVAL.json dict, with the mask convention the model was scored with (a retain log
        of the other convention is warned about before the scoring starts)."""
        check_retain_log(self.scorer.eot_mask_quirk, retain_log)
        return mark_log(aggregate(self.per_item(), retain_log), self.scorer.eot_mask_quirk)


# what `npo-jax eval` writes: with --overwrite, only a folder holding nothing else is replaced
EVAL_FILES = ("TOFU_EVAL.json", "TOFU_SUMMARY.json", "truth_ratios.png")


def write_outputs(out_dir: str | Path, eval_log: dict, *, overwrite: bool = False, extra_files: dict | None = None):
    """TOFU_EVAL.json and TOFU_SUMMARY.json (open-unlearning's layout), all or nothing; an
    existing folder is replaced only with `overwrite`, and only if it holds a previous evaluation."""
    replaces = {*EVAL_FILES, *(extra_files or {})}
    with atomic_output_dir(out_dir, overwrite=overwrite, replaces=replaces) as tmp:
        (tmp / "TOFU_EVAL.json").write_text(json.dumps(eval_log, indent=4))
        (tmp / "TOFU_SUMMARY.json").write_text(json.dumps(summary(eval_log), indent=4))
        for name, write in (extra_files or {}).items():
            write(tmp / name)
    return Path(out_dir)
