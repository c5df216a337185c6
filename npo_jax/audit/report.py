"""The audit's outputs: AUDIT.json (every model, probe, split and item), a side-by-side table, a chart.

Rows of the table are probes on the forget items and on the retain items (the control), columns
are models; a cell is `rate [95% CI] n=items`. The chart draws the same rates as bars with CI
whiskers, forget and retain control side by side, and the log-likelihood shift (in nats) apart.
"""

from __future__ import annotations

from pathlib import Path

from npo_jax.audit.bootstrap import DEFAULT_RESAMPLES
from npo_jax.audit.probes import DEFINITIONS
from npo_jax.audit.run import ll_shift

SPLITS = {"forget": "forget", "retain": "retain (control)"}
RELEARN_EXTRA = {"before": "relearn: leak before", "recovery": "relearn: recovery (after - before)",
                 "Q_A_Prob_before": "relearn: Q_A_Prob before", "Q_A_Prob_after": "relearn: Q_A_Prob after"}


def build_report(results: dict[str, dict], paths: dict[str, str], config: dict, *, reference: str | None = None,
                 seed: int = 0, n_resamples: int = DEFAULT_RESAMPLES) -> dict:
    """AUDIT.json's content: definitions, config and, per model, every probe summary with its items."""
    models = {}
    for name, res in results.items():
        probes = dict(res["probes"])
        if reference is not None:
            ref = results[reference]["answer_nll"]
            probes["ll_shift"] = {k: ll_shift(v, ref[k], seed=seed, n_resamples=n_resamples)
                                  for k, v in res["answer_nll"].items()}
        models[name] = {"path": paths[name], "probes": {p: probes[p] for p in DEFINITIONS if p in probes},
                        "answer_nll": res["answer_nll"]}
    return {"definitions": {**DEFINITIONS, "confidence_interval": "95% percentile bootstrap over items"},
            "config": config, "reference": reference, "models": models}


def _rows(report: dict):
    """(probe label, split label, {model: summary or None}) in table order."""
    models = report["models"]
    for probe in DEFINITIONS:
        for split, label in SPLITS.items():
            cells = {m: r["probes"].get(probe, {}).get(split) for m, r in models.items()}
            if any(cells.values()):
                yield probe, label, cells
                if probe == "relearn":
                    for key, extra in RELEARN_EXTRA.items():
                        yield extra, label, {m: c[key] if c else None for m, c in cells.items()}


def _cell(s: dict | None) -> str:
    if s is None:
        return "-"
    if s["rate"] is None:
        return "n=0"
    lo, hi = s["ci"]
    return f"{s['rate']:.3f} [{lo:.3f}, {hi:.3f}] n={s['n']}"


def format_markdown(report: dict) -> str:
    names = list(report["models"])
    lines = ["| probe | items | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for probe, split, cells in _rows(report):
        lines.append(f"| {probe} | {split} | " + " | ".join(_cell(cells[n]) for n in names) + " |")
    if report["reference"] is None:
        lines.append("\nll_shift: not computed (no --reference model)")
    return "\n".join(lines)


def plot_rates(path: str | Path, report: dict) -> Path:
    """Grouped bars with 95% CI whiskers: leak rates on forget and retain items, and the NLL shift."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(report["models"])
    rate_probes = [p for p in DEFINITIONS if p != "ll_shift"]
    panels = [(SPLITS[s], rate_probes, s, "rate") for s in SPLITS]
    if report["reference"] is not None:
        panels.append((f"log-likelihood shift vs {report['reference']}", ["ll_shift"] * 2, None, "nats / token"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), dpi=120, squeeze=False)
    width = 0.8 / len(names)
    for ax, (title, probes, split, unit) in zip(axes[0], panels, strict=True):
        labels = probes if split else list(SPLITS)
        for k, name in enumerate(names):
            by_probe = report["models"][name]["probes"]
            cells = [by_probe.get(p, {}).get(split or s) for p, s in zip(probes, labels, strict=True)]
            rate = np.array([c["rate"] if c and c["rate"] is not None else np.nan for c in cells])
            lo = np.array([c["ci"][0] if c and c["rate"] is not None else np.nan for c in cells])
            hi = np.array([c["ci"][1] if c and c["rate"] is not None else np.nan for c in cells])
            x = np.arange(len(labels)) + (k - (len(names) - 1) / 2) * width
            ax.bar(x, rate, width, label=name, yerr=[rate - lo, hi - rate], capsize=2)
        ax.set_xticks(np.arange(len(labels)), labels, rotation=35, ha="right", fontsize=8)
        ax.axhline(0.0, color="k", lw=0.6)
        ax.set_title(title)
        ax.set_ylabel(unit)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
