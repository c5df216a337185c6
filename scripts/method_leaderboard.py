"""The README's method comparison from a finished methods sweep (configs/sweep/demo_methods.yaml).

    python scripts/method_leaderboard.py runs/demo_methods --base-log runs/demo/eval/base/TOFU_EVAL.json

Rewrites the table between the README's `<!-- method-leaderboard -->` markers (every run of the
sweep, best forget quality first, then the starting model and the retain model for reference, read
from their TOFU_EVAL.json logs) and redraws the sweep's plot as docs/method_leaderboard.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omegaconf import OmegaConf  # noqa: E402

from npo_jax.errors import NpoJaxError  # noqa: E402
from npo_jax.eval.aggregate import read_log, summary  # noqa: E402
from npo_jax.sweep import plot_leaderboard, rank, read_results  # noqa: E402

COLUMNS = ("forget_quality", "model_utility", "forget_Q_A_Prob", "retain_Q_A_Prob", "forget_Q_A_ROUGE",
           "retain_Q_A_ROUGE")
START, END = "<!-- method-leaderboard -->", "<!-- /method-leaderboard -->"


def _cell(v) -> str:
    return "missing" if v is None else f"{v:.4g}"


def table(out: Path, base_log: str | None) -> str:
    """The markdown table: ranked runs, then the starting model and the retain model."""
    ranked = rank(read_results(out))
    if not ranked:
        raise NpoJaxError(f"{out}: no finished runs (runs/*/sweep_result.json)")
    rows = [(str(i), r["name"], r["summary"]) for i, r in enumerate(ranked, 1)]
    if base_log:
        rows.append(("", "*base (before unlearning)*", summary(read_log(base_log, "--base-log"))))
    retain_logs = OmegaConf.load(out / "sweep.yaml").eval.retain_logs
    rows.append(("", "*retain (the target)*", summary(read_log(retain_logs, "the sweep's eval.retain_logs"))))
    lines = ["| rank | method | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---:|" * len(COLUMNS)]
    lines += [f"| {i} | {name} | " + " | ".join(_cell(s.get(k)) for k in COLUMNS) + " |" for i, name, s in rows]
    return "\n".join(lines) + "\n"


def replace_block(text: str, block: str, where: str) -> str:
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise NpoJaxError(f"{where}: needs one {START} ... {END} pair")
    head, rest = text.split(START)
    return f"{head}{START}\n{block}{END}{rest.split(END, 1)[1]}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep_dir", help="the methods sweep's output_dir (default runs/demo_methods)", nargs="?",
                   default="runs/demo_methods")
    p.add_argument("--base-log", default=None, help="the starting model's TOFU_EVAL.json (a reference row)")
    p.add_argument("--readme", default=str(ROOT / "README.md"))
    p.add_argument("--image", default=str(ROOT / "docs" / "method_leaderboard.png"))
    args = p.parse_args(argv)
    out = Path(args.sweep_dir)
    try:
        block = table(out, args.base_log)
        readme = Path(args.readme)
        readme.write_text(replace_block(readme.read_text(), block, args.readme))
        plot_leaderboard(Path(args.image), rank(read_results(out)))
    except NpoJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(block, end="")
    print(f"{args.readme}: table rewritten; {args.image}: plot redrawn")
    return 0


if __name__ == "__main__":
    sys.exit(main())
