"""Evaluate one exported HF folder with our JAX evaluator and with transformers (PyTorch, float32,
CPU) on a subset of TOFU, and print the per-metric differences; `--bench` adds wall times.

    python scripts/eval_parity.py runs/npo_3b/hf --data-dir ../shared/tofu --limit 20
    python scripts/eval_parity.py MODEL_DIR --data-dir DIR --limit 40 --bench

Both run the same suite layout (`npo_jax.eval.suite.Suite`); what differs is the compute: our
jit-compiled, bucketed, chunked scoring and KV-cache generation vs transformers' forward and
`generate`, each with its own tokenization of the chat.
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
from npo_jax.model import merge_params  # noqa: E402


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
    ap.add_argument("--bench", action="store_true", help="time both suites (ours run twice: with and without compile)")
    args = ap.parse_args()

    import torch
    import transformers

    torch.set_num_threads(max(1, torch.get_num_threads()))
    scorer = load_scorer(args.model, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    eos = merge_params(scorer.graphdef, scorer.params).config.eos_token_ids
    hf = transformers.LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    torch_scorer = TorchScorer(hf, scorer.tokenizer, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                               eos_ids=eos)
    kw = dict(data_dir=args.data_dir, tfds_dir=args.tfds_dir, forget_split=args.forget_split,
              holdout_split=args.holdout_split, limit=args.limit, progress=False)

    jax_suite = Suite(scorer, **kw)
    ours, ours_first = run(jax_suite)
    ours_timing = dict(jax_suite.timings)
    ours_warm = None
    if args.bench:
        warm_suite = Suite(scorer, **kw)
        _, ours_warm = run(warm_suite)
        ours_timing = dict(warm_suite.timings)
    torch_suite = Suite(torch_scorer, **kw)
    ref, torch_s = run(torch_suite)

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
        t, ot = torch_suite.timings, ours_timing

        def parts(timings: dict) -> str:  # a scorer that does both in one pass has one figure
            if "scoring_and_generation_s" in timings:
                return f"{'(one pass: ' + format(timings['scoring_and_generation_s'], '.1f') + ')':>21}"
            return f"{timings['scoring_s']:9.1f} {timings['generation_s']:11.1f}"

        print(f"\n{'suite wall time (s)':<22} {'scoring':>9} {'generation':>11} {'total':>8}")
        print(f"{'jax (warm)':<22} {parts(ot)} {ours_warm:8.1f}")
        print(f"{'jax (with compile)':<22} {'':>21} {ours_first:8.1f}")
        print(f"{'transformers':<22} {parts(t)} {torch_s:8.1f}")
        detail = ("" if "scoring_s" not in ot else f" (scoring {t['scoring_s'] / ot['scoring_s']:.2f}x, "
                  f"generation {t['generation_s'] / ot['generation_s']:.2f}x)")
        print(f"speed-up (transformers / jax warm): {torch_s / ours_warm:.2f}x{detail}")

if __name__ == "__main__":
    main()
