"""TOFU metric definitions and aggregations, as open-unlearning's `src/evals/metrics/` computes them.

Everything here works on per-item values (`value_by_index`: index -> dict), so it serves both
our evaluator and the re-scoring of published logs (`npo-jax eval --from-log`).

- probability: exp(-mean token NLL over the answer's labelled tokens); aggregate = mean (items
  with several answers: mean of their probabilities first);
- truth ratio: exp(-mean of wrong answers' avg NLL) / exp(-correct answer's avg NLL);
  forget: mean(min(tr, 1/tr)) ("closer to 1 is better"); retain/ra/wf: mean(max(0, 1 - tr));
- normalised probability (ra/wf): p(correct) / (p(correct) + sum p(wrong));
- ROUGE: rougeL recall, mean;
- forget quality: two-sample KS-test p-value between the forget truth ratios of the model and
  of the retain model;
- model utility: harmonic mean of the nine retain / ra / wf values;
- MIA: AUC of membership scores (forget = members, label 0; holdout = 1); privleak =
  (1 - auc - ref) / ref * 100 with ref = 1 - auc of the retain model (0.5 without one).
"""

from __future__ import annotations

import numpy as np
import scipy.stats

EPS = 1e-10
UTILITY_KEYS = (
    "retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio",
    "ra_Q_A_Prob_normalised", "ra_Q_A_ROUGE", "ra_Truth_Ratio",
    "wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio",
)


def _ordered(value_by_index: dict) -> list:
    return [value_by_index[k] for k in sorted(value_by_index, key=int)]


def item_mean(values) -> float:
    return float(np.mean(values)) if isinstance(values, list | tuple | np.ndarray) else float(values)


def agg_probability(value_by_index: dict) -> float:
    return float(np.mean([item_mean(v["prob"]) for v in _ordered(value_by_index)]))


def agg_score(value_by_index: dict) -> float:
    return float(np.mean([v["score"] for v in _ordered(value_by_index)]))


def agg_rouge(value_by_index: dict, key: str = "rougeL_recall") -> float:
    return float(np.mean([v[key] for v in _ordered(value_by_index)]))


def truth_ratios(correct: dict, wrong: dict) -> dict:
    """Per-item truth ratio from the correct answer's and wrong answers' avg NLL logs."""
    out = {}
    for k in correct:
        correct_prob = np.exp(-item_mean(correct[k]["avg_loss"]))
        wrong_prob = np.exp(-item_mean(wrong[k]["avg_loss"]))
        out[k] = {"score": float(wrong_prob / (correct_prob + EPS))}
    return out


def agg_truth_ratio(value_by_index: dict, aggregator: str) -> float:
    tr = np.array([v["score"] for v in _ordered(value_by_index)])
    if aggregator == "closer_to_1_better":
        return float(np.mean(np.minimum(tr, 1 / (tr + EPS))))
    if aggregator == "true_better":
        return float(np.mean(np.maximum(0, 1 - tr)))
    raise ValueError(f"unknown truth-ratio aggregator {aggregator!r}")


def normalised_probabilities(correct: dict, wrong: dict) -> dict:
    out = {}
    for k in correct:
        c = item_mean(correct[k]["prob"])
        w = float(np.sum(wrong[k]["prob"]))
        out[k] = {"prob": c / (c + w + EPS)}
    return out


def forget_quality(forget_tr: dict, retain_tr: dict) -> float:
    """KS-test p-value between the two models' per-item forget truth ratios."""
    a = [v["score"] for v in _ordered(forget_tr)]
    b = [v["score"] for v in _ordered(retain_tr)]
    return float(scipy.stats.ks_2samp(a, b).pvalue)


def model_utility(aggs: dict) -> float:
    missing = [k for k in UTILITY_KEYS if aggs.get(k) is None]
    if missing:
        raise KeyError(f"model_utility needs {', '.join(missing)}")
    return float(scipy.stats.hmean([aggs[k] for k in UTILITY_KEYS]))


def mia_auc(forget_scores: dict, holdout_scores: dict) -> float:
    """roc_auc_score with forget items labelled 0 and holdout items 1, on their scores."""
    f = np.array([v["score"] for v in _ordered(forget_scores)])
    h = np.array([v["score"] for v in _ordered(holdout_scores)])
    u = scipy.stats.mannwhitneyu(h, f, alternative="two-sided").statistic
    return float(u / (len(f) * len(h)))


def privleak(auc: float, retain_auc: float | None = None) -> float:
    score = 1 - auc
    ref = 1 - retain_auc if retain_auc is not None else 0.5
    return float((score - ref) / (ref + EPS) * 100)


def min_k_score(token_logprobs: np.ndarray, k: float = 0.4) -> float:
    """Min-k% membership score: minus the mean of the lowest k fraction of token log-probs."""
    lp = np.sort(np.asarray(token_logprobs))
    n = max(1, int(len(lp) * k))
    return float(-np.mean(lp[:n]))


def extraction_strength(preds: np.ndarray, labels: np.ndarray) -> float:
    """1 - k/n for the smallest k with preds[k:] == labels[k:] (open-unlearning's loop, including
    its end point: with no matching suffix k stops at n - 1)."""
    n = len(labels)
    k = 0
    for k in range(n):
        if np.array_equal(preds[k:], labels[k:]):
            break
    return 1 - k / n


def exact_memorization(preds: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(preds) == np.asarray(labels)))
