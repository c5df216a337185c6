"""Aggregations against open-unlearning's published logs, and each metric on hand-made examples."""

import math

import numpy as np
import pytest
from conftest import SHARED, require_shared

from npo_jax.eval import metrics as m
from npo_jax.eval.aggregate import aggregate, per_item_values, read_log

REF = SHARED / "reference" / "open-unlearning-eval"
FULL = REF / "tofu_Llama-3.2-3B-Instruct_full_evals_forget10" / "TOFU_EVAL.json"
RETAIN = REF / "tofu_Llama-3.2-3B-Instruct_retain90" / "TOFU_EVAL.json"


@pytest.fixture(scope="module")
def logs():
    require_shared(REF)
    return read_log(FULL), read_log(RETAIN)


def test_published_headline_numbers(logs):
    full, retain = logs
    ours_full = aggregate(per_item_values(full), retain)
    ours_retain = aggregate(per_item_values(retain), retain)
    assert ours_full["forget_quality"]["agg_value"] == pytest.approx(3.5977e-27, rel=1e-3)
    assert ours_full["model_utility"]["agg_value"] == pytest.approx(0.66608, abs=1e-5)
    assert ours_retain["model_utility"]["agg_value"] == pytest.approx(0.64981, abs=1e-5)
    assert abs(ours_full["model_utility"]["agg_value"] - full["model_utility"]["agg_value"]) < 1e-6
    assert abs(ours_retain["model_utility"]["agg_value"] - retain["model_utility"]["agg_value"]) < 1e-6
    # forget quality of the retain model against itself is 1 (identical samples)
    assert ours_retain["forget_quality"]["agg_value"] == pytest.approx(1.0)


@pytest.mark.parametrize("which", ["full", "retain"])
def test_every_derivable_aggregate(logs, which):
    full, retain = logs
    log = full if which == "full" else retain
    ours = aggregate(per_item_values(log), retain if which == "full" else None)
    checked = []
    for name, entry in log.items():
        published = entry.get("agg_value")
        if published is None or name not in ours or ours[name]["agg_value"] is None:
            continue
        assert ours[name]["agg_value"] == pytest.approx(published, rel=1e-6, abs=1e-9), name
        checked.append(name)
        if "value_by_index" in entry and "value_by_index" in ours[name]:
            for k, item in entry["value_by_index"].items():
                mine = ours[name]["value_by_index"][k]
                for field in ("score", "prob"):
                    if field in item and not isinstance(item[field], list):
                        assert mine[field] == pytest.approx(item[field], rel=1e-5, abs=1e-9), (name, k)
    derivable = {"forget_Q_A_Prob", "forget_Q_A_PARA_Prob", "forget_Q_A_PERT_Prob", "forget_Q_A_ROUGE",
                 "forget_truth_ratio", "retain_Q_A_Prob", "retain_Q_A_PARA_Prob", "retain_Q_A_PERT_Prob",
                 "retain_Q_A_ROUGE", "retain_Truth_Ratio", "ra_Q_A_Prob", "ra_Q_A_PERT_Prob", "ra_Q_A_Prob_normalised",
                 "ra_Q_A_ROUGE", "ra_Truth_Ratio", "wf_Q_A_Prob", "wf_Q_A_PERT_Prob", "wf_Q_A_Prob_normalised",
                 "wf_Q_A_ROUGE", "wf_Truth_Ratio", "extraction_strength", "exact_memorization", "model_utility",
                 "mia_min_k", "mia_loss", "mia_zlib", "mia_gradnorm", "mia_min_k_plus_plus", "privleak"}
    if which == "full":
        derivable |= {"forget_quality", "mia_reference"}
    assert derivable <= set(checked), sorted(derivable - set(checked))


def test_forget_quality_missing_without_retain_log(logs):
    full, _ = logs
    assert aggregate(per_item_values(full), None)["forget_quality"]["agg_value"] is None


# -- hand-made examples, values derived by hand -----------------------------------------------------


def test_truth_ratio_and_aggregators():
    correct = {"0": {"avg_loss": 1.0}, "1": {"avg_loss": 2.0}}
    wrong = {"0": {"avg_loss": [2.0, 4.0]}, "1": {"avg_loss": [1.0, 1.0]}}
    tr = m.truth_ratios(correct, wrong)
    assert tr["0"]["score"] == pytest.approx(math.exp(-3.0) / math.exp(-1.0), rel=1e-8)  # mean NLL 3
    assert tr["1"]["score"] == pytest.approx(math.e, rel=1e-8)
    assert m.agg_truth_ratio(tr, "closer_to_1_better") == pytest.approx((math.exp(-2) + 1 / math.e) / 2, rel=1e-8)
    assert m.agg_truth_ratio(tr, "true_better") == pytest.approx((1 - math.exp(-2) + 0) / 2, rel=1e-8)


def test_probabilities_normalised_and_utility():
    assert m.agg_probability({"0": {"prob": 0.2}, "1": {"prob": [0.1, 0.3]}}) == pytest.approx(0.2)
    norm = m.normalised_probabilities({"0": {"prob": 0.3}}, {"0": {"prob": [0.1, 0.2, 0.4]}})
    assert norm["0"]["prob"] == pytest.approx(0.3 / 1.0)
    aggs = dict.fromkeys(m.UTILITY_KEYS, 0.5)
    aggs["wf_Truth_Ratio"] = 0.25
    assert m.model_utility(aggs) == pytest.approx(9 / (8 / 0.5 + 1 / 0.25))


def test_forget_quality_ks():
    same = {str(i): {"score": float(i)} for i in range(50)}
    shifted = {str(i): {"score": float(i) + 100} for i in range(50)}
    assert m.forget_quality(same, same) == pytest.approx(1.0)
    assert m.forget_quality(same, shifted) < 1e-20  # disjoint samples: D = 1


def test_mia_auc_privleak_min_k():
    forget = {"0": {"score": 0.1}, "1": {"score": 0.2}}
    holdout = {"0": {"score": 0.3}, "1": {"score": 0.15}}
    # pairs (holdout > forget): 0.3>0.1, 0.3>0.2, 0.15>0.1 -> 3 of 4
    assert m.mia_auc(forget, holdout) == pytest.approx(0.75)
    assert m.privleak(0.75) == pytest.approx((0.25 - 0.5) / 0.5 * 100)
    assert m.privleak(0.75, retain_auc=0.4) == pytest.approx((0.25 - 0.6) / 0.6 * 100)
    assert m.min_k_score(np.array([-1.0, -5.0, -2.0, -0.5, -3.0]), k=0.4) == pytest.approx(4.0)


def test_extraction_strength_and_exact_memorization():
    labels = np.array([5, 6, 7, 8])
    assert m.extraction_strength(np.array([5, 6, 7, 8]), labels) == 1.0
    assert m.extraction_strength(np.array([0, 6, 7, 8]), labels) == 0.75
    assert m.extraction_strength(np.array([0, 0, 0, 0]), labels) == 0.25  # open-unlearning's end point
    assert m.exact_memorization(np.array([5, 0, 7, 0]), labels) == 0.5
