"""The demo pipeline end to end with its own config (shorter generations): the checks it reports
and the direction of the unlearning effect. (At a smaller size, 20 authors, the unlearning costs
the retain set more than the demo's check allows.)"""

import json

from npo_jax.demo import run_demo


def test_demo_pipeline_small(tmp_path):
    out = tmp_path / "demo"
    result = run_demo(out, None, ["max_new_tokens=24"])
    assert result["checks"] and all(result["checks"].values()), result["checks"]  # what `npo-jax demo` checks
    base, unlearned = result["base"], result["unlearned"]
    assert base["forget_Q_A_Prob"] > 0.3  # the base model learned the forget facts
    assert unlearned["forget_Q_A_Prob"] < 0.5 * base["forget_Q_A_Prob"]
    forget_drop = unlearned["forget_Q_A_Prob"] / base["forget_Q_A_Prob"]
    retain_drop = unlearned["retain_Q_A_Prob"] / base["retain_Q_A_Prob"]
    assert forget_drop < retain_drop  # the forget set lost more than the retain set
    assert result["export_logits_max_rel_diff"] <= 1e-4
    saved = json.loads((out / "summary.json").read_text())
    assert set(saved) >= {"base", "retain", "unlearned", "elapsed_s", "hf_export"}
    assert (out / "truth_ratios.png").is_file() and (out / "unlearned" / "hf" / "config.json").is_file()
