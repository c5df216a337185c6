"""From per-item values to every TOFU aggregate, in open-unlearning's log layout.

`aggregate(per_item, retain_log)` takes the per-item values of the metrics that have them
(`{"forget_Q_A_Prob": value_by_index, ...}`; MIA metrics as `{"forget": ..., "holdout": ...}`)
and returns the whole `TOFU_EVAL.json` dict (per metric `agg_value`, plus `value_by_index` for
per-item metrics) with the derived metrics recomputed: truth ratios, normalised probabilities,
forget quality (against `retain_log`), model utility, MIA AUCs and privleak. Used both after
our own scoring and to re-score an existing log, ours or open-unlearning's.
"""

from __future__ import annotations

from pathlib import Path

from npo_jax.errors import NpoJaxError
from npo_jax.eval import metrics as m
from npo_jax.fs import read_json_object


def aggregate(per_item: dict, retain_log: dict | None = None) -> dict:
    out: dict = {}

    def put(name, agg, vbi=None):
        out[name] = {"agg_value": agg, **({"value_by_index": vbi} if vbi is not None else {})}

    for name, vbi in per_item.items():
        if name.startswith("mia_"):
            continue
        if name.endswith("ROUGE"):
            put(name, m.agg_rouge(vbi), vbi)
        elif name.endswith(("Prob", "PERT_Prob", "PARA_Prob")):
            put(name, m.agg_probability(vbi), vbi)
        elif name in ("extraction_strength", "exact_memorization"):
            put(name, m.agg_score(vbi), vbi)

    truth = {
        "forget_truth_ratio": ("forget_Q_A_PARA_Prob", "forget_Q_A_PERT_Prob", "closer_to_1_better"),
        "retain_Truth_Ratio": ("retain_Q_A_PARA_Prob", "retain_Q_A_PERT_Prob", "true_better"),
        "ra_Truth_Ratio": ("ra_Q_A_Prob", "ra_Q_A_PERT_Prob", "true_better"),
        "wf_Truth_Ratio": ("wf_Q_A_Prob", "wf_Q_A_PERT_Prob", "true_better"),
    }
    for name, (correct, wrong, how) in truth.items():
        if correct in per_item and wrong in per_item:
            vbi = m.truth_ratios(per_item[correct], per_item[wrong])
            put(name, m.agg_truth_ratio(vbi, how), vbi)
    for prefix in ("ra", "wf"):
        correct, wrong = f"{prefix}_Q_A_Prob", f"{prefix}_Q_A_PERT_Prob"
        if correct in per_item and wrong in per_item:
            vbi = m.normalised_probabilities(per_item[correct], per_item[wrong])
            put(f"{prefix}_Q_A_Prob_normalised", m.agg_probability(vbi), vbi)

    if "forget_truth_ratio" in out:
        retain_tr = _retain_truth_ratios(retain_log)
        fq = None if retain_tr is None else m.forget_quality(out["forget_truth_ratio"]["value_by_index"], retain_tr)
        put("forget_quality", fq)
    aggs = {k: v["agg_value"] for k, v in out.items()}
    if all(aggs.get(k) is not None for k in m.UTILITY_KEYS):
        put("model_utility", m.model_utility(aggs))

    for name, sides in per_item.items():
        if name.startswith("mia_"):
            auc = m.mia_auc(sides["forget"], sides["holdout"])
            out[name] = {"forget": {"agg_value": m.agg_score(sides["forget"]), "value_by_index": sides["forget"]},
                         "holdout": {"agg_value": m.agg_score(sides["holdout"]), "value_by_index": sides["holdout"]},
                         "auc": auc, "agg_value": auc}
    if "mia_min_k" in out:
        retain_auc = None
        if retain_log is not None and isinstance(retain_log.get("mia_min_k"), dict):
            retain_auc = retain_log["mia_min_k"].get("agg_value")
        put("privleak", m.privleak(out["mia_min_k"]["agg_value"], retain_auc))
    return dict(sorted(out.items()))


def _retain_truth_ratios(retain_log: dict | None) -> dict | None:
    if retain_log is None:
        return None
    entry = retain_log.get("forget_truth_ratio")
    if not isinstance(entry, dict) or not isinstance(entry.get("value_by_index"), dict):
        raise NpoJaxError("retain log: no 'forget_truth_ratio' with per-item 'value_by_index' (needed for "
                          "forget_quality)")
    return entry["value_by_index"]


def per_item_values(log: dict) -> dict:
    """The per-item inputs of `aggregate` found in an existing TOFU_EVAL.json."""
    raw_names = [k for k in log if k.endswith(("Q_A_Prob", "PERT_Prob", "PARA_Prob", "ROUGE"))
                 or k in ("extraction_strength", "exact_memorization")]
    out = {k: log[k]["value_by_index"] for k in raw_names
           if isinstance(log[k], dict) and isinstance(log[k].get("value_by_index"), dict)}
    for k, v in log.items():
        if k.startswith("mia_") and isinstance(v, dict) and "forget" in v and "holdout" in v:
            out[k] = {"forget": v["forget"]["value_by_index"], "holdout": v["holdout"]["value_by_index"]}
    return out


def summary(eval_log: dict) -> dict:
    """TOFU_SUMMARY.json: the aggregate of every metric."""
    return {k: v["agg_value"] for k, v in sorted(eval_log.items()) if isinstance(v, dict) and "agg_value" in v}


def read_log(path: str | Path, what: str = "log") -> dict:
    return read_json_object(path, what)
