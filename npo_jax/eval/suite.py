"""The TOFU evaluation suite: which split and answer each metric uses, and the output files.

forget (`{forget}_perturbed`): Q_A_Prob (answer), Q_A_PARA_Prob (paraphrased answer),
Q_A_PERT_Prob (perturbed answers), Q_A_ROUGE, truth ratio, extraction strength, exact
memorization; retain (`retain_perturbed`): the same probabilities and ROUGE; real authors and
world facts: Q_A_Prob, Q_A_PERT_Prob, ROUGE (truth ratio and normalised probability derived);
MIA (`mia_min_k`, `mia_loss`) on the forget answers against a holdout split, when given.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from npo_jax.data.tofu import load_split
from npo_jax.eval import metrics as m
from npo_jax.eval.aggregate import aggregate, summary
from npo_jax.eval.scoring import Scorer
from npo_jax.fs import atomic_output_dir

ROUGE_TYPES = ("rouge1", "rougeL")


def _prob_items(scored) -> dict:
    return {str(i): {"prob": float(np.exp(-s.avg_loss)), "avg_loss": s.avg_loss} for i, s in enumerate(scored)}


def _multi_prob_items(scored_lists) -> dict:
    return {str(i): {"prob": [float(np.exp(-s.avg_loss)) for s in group], "avg_loss": [s.avg_loss for s in group]}
            for i, group in enumerate(scored_lists)}


def _rouge_items(rows, answers) -> dict:
    from rouge_score import rouge_scorer

    rouge = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    out = {}
    for i, (row, gen) in enumerate(zip(rows, answers, strict=True)):
        s = rouge.score(row["answer"], gen)
        out[str(i)] = {"rouge1_recall": s["rouge1"].recall, "rougeL_f1": s["rougeL"].fmeasure,
                       "rougeL_recall": s["rougeL"].recall, "input": row["question"],
                       "ground_truth": row["answer"], "generation": gen}
    return out


class Suite:
    def __init__(self, scorer: Scorer, *, data_dir=None, tfds_dir=None, forget_split: str = "forget10",
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
        self.timings: dict[str, float] = {"scoring_s": 0.0, "generation_s": 0.0}

    def _bar(self, desc, total):
        return tqdm(total=total, desc=desc, unit="item", disable=not self.progress, leave=False)

    def _score(self, desc, pairs):
        t0 = time.perf_counter()
        with self._bar(desc, len(pairs)) as bar:
            out = self.scorer.score_answers(pairs, bar)
        self.timings["scoring_s"] += time.perf_counter() - t0
        return out

    def _generate(self, desc, rows):
        t0 = time.perf_counter()
        with self._bar(desc, len(rows)) as bar:
            out = self.scorer.generate_answers([r["question"] for r in rows], bar)
        self.timings["generation_s"] += time.perf_counter() - t0
        return out

    def _perturbed(self, desc, rows):
        flat = [(r["question"], p) for r in rows for p in r["perturbed_answer"]]
        scored = self._score(desc, flat)
        groups, k = [], 0
        for r in rows:
            groups.append(scored[k:k + len(r["perturbed_answer"])])
            k += len(r["perturbed_answer"])
        return groups

    def per_item(self) -> dict:
        out: dict = {}
        for prefix, key in (("forget", "forget"), ("retain", "retain"), ("ra", "ra"), ("wf", "wf")):
            rows = self.rows[key]
            answers = self._score(f"{prefix} Q_A_Prob", [(r["question"], r["answer"]) for r in rows])
            out[f"{prefix}_Q_A_Prob"] = _prob_items(answers)
            if prefix in ("forget", "retain"):
                para = self._score(f"{prefix} PARA", [(r["question"], r["paraphrased_answer"]) for r in rows])
                out[f"{prefix}_Q_A_PARA_Prob"] = _prob_items(para)
            out[f"{prefix}_Q_A_PERT_Prob"] = _multi_prob_items(self._perturbed(f"{prefix} PERT", rows))
            out[f"{prefix}_Q_A_ROUGE"] = _rouge_items(rows, self._generate(f"{prefix} ROUGE", rows))
            if prefix == "forget":
                out["extraction_strength"] = {str(i): {"score": m.extraction_strength(s.preds, s.labels)}
                                              for i, s in enumerate(answers)}
                out["exact_memorization"] = {str(i): {"score": m.exact_memorization(s.preds, s.labels)}
                                             for i, s in enumerate(answers)}
                forget_scored = answers
        if "holdout" in self.rows:
            holdout = self._score("holdout", [(r["question"], r["answer"]) for r in self.rows["holdout"]])
            for name, fn in (("mia_min_k", lambda s: m.min_k_score(s.token_logprobs, 0.4)),
                             ("mia_loss", lambda s: s.avg_loss)):
                out[name] = {"forget": {str(i): {"score": fn(s)} for i, s in enumerate(forget_scored)},
                             "holdout": {str(i): {"score": fn(s)} for i, s in enumerate(holdout)}}
        return out

    def run(self, retain_log: dict | None = None) -> dict:
        return aggregate(self.per_item(), retain_log)


def write_outputs(out_dir: str | Path, eval_log: dict, *, overwrite: bool = True, extra_files: dict | None = None):
    """TOFU_EVAL.json and TOFU_SUMMARY.json (open-unlearning's layout), all or nothing."""
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / "TOFU_EVAL.json").write_text(json.dumps(eval_log, indent=4))
        (tmp / "TOFU_SUMMARY.json").write_text(json.dumps(summary(eval_log), indent=4))
        for name, write in (extra_files or {}).items():
            write(tmp / name)
    return Path(out_dir)
