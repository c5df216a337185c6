"""Running every probe for one model on the forget items and, as the control, the retain items.

The audited items of a split are its first `limit` rows; rows whose answer has no novel key fact
are excluded from the fact-based probes and listed (`excluded_items`). Each probe's summary is
its rate, bootstrap CI and n, the excluded rows, and the per-item records.
"""

from __future__ import annotations

from dataclasses import dataclass

from npo_jax.audit import probes as p
from npo_jax.audit.bootstrap import DEFAULT_RESAMPLES, summarise
from npo_jax.eval.scoring import Scorer


@dataclass
class AuditSplit:
    split: str  # TOFU split name, e.g. forget10_perturbed
    rows: list[dict]  # every row of the split: chain-of-clues draws its clues from them
    limit: int | None = None

    def __post_init__(self):
        audited = [p.Item.from_row(i, r) for i, r in enumerate(self.rows[:self.limit])]
        self.all_items = audited
        self.items = [it for it in audited if it.facts]
        self.excluded = [it.index for it in audited if not it.facts]


def summary(records: list[dict | None], items: list[p.Item], excluded: list[int], *, seed: int,
            n_resamples: int = DEFAULT_RESAMPLES) -> dict:
    """Rate, CI and n over the records present; items whose record is None are excluded too."""
    kept = [r for r in records if r is not None]
    dropped = sorted(excluded + [it.index for it, r in zip(items, records, strict=True) if r is None])
    return {**summarise([r["value"] for r in kept], n_resamples=n_resamples, seed=seed),
            "excluded": len(dropped), "excluded_items": dropped, "items": kept}


def audit_split(scorer: Scorer, sp: AuditSplit, cfg: p.ProbeConfig, *, relearn: bool, log=print,
                n_resamples: int = DEFAULT_RESAMPLES) -> dict:
    items = sp.items
    kw = dict(seed=cfg.seed, n_resamples=n_resamples)
    out: dict = {}

    def done(name, records):
        out[name] = summary(records, items, sp.excluded, **kw)
        log(f"  {sp.split} {name}: {out[name]['rate']}")

    done("novel_recall", p.novel_recall(scorer, items))
    done("best_of_n", p.best_of_n(scorer, items, cfg))
    blank, mc, yn = p.fill_blank(scorer, items), p.multiple_choice(scorer, items), p.yes_no(scorer, items)
    done("format_fill_blank", blank)
    done("format_multiple_choice", mc)
    done("format_yes_no", yn)
    done("format_shift", p.format_shift(blank, mc, yn))
    done("chain_of_clues", p.chain_of_clues(scorer, items, sp.rows, cfg))
    scored = scorer.score_answers([(it.question, it.answer) for it in sp.all_items])
    with_facts = [s for it, s in zip(sp.all_items, scored, strict=True) if it.facts]
    done("masked_probe", p.masked_probe(scorer, items, with_facts))
    out["answer_nll"] = [{"index": it.index, "prompt": it.question, "answer": it.answer, "nll": s.avg_loss}
                         for it, s in zip(sp.all_items, scored, strict=True)]
    if relearn and len(items) >= 2:
        out["relearn"] = _relearn_summary(p.relearning(scorer, items, cfg), sp, kw)
        log(f"  {sp.split} relearn: {out['relearn']['before']['rate']} -> {out['relearn']['rate']}")
    return out


def _relearn_summary(r: dict, sp: AuditSplit, kw: dict) -> dict:
    """Leak after relearning on the held-out half, with before, paired recovery and Q_A_Prob."""
    records = r["records"]
    held_out = [it for it in sp.items if it.index not in set(r["train_indices"])]
    extra = {"before": [x["value_before"] for x in records],
             "recovery": [x["value"] - x["value_before"] for x in records],
             "Q_A_Prob_before": [x["Q_A_Prob_before"] for x in records],
             "Q_A_Prob_after": [x["Q_A_Prob_after"] for x in records]}
    return {**summary(records, held_out, sp.excluded, **kw), **{k: summarise(v, **kw) for k, v in extra.items()},
            "train_indices": r["train_indices"], "train_loss_first_last": r["train_loss_first_last"]}


def ll_shift(model_nll: list[dict], reference_nll: list[dict], *, seed: int,
             n_resamples: int = DEFAULT_RESAMPLES) -> dict:
    """Per item: the model's answer NLL minus the reference model's; rate = the mean difference."""
    records = [{**m, "nll_reference": r["nll"], "value": m["nll"] - r["nll"]}
               for m, r in zip(model_nll, reference_nll, strict=True)]
    return {**summarise([x["value"] for x in records], seed=seed, n_resamples=n_resamples),
            "excluded": 0, "excluded_items": [], "items": records}


def audit_model(scorer: Scorer, splits: dict[str, AuditSplit], cfg: p.ProbeConfig, *, log=print,
                n_resamples: int = DEFAULT_RESAMPLES) -> dict:
    """{"probes": {probe: {"forget": summary, "retain": summary}}, "answer_nll": {split key: [...]}}."""
    per_split = {key: audit_split(scorer, sp, cfg, relearn=key == "forget" and cfg.relearn_steps > 0, log=log,
                                  n_resamples=n_resamples)
                 for key, sp in splits.items()}
    probes: dict = {}
    for key, results in per_split.items():
        for name, result in results.items():
            if name != "answer_nll":
                probes.setdefault(name, {})[key] = result
    return {"probes": probes, "answer_nll": {key: r["answer_nll"] for key, r in per_split.items()}}


def rates(result: dict) -> dict:
    """{probe: {split key: rate}}: the headline numbers of one model's audit."""
    return {name: {k: v["rate"] for k, v in by_split.items()} for name, by_split in result["probes"].items()}

