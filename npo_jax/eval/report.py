"""Readable evaluation reports: a terminal table and a PNG of forget-set truth-ratio distributions."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TABLE_KEYS = ("forget_quality", "model_utility", "forget_Q_A_Prob", "forget_Q_A_ROUGE", "forget_truth_ratio",
              "retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio", "ra_Q_A_Prob_normalised", "ra_Q_A_ROUGE",
              "wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "extraction_strength", "exact_memorization", "privleak")


def _fmt(value) -> str:
    if value is None:
        return "missing"
    if isinstance(value, float) and value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4):
        return f"{value:.4e}"
    return f"{value:.4f}"


def format_table(summaries: dict[str, dict], keys=TABLE_KEYS) -> str:
    """Metrics as rows, one column per model."""
    names = list(summaries)
    width = max(len(k) for k in keys) + 2
    lines = [f"{'metric':<{width}}" + "".join(f"{n:>14}" for n in names)]
    for key in keys:
        if not any(key in s for s in summaries.values()):
            continue
        lines.append(f"{key:<{width}}" + "".join(f"{_fmt(summaries[n].get(key)):>14}" for n in names))
    return "\n".join(lines)


def _truth_ratios(log: dict) -> np.ndarray:
    vbi = log["forget_truth_ratio"]["value_by_index"]
    return np.array([vbi[k]["score"] for k in sorted(vbi, key=int)])


def plot_truth_ratios(path: str | Path, logs: dict[str, dict]) -> Path:
    """Histogram of log truth ratios on the forget set, one series per named log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    values = {name: np.log(np.clip(_truth_ratios(log), 1e-12, None)) for name, log in logs.items()
              if log is not None and "forget_truth_ratio" in log}
    lo = min(v.min() for v in values.values())
    hi = max(v.max() for v in values.values())
    bins = np.linspace(lo, hi + 1e-9, 40)
    for name, v in values.items():
        ax.hist(v, bins=bins, histtype="step", linewidth=1.8, label=f"{name} (n={len(v)})")
    ax.axvline(0.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("log truth ratio  (perturbed / paraphrased)")
    ax.set_ylabel("forget items")
    ax.set_title("Forget-set truth ratios")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
