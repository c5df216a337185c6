"""Evaluate one exported HF folder with our JAX evaluator and with transformers (PyTorch, float32,
CPU) on a subset of TOFU, and print the per-metric differences; `--bench` adds wall times.

    python scripts/eval_parity.py runs/npo_3b/hf --data-dir ../shared/tofu --limit 20
    python scripts/eval_parity.py MODEL_DIR --data-dir DIR --limit 40 --bench --rounds 3

Both run the same suite layout (`npo_jax.eval.suite.Suite`); what differs is the compute: our
jit-compiled, bucketed, chunked scoring and KV-cache generation vs transformers' forward and
`generate`, each with its own tokenization of the chat. Both use the padding-only attention mask
(transformers' own), whatever convention the model records, or with `--eot-mask-quirk`
open-unlearning's (how `npo-jax eval` scores an HF release, which has no record).

`--bench` times warm suites in turns: after each side's first run (ours compiles then), `--rounds`
rounds of one warm run each, the order swapped every round, so drift in the machine's speed (15-25%
within minutes on the CI machine) falls on both; it prints the medians and each round's ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from npo_jax.eval.aggregate import aggregate  # noqa: E402
from npo_jax.eval.cli import load_scorer  # noqa: E402
from npo_jax.eval.hf_reference import TorchScorer  # noqa: E402
from npo_jax.eval.suite import Suite  # noqa: E402


def run(suite: Suite) -> tuple[dict, float]:
    t0 = time.perf_counter()
    per_item = suite.per_item()
    return per_item, time.perf_counter() - t0


def max_item_diff(a: dict, b: dict, field: str) -> float:
    diffs = []
    for k in a:
        x, y = np.atleast_1d(a[k][field]), np.atleast_1d(b[k][field])
        diffs.append(np.max(np.abs(x - y)))
    return float(max(diffs)) if diffs else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="exported HF folder (config, safetensors, tokenizer)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--tfds-dir", default=None)
    ap.add_argument("--forget-split", default="forget10")
    ap.add_argument("--holdout-split", default=None)
    ap.add_argument("--limit", type=int, default=20, help="items per split")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--eot-mask-quirk", action="store_true", help="open-unlearning's attention mask on both sides")
    ap.add_argument("--bench", action="store_true", help="time both suites: first runs, then warm runs in turns")
    ap.add_argument("--rounds", type=int, default=3, help="with --bench: warm runs of each suite, in turns")
    args = ap.parse_args()
    if args.bench and args.rounds < 1:
        ap.error(f"--rounds must be at least 1 with --bench (got {args.rounds})")

    import torch
    import transformers

    torch.set_num_threads(max(1, torch.get_num_threads()))
    scorer = load_scorer(args.model, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                         eot_mask_quirk=args.eot_mask_quirk)
    hf = transformers.LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    torch_scorer = TorchScorer(hf, scorer.tokenizer, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                               eos_ids=scorer.lm.eos_ids, eot_mask_quirk=args.eot_mask_quirk)
    kw = dict(data_dir=args.data_dir, tfds_dir=args.tfds_dir, forget_split=args.forget_split,
              holdout_split=args.holdout_split, limit=args.limit, progress=False)

    ours, ours_first = run(Suite(scorer, **kw))
    ref, torch_first = run(Suite(torch_scorer, **kw))
    warm = {"jax": [], "transformers": []}
    timings = {}
    for r in range(args.rounds if args.bench else 0):
        for name in (("jax", "transformers") if r % 2 == 0 else ("transformers", "jax")):
            suite = Suite(scorer if name == "jax" else torch_scorer, **kw)
            warm[name].append(run(suite)[1])
            timings.setdefault(name, []).append(suite.timings)

    a, b = aggregate(ours), aggregate(ref)
    print(f"{args.model}: {args.limit} items per split, float32")
    print(f"{'metric':<28} {'jax':>12} {'transformers':>13} {'|diff|':>10} {'max item |diff|':>16}")
    for name in sorted(a):
        x, y = a[name].get("agg_value"), b[name].get("agg_value")
        if x is None or y is None:
            continue
        item = ""
        vbi_a, vbi_b = a[name].get("value_by_index"), b[name].get("value_by_index")
        if isinstance(vbi_a, dict) and vbi_a:
            field = next(f for f in ("score", "prob", "rougeL_recall") if f in next(iter(vbi_a.values())))
            item = f"{max_item_diff(vbi_a, vbi_b, field):.2e}"
        print(f"{name:<28} {x:12.6f} {y:13.6f} {abs(x - y):10.2e} {item:>16}")
    same = sum(ours[k][i]["generation"] == ref[k][i]["generation"]
               for k in ours if k.endswith("ROUGE") for i in ours[k])
    total = sum(len(ours[k]) for k in ours if k.endswith("ROUGE"))
    print(f"identical generations: {same}/{total}")
    if args.bench:
        print_bench(warm, timings, ours_first, torch_first)


def print_bench(warm: dict, timings: dict, ours_first: float, torch_first: float) -> None:
    """Medians of the warm runs (with their range), the first runs, and each round's ratio."""

    def parts(runs: list[dict]) -> str:  # a scorer that does both in one pass has one figure
        if "scoring_and_generation_s" in runs[0]:
            both = np.median([t["scoring_and_generation_s"] for t in runs])
            return f"{'(one pass: ' + format(both, '.1f') + ')':>21}"
        return (f"{np.median([t['scoring_s'] for t in runs]):9.1f} "
                f"{np.median([t['generation_s'] for t in runs]):11.1f}")

    ours, ref = warm["jax"], warm["transformers"]
    print(f"\n{'suite wall time (s)':<26} {'scoring':>9} {'generation':>11} {'total':>8}  range")
    print(f"{'jax, warm (median)':<26} {parts(timings['jax'])} {np.median(ours):8.1f}  {min(ours):.1f}-{max(ours):.1f}")
    print(f"{'transformers, warm':<26} {parts(timings['transformers'])} {np.median(ref):8.1f}  "
          f"{min(ref):.1f}-{max(ref):.1f}")
    print(f"{'jax, first run (compiles)':<26} {'':>21} {ours_first:8.1f}")
    print(f"{'transformers, first run':<26} {'':>21} {torch_first:8.1f}")
    rounds = " ".join(f"{t / o:.2f}x" for o, t in zip(ours, ref, strict=True))
    print(f"speed-up (transformers / jax, warm medians): {np.median(ref) / np.median(ours):.2f}x "
          f"(rounds: {rounds}; first runs: {torch_first / ours_first:.2f}x)")


if __name__ == "__main__":
    main()
